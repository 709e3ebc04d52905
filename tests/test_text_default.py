"""The offline default image-to-text model (EfficientNet-Lite0 + MiniLM, both from packages) learns
the bundled caption sample with its default recipe and captions held-out images (the VQA default's figures:
bench/text_default.py --task vqa)."""

import json
from pathlib import Path

import pytest

from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset, load_splits
from mmdemo.errors import UserInputError
from mmdemo.inference import answer, caption, classify
from mmdemo.training import train

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    summary = ingest_dataset(ASSETS / "sample_captions.zip", root / "ws", task="captioning")
    run = root / "run"
    train(TrainConfig(task="captioning", data=summary.path, output_dir=str(run), log_every=10))
    return run, summary.path


def test_default_captioner_captions_held_out_images(caption_run):
    run, data = caption_run
    test = load_splits(data)["test"]  # easy-VQA's own test images: never seen in training
    hits = [caption(row["image"], run).strip().lower() in {c.lower() for c in row["captions"]} for row in test]
    assert sum(hits) / len(hits) >= 0.85, sum(hits) / len(hits)
    report = json.loads((run / "eval.json").read_text())
    assert report["exact_match"] >= 0.85 and report["cider"] > 5 and report["rouge_l"] > 0.9
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["cider"] > evals[0]["cider"]  # the metric moved while it trained


def test_wrong_task_checkpoint_is_named(caption_run):
    run, data = caption_run
    image = load_splits(data)["test"][0]["image"]
    with pytest.raises(UserInputError, match="trained for captioning, not vqa"):
        answer(image, "what shape is this?", run)
    with pytest.raises(UserInputError, match="trained for captioning, not classification"):
        classify(image, run)
    with pytest.raises(UserInputError, match="No captioning model yet"):
        caption(image, None)
