"""The Caption and Ask (VQA) endpoints through gradio_client against the launched app."""

import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CIRCLE = handle_file(str(ASSETS / "examples/circle.png"))


def tiny_vqa_zip(path: Path) -> Path:
    """12 circles (4 positions x 3 colours) with two questions each: enough to train two steps and serve."""
    import json
    import zipfile

    from PIL import Image, ImageDraw

    rows = []
    with zipfile.ZipFile(path, "w") as z:
        for i in range(12):
            color = ("red", "blue", "green")[i % 3]
            img = Image.new("RGB", (48, 48), "white")
            ImageDraw.Draw(img).ellipse((10 + i % 4, 10, 38, 38), fill=color)  # 12 distinct images
            img.save(path.parent / f"{i}.png")
            z.write(path.parent / f"{i}.png", f"{i}.png")
            rows += [{"file_name": f"{i}.png", "question": "what color is the shape?", "answer": color},
                     {"file_name": f"{i}.png", "question": "what shape is it?", "answer": "circle"}]
        z.writestr("metadata.jsonl", "\n".join(json.dumps(r) for r in rows))
    return path


def trained_run(client: Client, task: str, sample) -> str:
    """A few steps of the task's default model on a dataset: enough to serve, not to be right."""
    summary = client.predict(handle_file(str(sample)), task=task, api_name="/load_dataset")
    assert summary["task"] == task and summary["num_train"] > 0 and summary["num_val"] > 0
    run_id = client.predict(summary["dataset_id"], max_steps=2, api_name="/start_training")["run_id"]
    deadline = time.time() + 1200
    while (status := client.predict(run_id, api_name="/training_status"))["status"] in ("queued", "running"):
        assert time.time() < deadline, status
        time.sleep(2)
    assert status["status"] == "completed", status
    return run_id


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def test_caption_and_answer_endpoints_serve_their_runs(client, tmp_path):
    caption_run = trained_run(client, "captioning", ASSETS / "sample_captions.zip")
    runs = {r["run_id"]: r for r in client.predict(api_name="/list_runs")}
    assert runs[caption_run]["task"] == "captioning" and runs[caption_run]["base_model"] == "efficientnet_lite0+minilm"
    text = client.predict(CIRCLE, checkpoint=caption_run, max_new_tokens=5, num_beams=2, api_name="/caption")
    assert isinstance(text, str) and 0 < len(text.split()) <= 5
    with pytest.raises(Exception, match="trained for captioning, not vqa"):
        client.predict(CIRCLE, "what color is the shape?", checkpoint=caption_run, api_name="/answer")
    with pytest.raises(Exception, match="No captioning model yet"):
        client.predict(CIRCLE, checkpoint="", api_name="/caption")

    vqa_run = trained_run(client, "vqa", tiny_vqa_zip(tmp_path / "vqa.zip"))
    # Four answers, and every validation answer is among the training ones: the default is the classifier over them
    runs = {r["run_id"]: r for r in client.predict(api_name="/list_runs")}
    assert runs[vqa_run]["method"] == "answer_head"
    reply = client.predict(CIRCLE, "what color is the shape?", checkpoint=vqa_run, api_name="/answer")
    assert reply in ("red", "blue", "green", "circle")
    with pytest.raises(Exception, match="Type a question"):
        client.predict(CIRCLE, "  ", checkpoint=vqa_run, api_name="/answer")
    with pytest.raises(Exception, match="trained for vqa, not classification"):
        client.predict(CIRCLE, checkpoint=vqa_run, api_name="/classify")
