"""The offline default image-to-text model (EfficientNet-Lite0 + MiniLM, both from packages) learns
the bundled caption and VQA samples with its default recipe and captions / answers for held-out images."""

import json
from pathlib import Path

import pytest

from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset, load_splits
from mmdemo.errors import UserInputError
from mmdemo.inference import answer, caption, classify, generate_batch
from mmdemo.metrics import normalize_answer
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


def test_default_vqa_model_answers_questions_about_held_out_images(tmp_path):
    summary = ingest_dataset(ASSETS / "sample_vqa.zip", tmp_path / "ws", task="vqa")
    run = tmp_path / "run"
    report = train(TrainConfig(task="vqa", data=summary.path, output_dir=str(run), log_every=10))
    # The validation split holds 20% of the images with all their questions, none seen in training;
    # easy-VQA has one answer per question, so VQA accuracy equals exact match here.
    assert report["vqa_accuracy"] >= 0.8, {k: v for k, v in report.items() if k != "examples"}
    # The same through the inference entry points, on every 31st held-out question.
    validation = load_splits(summary.path)["validation"].select(range(0, report["num_val"], 31))
    predicted = generate_batch(validation["image"], validation["question"], run, max_new_tokens=10)
    hits = [normalize_answer(p) in {normalize_answer(a) for a in r["answers"]} for p, r in zip(predicted, validation)]
    assert sum(hits) / len(hits) >= 0.8, list(zip(validation["question"], predicted))
    assert answer(validation[0]["image"], validation[0]["question"], run) == predicted[0]
