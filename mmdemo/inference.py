"""Predictions from a run directory, a model folder, a Hub id or the embedded default; cached."""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from pathlib import Path

import torch

from .errors import UserInputError
from .images import normalize, resize_center_crop
from .models import META_FILE, Classifier, build_classifier, ensure_hub, imagenet_classifier, load_classifier

_lock = threading.Lock()


def model_dir_of(checkpoint: str | Path) -> Path | None:
    """A run directory or a model folder -> the folder holding mmdemo.json; None for anything else."""
    path = Path(str(checkpoint))
    for candidate in (path / "model", path):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


TAB_OF = {"classification": "Classify", "captioning": "Caption", "vqa": "Ask"}


def load_predictor(checkpoint: str | Path | None = None, task: str = "classification"):
    """The model for ``checkpoint`` and ``task``, cached. "" / None: the offline ImageNet classifier
    for classification; captioning and VQA have no usable model before fine-tuning."""
    checkpoint = str(checkpoint or "").strip()
    model_dir = model_dir_of(checkpoint) if checkpoint else None
    if model_dir is not None:
        trained_for = json.loads((model_dir / META_FILE).read_text()).get("task", "classification")
        if trained_for != task:
            raise UserInputError(f"This checkpoint was trained for {trained_for}, not {task}: use it on the "
                                 f"{TAB_OF.get(trained_for, trained_for)} tab, or pick a {task} run.")
        # The folder's mtime is part of the key, so a run that is saved again is reloaded.
        return _cached(str(model_dir), model_dir.stat().st_mtime_ns, task)
    if checkpoint and Path(checkpoint).exists():
        raise UserInputError(f"'{Path(checkpoint).name}' holds no trained model yet; wait for the run to finish.")
    if not checkpoint and task != "classification":
        raise UserInputError(f"No {task} model yet: fine-tune one on your data (Train tab, task '{task}'), then pick "
                             f"its run here, or give a Hub model id such as {HUB_EXAMPLES[task]} (needs the Hub).")
    return _cached(checkpoint, 0, task)


HUB_EXAMPLES = {"captioning": "Salesforce/blip-image-captioning-base", "vqa": "Salesforce/blip-vqa-base"}


@lru_cache(maxsize=4)
def _cached(key: str, _mtime: int, task: str):
    if task != "classification":
        from .vlm import HFImageText, load_image_text_model

        model = load_image_text_model(key) if Path(key).is_dir() else HFImageText.build(task, key)
    elif not key:
        model = imagenet_classifier()
    elif Path(key).is_dir():
        model = load_classifier(key)
    else:
        model = _hub_classifier(key)
    return model.eval()


def _hub_classifier(name: str) -> Classifier:
    # A Hub classifier keeps its own head and labels: build with its label set from its config.
    from transformers import AutoConfig

    ensure_hub(name)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        # Not a transformers id (or the Hub is unreachable): the registry gives the clear error.
        clf, _ = build_classifier(name, [str(i) for i in range(1000)], True)
        return clf
    labels = [config.id2label[i] for i in range(len(config.id2label))]
    clf, _ = build_classifier(name, labels, True)
    return clf


@torch.no_grad()
def classify(image, checkpoint: str | Path | None = None, top_k: int = 5) -> dict[str, float]:
    """Top-k labels with probabilities for one PIL image.

    Args:
        image: a PIL image (any mode).
        checkpoint: a run directory, a model folder, a Hub id, or None for the ImageNet default.
        top_k: how many labels to return.
    """
    if image is None:
        raise UserInputError("No image given: drop an image first.")
    clf = load_predictor(checkpoint, "classification")
    pre = clf.preprocess
    x = resize_center_crop(image, pre.image_size, pre.crop_pct)[None]
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    with _lock:  # one forward at a time per process: torch already uses every core for one
        probs = clf(normalize(x, mean, std)).float().softmax(-1)[0]
    top = probs.topk(min(top_k, len(probs)))
    return {clf.labels[i]: round(float(p), 5) for p, i in zip(top.values, top.indices)}


def _pixels(image, size: int):
    if image is None:
        raise UserInputError("No image given: drop an image first.")
    return resize_center_crop(image, size)[None]


@torch.no_grad()
def caption(image, checkpoint: str | Path | None = None, max_new_tokens: int = 30, num_beams: int = 1) -> str:
    """A caption for one PIL image from a captioning run directory or a Hub id."""
    model = load_predictor(checkpoint, "captioning")
    with _lock:
        return model.generate(_pixels(image, model.preprocess.image_size), None, int(max_new_tokens), int(num_beams))[0]


@torch.no_grad()
def answer(image, question: str, checkpoint: str | Path | None = None, max_new_tokens: int = 10,
           num_beams: int = 1) -> str:
    """The answer to ``question`` about one PIL image, from a VQA run directory or a Hub id."""
    if not (question or "").strip():
        raise UserInputError("Type a question about the image first.")
    model = load_predictor(checkpoint, "vqa")
    with _lock:
        return model.generate(_pixels(image, model.preprocess.image_size), [question.strip()], int(max_new_tokens),
                              int(num_beams))[0]
