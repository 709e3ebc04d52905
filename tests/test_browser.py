"""The whole UI flow in a real browser (Debian's Chromium through Playwright) against the real app:
sample dataset -> train one epoch, watching progress -> classify an example with the new run (which the
Classify tab selects once the run completes); the Search tab lists the datasets and explains an empty run list."""

import contextlib
import re
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
TRAIN_TIMEOUT_MS = 240_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium "
                                                               "(apt-get install -y chromium)")


@contextlib.contextmanager
def app_page(app_url: str, errors: list):
    """A Chromium page on the app, once the page has its browser id; JavaScript errors go to ``errors``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(app_url)
            page.wait_for_function("localStorage.getItem('mmdemo-browser-id')", timeout=30_000)
            yield page
        finally:
            browser.close()


def test_train_and_classify_in_the_browser(app_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            page = context.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(app_url)
            # The page's load event gives this browser its id (gr.BrowserState in localStorage); every
            # handler needs it, so a click before it lands gets "no browser id yet" (see the report).
            page.wait_for_function("localStorage.getItem('mmdemo-browser-id')", timeout=30_000)

            # Dataset tab: the sample dataset's summary and its per-class plot.
            page.get_by_role("button", name=re.compile("Use the sample dataset")).click()
            summary = page.locator("#dataset-summary")
            expect(summary).to_contain_text("3 classes", timeout=60_000)
            expect(summary).to_contain_text("train 96 · validation 24 · test 0")

            # Train tab: one epoch of the default model on the dataset just loaded.
            page.get_by_role("tab", name="Train").click()
            expect(page.locator("#dataset-choice input")).to_have_value(re.compile("3 classes · 120 images"))
            # Before training: the frozen base model's baselines and the recommended recipe, which the Method
            # takes (on the sample's shapes the probe reaches 100%: head only is enough).
            expect(page.locator("#advice-text")).to_contain_text("Recommended: head only is enough", timeout=120_000)
            expect(page.get_by_role("radio", name="head")).to_be_checked()
            page.get_by_role("radio", name="full").check()  # the run below: the full recipe, 6 steps of 16
            page.get_by_label("Epochs (0 = default)").fill("1")
            page.locator("#start-training").click()
            run_choice = page.locator("#run-choice input")
            expect(run_choice).to_have_value(re.compile(r"^[0-9a-f]{8} · efficientnet_lite0 · full"), timeout=30_000)
            status = page.locator("#train-status")
            # Progress while it trains: a step count above 0 and a loss line with points (a fast machine
            # may finish between two 1 s timer ticks, hence "completed" too).
            expect(status).to_contain_text(re.compile(r"(running|completed) · step [1-9]\d* / [1-9]"),
                                           timeout=TRAIN_TIMEOUT_MS)
            loss_line = page.locator("#loss-plot svg g.mark-line path")
            expect(loss_line.first).to_have_attribute("d", re.compile(r"^M[\d.,-]+"), timeout=30_000)
            expect(status).to_contain_text("completed · step 6 / 6 · epoch 1", timeout=TRAIN_TIMEOUT_MS)
            # The finished curve: one vertex per step (M + 5 L for 6 steps).
            expect(loss_line.first).to_have_attribute("d", re.compile(r"^M[^L]+(L[^L]+){5}$"), timeout=10_000)
            expect(page.locator("#train-progress")).to_have_attribute("value", "6")
            # The report: overall accuracy row and one row per class, and the confusion matrix image.
            metrics = page.get_by_role("grid", name="Validation metrics")
            expect(metrics.get_by_role("row", name=re.compile(r"^all 24 (0\.\d+|1)$"))).to_have_count(1, timeout=30_000)
            for name in ("circle", "rectangle", "triangle"):
                expect(metrics.get_by_role("row", name=re.compile(f"^{name} [\\d. ]+ 8$"))).to_have_count(1)
            expect(page.locator("img[src*='confusion_matrix']")).to_have_count(1)
            expect(page.locator("#baseline-verdict")).to_contain_text(
                re.compile("Training (beat|did not beat) the base model"), timeout=30_000)
            # The run list refreshes every 5 s; the checkpoint list refreshes with it.
            expect(run_choice).to_have_value(re.compile("completed$"), timeout=30_000)
            run_prefix = run_choice.input_value()[:8]
            page.screenshot(path=str(tmp_path / "train.png"), full_page=True)

            # Classify tab: the run just completed is already the checkpoint (not the ImageNet default).
            page.get_by_role("tab", name="Classify").click()
            page.locator("img[src*='circle.png']").click()
            expect(page.locator("#checkpoint-choice input")).to_have_value(re.compile(f"^{run_prefix}"), timeout=10_000)
            page.locator("#classify-button").click()
            labels = page.locator("#classify-labels")
            # The run's own 3 classes (not ImageNet's), the circle on top.
            expect(labels).to_contain_text("triangle", timeout=60_000)
            expect(labels).to_contain_text("rectangle")
            expect(labels.locator("h2").first).to_have_text("circle")
            page.screenshot(path=str(tmp_path / "classify.png"), full_page=True)
            expect(page.get_by_test_id("toast-text")).to_have_count(0)

            # A second tab of the same browser (same localStorage id) shows the same run, selected.
            second = context.new_page()
            second.goto(app_url)
            second.get_by_role("tab", name="Train").click()
            expect(second.locator("#run-choice input")).to_have_value(re.compile(f"^{run_prefix}"), timeout=30_000)
            expect(second.locator("#train-status")).to_contain_text("completed · step 6 / 6", timeout=30_000)

            # Search tab: this browser's datasets are on offer; with no retrieval run yet a search says so.
            second.get_by_role("tab", name="Search").click()
            second.locator("#search-dataset input").click()
            second.get_by_role("option", name=re.compile("classification")).first.click()
            second.locator("#search-query textarea").fill("a red circle")
            second.locator("#search-button").click()
            expect(second.get_by_test_id("toast-text").first).to_contain_text("No retrieval model yet", timeout=30_000)
        finally:
            browser.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"
    print(f"screenshots in {tmp_path}")


def _tiny_zip(path: Path, rows_of) -> Path:
    """12 circles and a metadata.jsonl whose rows ``rows_of(file_name, colour)`` gives."""
    import json
    import zipfile

    from PIL import Image, ImageDraw

    rows = []
    with zipfile.ZipFile(path, "w") as z:
        for i in range(12):
            colour = ("red", "blue", "green")[i % 3]
            image = Image.new("RGB", (48, 48), "white")
            ImageDraw.Draw(image).ellipse((10 + i % 4, 10, 38, 38), fill=colour)
            image.save(path.parent / f"{i}.png")
            z.write(path.parent / f"{i}.png", f"{i}.png")
            rows += rows_of(f"{i}.png", colour)
        z.writestr("metadata.jsonl", "\n".join(json.dumps(r) for r in rows))
    return path


def test_the_classify_text_box_and_the_contrastive_loss_follow_the_task(app_url, tmp_path):
    """An image + text run shows the Classify tab's Text box and answers with it; the default (image-only)
    checkpoint hides it. The Train tab shows the contrastive loss for a retrieval dataset only. A retrieval
    run then answers the Search tab: a text finds images (with scores), an image its captions."""
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    fused = _tiny_zip(tmp_path / "fused.zip", lambda f, c: [{"file_name": f, "text": "what color is it?", "label": c},
                                                            {"file_name": f, "text": "is it a shape?", "label": "yes"}])
    captioned = _tiny_zip(tmp_path / "captioned.zip", lambda f, c: [{"file_name": f, "text": f"a {c} circle"},
                                                                    {"file_name": f, "text": f"a round {c} shape"}])
    errors = []
    with app_page(app_url, errors) as page:
        summary = page.locator("#dataset-summary")
        page.get_by_role("radio", name="retrieval", exact=True).check()
        page.get_by_role("button", name=re.compile("Use the sample dataset")).click()
        expect(summary).to_contain_text("retrieval", timeout=60_000)
        page.get_by_role("radio", name="image_text_classification", exact=True).check()
        page.locator("input[type=file]").first.set_input_files(str(fused))
        page.get_by_role("button", name="Load dataset").click()
        expect(summary).to_contain_text("image_text_classification", timeout=60_000)

        # Train tab: the retrieval dataset shows the contrastive loss, the image + text one (selected) does not.
        page.get_by_role("tab", name="Train").click()
        loss = page.locator("#contrastive-loss")
        expect(page.locator("#dataset-choice input")).to_have_value(re.compile("image_text_classification"))
        expect(loss).to_be_hidden()
        page.locator("#dataset-choice input").click()
        page.get_by_role("option", name=re.compile("retrieval")).click()
        expect(loss).to_be_visible(timeout=10_000)
        page.locator("#dataset-choice input").click()
        page.get_by_role("option", name=re.compile("image_text_classification")).click()
        expect(loss).to_be_hidden(timeout=10_000)
        page.get_by_label("Epochs (0 = default)").fill("1")
        page.locator("#start-training").click()
        expect(page.locator("#train-status")).to_contain_text("completed", timeout=TRAIN_TIMEOUT_MS)

        # Classify tab: the run just completed is the checkpoint (the report selects it): the Text box shows.
        page.get_by_role("tab", name="Classify").click()
        text = page.locator("#classify-text")
        expect(page.locator("#checkpoint-choice input")).to_have_value(re.compile("image \\+ text"), timeout=30_000)
        expect(text).to_be_visible(timeout=10_000)
        text.locator("textarea").fill("what color is it?")
        page.locator("img[src*='circle.png']").click()
        page.locator("#classify-button").click()
        labels = page.locator("#classify-labels")
        expect(labels.locator("h2").first).to_have_text(re.compile("^(red|blue|green|yes)$"), timeout=60_000)
        # The default checkpoint reads no text: the box goes.
        page.locator("#checkpoint-choice input").click()
        page.get_by_role("option", name=re.compile("ImageNet classifier")).click()
        expect(text).to_be_hidden(timeout=10_000)
        expect(page.get_by_test_id("toast-text")).to_have_count(0)

        # A retrieval run on captioned circles, then the Search tab: text -> images with scores, image -> captions.
        page.get_by_role("tab", name="Dataset").click()
        page.get_by_role("radio", name="retrieval", exact=True).check()
        page.locator("#dataset-file").get_by_role("button", name="Clear").click()  # fused.zip goes first
        page.locator("input[type=file]").first.set_input_files(str(captioned))
        expect(page.locator("#dataset-file")).to_contain_text("captioned", timeout=30_000)
        page.get_by_role("button", name="Load dataset").click()
        expect(summary).to_contain_text("retrieval · train 10 · validation 2", timeout=60_000)
        expect(summary).not_to_contain_text("Ignored columns")
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#dataset-choice input")).to_have_value(re.compile("retrieval · 12 images"), timeout=30_000)
        page.get_by_label("Epochs (0 = default)").fill("2")
        page.locator("#start-training").click()
        # The new run (the retrieval default, frozen_towers) is selected and completes.
        expect(page.locator("#run-choice input")).to_have_value(re.compile("frozen_towers"), timeout=30_000)
        # (the image + text run above took 1 step: "step 2 / 2" is this run's)
        expect(page.locator("#train-status")).to_contain_text("completed · step 2 / 2", timeout=TRAIN_TIMEOUT_MS)
        # Its report: recall rows, and example queries of the held-out captions with their best images.
        metrics = page.get_by_role("grid", name="Validation metrics")
        expect(metrics.get_by_role("row", name=re.compile(r"^t2i_recall@1 "))).to_have_count(1, timeout=30_000)
        expect(page.locator("#report-examples img").first).to_be_visible(timeout=30_000)
        expect(page.locator("#report-examples")).to_contain_text(re.compile(r"“a .+” #1: \d+\.png"))
        page.get_by_role("tab", name="Search").click()
        page.locator("#search-dataset input").click()
        page.get_by_role("option", name=re.compile("retrieval · 12 rows")).click()
        page.locator("#search-query textarea").fill("a red circle")
        page.locator("#search-button").click()
        gallery, toasts = page.locator("#search-gallery"), page.get_by_test_id("toast-text")
        expect(gallery.locator("img").first.or_(toasts.first)).to_be_visible(timeout=90_000)  # images, or an error
        page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
        assert toasts.count() == 0, toasts.all_inner_texts()
        expect(gallery.locator("img")).to_have_count(5, timeout=30_000)
        expect(gallery).to_contain_text(re.compile(r"\d+\.png · [-0-9.]+"))
        page.locator("img[src*='circle.png']:visible").first.click()
        expect(page.locator("#search-image img")).to_have_count(1, timeout=30_000)
        page.locator("#search-captions-button").click()
        expect(page.locator("#search-captions")).to_contain_text("circle", timeout=60_000)
        expect(page.get_by_test_id("toast-text")).to_have_count(0)
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_a_closed_answer_vqa_run_from_upload_to_the_ask_tab(app_url, tmp_path):
    """A VQA dataset whose answers form a closed list: the Train tab proposes answer_head, the run trains, and
    the Ask tab (which selects it) shows the answers it picks from instead of the generation settings."""
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    vqa = _tiny_zip(tmp_path / "vqa.zip", lambda f, c: [{"file_name": f, "question": "what color is it?", "answer": c},
                                                        {"file_name": f, "question": "what shape is it?",
                                                         "answer": "circle"}])
    errors = []
    with app_page(app_url, errors) as page:
        page.get_by_role("radio", name="vqa", exact=True).check()
        page.locator("input[type=file]").first.set_input_files(str(vqa))
        page.get_by_role("button", name="Load dataset").click()
        expect(page.locator("#dataset-summary")).to_contain_text("vqa", timeout=60_000)
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#dataset-choice input")).to_have_value(re.compile("vqa"), timeout=30_000)
        expect(page.get_by_role("radio", name="answer_head", exact=True)).to_be_checked(timeout=10_000)
        page.get_by_label("Epochs (0 = default)").fill("3")
        page.locator("#start-training").click()
        expect(page.locator("#run-choice input")).to_have_value(re.compile("answer_head"), timeout=30_000)
        expect(page.locator("#train-status")).to_contain_text("completed", timeout=TRAIN_TIMEOUT_MS)

        page.get_by_role("tab", name="Ask (VQA)").click()
        expect(page.locator("#vqa-checkpoint input")).to_have_value(re.compile("answer_head"), timeout=30_000)
        info = page.locator("#vqa-answers")
        expect(info).to_contain_text("picks one of the 4 answers", timeout=10_000)
        expect(info).to_contain_text("circle")
        expect(page.get_by_label("Max new tokens")).to_be_hidden()
        page.locator("img[src*='circle.png']:visible").first.click()
        page.locator("#vqa-question textarea").fill("what shape is it?")
        page.locator("#vqa-button").click()
        expect(page.locator("#vqa-output textarea")).to_have_value(re.compile("^(red|blue|green|circle)$"),
                                                                     timeout=60_000)
        expect(page.get_by_test_id("toast-text")).to_have_count(0)
    assert errors == [], f"JavaScript errors on the page: {errors}"
