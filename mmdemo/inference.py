"""Predictions from a run directory, a model folder, a Hub id or the embedded default; cached."""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from pathlib import Path

import torch

from .errors import UserInputError
from .images import normalize, resize_center_crop
from .models import Classifier, build_classifier, ensure_hub, imagenet_classifier, load_classifier
from .runs import META_FILE, model_dir_of
from .settings import inference_on_cpu

_lock = threading.Lock()


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


def inference_device() -> torch.device:
    """Where the app and the CLI run models: the GPU when there is one (on a ZeroGPU Space, inside
    ``spaces.GPU``), else the CPU. MMDEMO_INFERENCE_DEVICE=cpu keeps a GPU free for training."""
    if inference_on_cpu() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _on_device(model):
    device = inference_device()
    if next(model.parameters()).device != device:
        model.to(device)
    return device


def _check_images(images) -> list:
    if not images or any(image is None for image in images):
        raise UserInputError("No image given: drop an image first.")
    return list(images)


@torch.no_grad()
def classify_batch(images, checkpoint: str | Path | None = None, top_k: int = 5) -> list[dict[str, float]]:
    """Top-k labels with probabilities for each of several PIL images, in one forward pass.

    Args:
        images: PIL images (any mode, any size).
        checkpoint: a run directory, a model folder, a Hub id, or None for the ImageNet default.
        top_k: how many labels to return per image.
    """
    images = _check_images(images)
    clf = load_predictor(checkpoint, "classification")
    pre = clf.preprocess
    x = torch.stack([resize_center_crop(image, pre.image_size, pre.crop_pct) for image in images])
    with _lock:  # one forward at a time per process: torch already uses every core for one
        device = _on_device(clf)
        x = normalize(x.to(device, non_blocking=True), pre.mean, pre.std, clf.channels_last_input)
        probs = clf(x).float().softmax(-1).cpu()
    top = probs.topk(min(int(top_k), probs.shape[-1]))
    return [{clf.labels[i]: round(float(p), 5) for p, i in zip(values, indices)}
            for values, indices in zip(top.values.tolist(), top.indices.tolist())]


def classify(image, checkpoint: str | Path | None = None, top_k: int = 5) -> dict[str, float]:
    """Top-k labels with probabilities for one PIL image (see ``classify_batch``)."""
    return classify_batch([image], checkpoint, top_k)[0]


@torch.no_grad()
def generate_batch(images, questions: list[str] | None, checkpoint: str | Path | None = None,
                   max_new_tokens: int = 30, num_beams: int = 1) -> list[str]:
    """Captions (``questions`` None) or answers (one question per image) for several PIL images at once."""
    images = _check_images(images)
    task = "captioning" if questions is None else "vqa"
    if questions is not None:
        questions = [(q or "").strip() for q in questions]
        if len(questions) != len(images) or not all(questions):
            raise UserInputError("Type a question about the image first.")
    model = load_predictor(checkpoint, task)
    pixels = torch.stack([resize_center_crop(image, model.preprocess.image_size) for image in images])
    with _lock:
        _on_device(model)
        return model.generate(pixels, questions, int(max_new_tokens), int(num_beams))


def caption(image, checkpoint: str | Path | None = None, max_new_tokens: int = 30, num_beams: int = 1) -> str:
    """A caption for one PIL image from a captioning run directory or a Hub id."""
    return generate_batch([image], None, checkpoint, max_new_tokens, num_beams)[0]


def answer(image, question: str, checkpoint: str | Path | None = None, max_new_tokens: int = 10,
           num_beams: int = 1) -> str:
    """The answer to ``question`` about one PIL image, from a VQA run directory or a Hub id."""
    return generate_batch([image], [question], checkpoint, max_new_tokens, num_beams)[0]
