"""Predictions from a run directory, a model folder, a Hub id or the embedded default; cached."""

from __future__ import annotations

import json
import threading
from functools import lru_cache, partial
from pathlib import Path

import torch

from .batcher import Batcher
from .checks import int_in_range, shown
from .config import DEFAULT_MODELS
from .errors import UserInputError
from .images import normalize, resize_center_crop
from .models import DEFAULT_MODEL, Classifier, build_classifier, ensure_hub, imagenet_classifier, load_classifier
from .refs import local_dir
from .runs import META_FILE, model_dir_of
from .settings import inference_on_cpu
from .taskspec import TASK_SPECS, task_spec

_lock = threading.Lock()  # one forward at a time per process: torch already uses every core for one
# Concurrent classify calls of one model wait for the running forward and then share the next one.
batcher = Batcher(_lock)


TAB_OF = {name: spec.tab for name, spec in TASK_SPECS.items()}


def load_predictor(checkpoint: str | Path | None = None, task: str = "classification"):
    """The model for ``checkpoint`` and ``task``, cached. "" / None: the offline ImageNet classifier
    for classification; captioning and VQA have no usable model before fine-tuning."""
    checkpoint = str(checkpoint or "").strip()
    if checkpoint == DEFAULT_MODEL and task == "classification":
        checkpoint = ""  # the registry name of the default: its ImageNet head, not the Hub
    elif checkpoint in DEFAULT_MODELS.values():
        raise UserInputError(f"'{checkpoint}' is a base model to fine-tune: it has not learned {task} yet. Fine-tune "
                             f"it on a {task} dataset first and use that run.")
    model_dir = model_dir_of(checkpoint) if checkpoint else None
    if model_dir is not None:
        trained_for = json.loads((model_dir / META_FILE).read_text()).get("task", "classification")
        if trained_for != task:
            raise UserInputError(f"This checkpoint was trained for {trained_for}, not {task}: use it for "
                                 f"{trained_for}, or choose a {task} run.")
        # The folder's mtime is part of the key, so a run that is saved again is reloaded.
        return _cached(str(model_dir), model_dir.stat().st_mtime_ns, task)
    if local_dir(checkpoint) is not None:
        raise UserInputError(f"'{Path(checkpoint).name}' holds no trained model yet; wait for the run to finish.")
    if not checkpoint and task_spec(task).hub_example:  # a task with no offline predictor
        raise UserInputError(f"No {task} model yet: fine-tune one on a {task} dataset and use its run, or give a "
                             f"Hub model id such as {HUB_EXAMPLES[task]} (needs the Hub).")
    return _cached(checkpoint, 0, task)


HUB_EXAMPLES = {name: spec.hub_example for name, spec in TASK_SPECS.items() if spec.hub_example}


@lru_cache(maxsize=4)
def _cached(key: str, _mtime: int, task: str):
    return task_spec(task).resolve("predictor")(key, task).eval()


def load_classifier_predictor(key: str, task: str = "classification") -> Classifier:
    """The classifier of a folder or a Hub id; "" the offline ImageNet one (the task registry's predictor)."""
    if not key:
        return imagenet_classifier()
    if local_dir(key):
        return load_classifier(key)
    return _hub_classifier(key)


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


# Parameter ranges; 0 means the default. Past 256 new tokens or 8 beams a request holds the model for
# long without a better caption or answer.
DEFAULT_TOP_K, MAX_TOP_K = 5, 1000
DEFAULT_NEW_TOKENS, MAX_NEW_TOKENS = {"captioning": 30, "vqa": 10}, 256
MAX_BEAMS = 8


def _check_images(images) -> list:
    if not images or any(image is None for image in images):
        raise UserInputError("No image given: give an image to predict on.")
    return list(images)


@torch.no_grad()
def classify_batch(images, checkpoint: str | Path | None = None, top_k: int = 5,
                   texts: list[str] | None = None) -> list[dict[str, float]]:
    """Top-k labels with probabilities for each of several PIL images, in one forward pass.

    Args:
        images: PIL images (any mode, any size).
        checkpoint: a run directory, a model folder, a Hub id, or None for the ImageNet default.
        top_k: how many labels to return per image, 1 to 1000 (at most the model's labels); 0: 5.
        texts: one text per image, for an image + text classification checkpoint (which needs them);
            an image-only classifier ignores them.
    """
    from .imagetext import TASK as IMAGE_TEXT, checkpoint_task

    images = _check_images(images)
    top_k = int_in_range("top_k", top_k, 1, MAX_TOP_K, DEFAULT_TOP_K)
    if checkpoint_task(checkpoint) == IMAGE_TEXT:
        from .imagetext import classify_batch as classify_with_text

        return classify_with_text(images, texts, checkpoint, top_k)
    clf = load_predictor(checkpoint, "classification")
    pre = clf.preprocess
    x = torch.stack([resize_center_crop(image, pre.image_size, pre.crop_pct) for image in images])
    probs = batcher.submit(("classify", clf), partial(_classify_rows, clf), x, len(x))
    top = probs.topk(min(top_k, probs.shape[-1]))
    return [{clf.labels[i]: round(float(p), 5) for p, i in zip(values, indices)}
            for values, indices in zip(top.values.tolist(), top.indices.tolist())]


@torch.no_grad()
def _classify_rows(clf: Classifier, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Probabilities for several callers' uint8 image stacks in one forward (the batcher's run function)."""
    device = _on_device(clf)
    pre = clf.preprocess
    x = normalize(torch.cat(pixels).to(device, non_blocking=True), pre.mean, pre.std, clf.channels_last_input)
    return list(clf(x).float().softmax(-1).cpu().split([len(p) for p in pixels]))


def preload() -> None:
    """The first classify call made ahead: torch's import, the offline default classifier's build and its
    first forward (on a blank image), so a server's first real call does not wait for them."""
    from PIL import Image

    classify(Image.new("RGB", (224, 224)), None, 1)


def classify(image, checkpoint: str | Path | None = None, top_k: int = 5, text: str | None = None) -> dict[str, float]:
    """Top-k labels with probabilities for one PIL image, and its text for an image + text checkpoint
    (see ``classify_batch``)."""
    return classify_batch([image], checkpoint, top_k, None if text is None else [text])[0]


@torch.no_grad()
def generate_batch(images, questions: list[str] | None, checkpoint: str | Path | None = None,
                   max_new_tokens: int = 30, num_beams: int = 1) -> list[str]:
    """Captions (``questions`` None) or answers (one question per image) for several PIL images at once."""
    images = _check_images(images)
    task = "captioning" if questions is None else "vqa"
    max_new_tokens = int_in_range("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, DEFAULT_NEW_TOKENS[task])
    num_beams = int_in_range("num_beams", num_beams, 1, MAX_BEAMS, 1)
    if questions is not None:
        wrong = next((q for q in questions if q is not None and not isinstance(q, str)), None)
        if wrong is not None:
            raise UserInputError(f"question must be text (got {shown(wrong)})")
        questions = [(q or "").strip() for q in questions]
        if len(questions) != len(images) or not all(questions):
            raise UserInputError("Type a question about the image first.")
    model = load_predictor(checkpoint, task)
    pixels = torch.stack([resize_center_crop(image, model.preprocess.image_size) for image in images])
    with _lock:
        _on_device(model)
        return model.generate(pixels, questions, max_new_tokens, num_beams)


def caption(image, checkpoint: str | Path | None = None, max_new_tokens: int = 30, num_beams: int = 1) -> str:
    """A caption for one PIL image from a captioning run directory or a Hub id."""
    return generate_batch([image], None, checkpoint, max_new_tokens, num_beams)[0]


def answer(image, question: str, checkpoint: str | Path | None = None, max_new_tokens: int = 10,
           num_beams: int = 1) -> str:
    """The answer to ``question`` about one PIL image, from a VQA run directory or a Hub id."""
    return generate_batch([image], [question], checkpoint, max_new_tokens, num_beams)[0]
