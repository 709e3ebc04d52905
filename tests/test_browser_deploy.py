"""The Train tab's Deploy and Distill sections in a real browser (Debian's Chromium through Playwright) against the
real app: a tiny run of the sample dataset (64 px, one epoch) exported to ONNX, the export lab's table with a row
per variant and the pick, the Classify tab running the int8 file; then that run distilled into a student, which
trains and reports the teacher / student table."""

import re

import pytest
from test_browser import CHROMIUM, TRAIN_TIMEOUT_MS, app_page

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium "
                                                               "(apt-get install -y chromium)")
CLASSES = ("circle", "rectangle", "triangle")
EXPORT_TIMEOUT_MS = 240_000
DONE = re.compile(r"completed · step ([1-9]\d*) / \1 ")  # every step of the run (the advice may pick the method)


def accordion(page, title: str):
    """The label button that opens (or closes) the accordion titled ``title``."""
    return page.locator("button.label-wrap", has_text=title)


def test_export_classify_onnx_and_distill_in_the_browser(app_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    errors = []
    with app_page(app_url, errors) as page:
        page.get_by_role("button", name=re.compile("Use the sample dataset")).click()
        expect(page.locator("#dataset-summary")).to_contain_text("3 classes", timeout=60_000)

        # The teacher / the run to export: one epoch at 64 px.
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#dataset-choice input")).to_have_value(re.compile("3 classes · 120 images"))
        page.get_by_label("Epochs (0 = default)").first.fill("1")
        page.get_by_label("Image size (0 = from the data)").fill("64")
        page.locator("#start-training").click()
        run_choice, status = page.locator("#run-choice input"), page.locator("#train-status")
        expect(run_choice).to_have_value(re.compile(r"^[0-9a-f]{8} · efficientnet_lite0"), timeout=30_000)
        expect(status).to_contain_text(DONE, timeout=TRAIN_TIMEOUT_MS)
        expect(run_choice).to_have_value(re.compile("completed$"), timeout=30_000)
        teacher = run_choice.input_value()[:8]

        # Deploy: export and measure fp32, int8 and fp16; the lab's table has a row per file, one marked best.
        accordion(page, "Deploy: ONNX").click()
        page.locator("#export-onnx").click()
        lab = page.get_by_role("grid", name="Export lab")
        for variant, file in (("torch fp32", "model.safetensors"), ("onnx fp32", "model.onnx"),
                              ("onnx int8", "model_int8.onnx"), ("onnx fp16", "model_fp16.onnx")):
            row = lab.get_by_role("row", name=re.compile(f"^{variant} {re.escape(file)} (0\\.\\d+|1)"))
            expect(row).to_have_count(1, timeout=EXPORT_TIMEOUT_MS)
        expect(lab.get_by_role("row", name=re.compile("✅"))).to_have_count(1)
        expect(page.locator("#export-notes")).to_contain_text(re.compile(r"Best here: onnx (fp32|int8|fp16)"))
        page.screenshot(path=str(tmp_path / "deploy.png"), full_page=True)

        # Classify: the run's int8 file (the checkpoint list offers the exported variants) gives the run's labels.
        page.get_by_role("tab", name="Classify").click()
        checkpoint = page.locator("#checkpoint-choice input")
        int8 = page.get_by_role("option", name=f"{teacher} · ONNX int8", exact=True)
        for attempt in range(20):  # the choices refresh with the run list (every 3 s); a page load lists them at once
            checkpoint.click()
            if int8.count():
                break
            page.keyboard.press("Escape")
            if attempt == 9:
                page.reload()
                page.get_by_role("tab", name="Classify").click()
            page.wait_for_timeout(1000)
        else:
            pytest.fail(f"no '{teacher} · ONNX int8' among the checkpoints: {page.get_by_role('option').all_inner_texts()}")
        int8.click()
        expect(checkpoint).to_have_value(re.compile("ONNX int8$"))
        page.locator("img[src*='circle.png']").click()
        # The example reaches the image box first (a busy machine takes a moment), else Classify has no image.
        expect(page.locator("#classify-image img")).to_have_count(1, timeout=30_000)
        page.locator("#classify-button").click()
        labels = page.locator("#classify-labels")
        toasts = page.get_by_test_id("toast-text")
        expect(labels.locator("h2").or_(toasts).first).to_be_visible(timeout=60_000)  # an answer, or an error's toast
        assert toasts.all_inner_texts() == []
        for name in CLASSES:
            expect(labels).to_contain_text(name)
        expect(labels.locator("h2").first).to_have_text(re.compile("^(circle|rectangle|triangle)$"))

        # Distill: the selected run teaches a Lite0 student (one epoch at 64 px, without the student alone).
        page.get_by_role("tab", name="Train").click()
        expect(run_choice).to_have_value(re.compile(f"^{teacher}"))
        accordion(page, "Distill into a smaller model").click()
        page.get_by_label("Also train the student alone").uncheck()
        page.get_by_label("Epochs (0 = default)").nth(1).fill("1")
        page.get_by_label("Image size (0 = the student's)").fill("64")
        page.locator("#start-distill").click()
        expect(page.get_by_test_id("toast-text").first).to_contain_text("Distillation queued", timeout=30_000)
        expect(run_choice).not_to_have_value(re.compile(f"^{teacher}"), timeout=30_000)
        student = run_choice.input_value()[:8]
        # The run list (refreshed every 5 s) says when the student is done; the status line may still show the
        # teacher's until the next tick.
        expect(run_choice).to_have_value(re.compile(f"^{student} · efficientnet_lite0 · .* · completed$"),
                                         timeout=TRAIN_TIMEOUT_MS)
        expect(status).to_contain_text(DONE, timeout=30_000)
        page.get_by_role("button", name="Show the comparison of the selected run").click()
        table = page.locator("#distill-table")
        expect(table).to_contain_text("student (distilled)", timeout=60_000)
        expect(table).to_contain_text("teacher")
        expect(page.locator("img[src*='distill.png']")).to_have_count(1)
        page.screenshot(path=str(tmp_path / "distill.png"), full_page=True)
        assert student != teacher
    assert errors == [], f"JavaScript errors on the page: {errors}"
    print(f"screenshots in {tmp_path}")
