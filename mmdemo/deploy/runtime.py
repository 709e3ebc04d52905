"""An exported ONNX variant run in onnxruntime (the Classify tab's side-by-side answers): no torch.

A checkpoint spelled ``RUN_ID/onnx/model_int8.onnx`` names the variant exported into that run's ``onnx/``
folder (``api.export_onnx``); like every checkpoint it resolves only among the caller's own runs.
"""

from __future__ import annotations

import json
import re
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import UserInputError
from .onnx import FILES, INPUT

RUN_ONNX_DIR = "onnx"  # RUN/onnx/: the export the app writes
ONNX_REF = re.compile(r"^([0-9a-f]{32})/" + RUN_ONNX_DIR + r"/(model(?:_int8|_fp16)?\.onnx)$")
_lock = threading.Lock()


def onnx_checkpoint(workspace, checkpoint) -> Path | None:
    """The ONNX file a checkpoint ``RUN_ID/onnx/FILE`` names in the caller's workspace; None for any other text.

    Raises:
        UserInputError: the caller has no such run, or the run has no such export yet.
    """
    from ..runs import find_run

    match = ONNX_REF.match(str(checkpoint or "").strip())
    if not match:
        return None
    path = find_run(workspace, match.group(1)) / RUN_ONNX_DIR / match.group(2)
    if not path.is_file():
        raise UserInputError(f"Run {match.group(1)[:8]} has no {match.group(2)} yet: export it to ONNX first (the run's "
                             f"Deploy section, or export --format onnx).")
    return path


def onnx_choices(run_dir: Path, label: str) -> list[tuple[str, str]]:
    """(label, checkpoint) for each ONNX variant exported into ``run_dir/onnx``."""
    folder = Path(run_dir) / RUN_ONNX_DIR
    return [(f"{label} · ONNX {kind}", f"{Path(run_dir).name}/{RUN_ONNX_DIR}/{name}")
            for kind, name in FILES.items() if (folder / name).is_file()]


def preprocess(image, pre: dict) -> np.ndarray:
    """A PIL image as the model's input (1 x 3 x S x S float32): the engine's resize, centre crop and
    normalisation, in numpy (what the card's snippet does)."""
    from PIL import Image

    from ..data.decode import to_rgb

    image, s = to_rgb(image), int(pre["image_size"])
    k = s / float(pre.get("crop_pct", 1.0)) / min(image.size)
    w, h = max(s, round(image.width * k)), max(s, round(image.height * k))
    left, top = (w - s) // 2, (h - s) // 2
    image = image.resize((w, h), Image.BICUBIC).crop((left, top, left + s, top + s))
    x = (np.asarray(image, np.float32) / 255 - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


@lru_cache(maxsize=4)
def _loaded(path: str, _mtime: int):
    from ..runs import meta_labels
    from .lab import session

    meta = json.loads((Path(path).parent / "mmdemo.json").read_text())
    labels = meta_labels(meta)
    return session(Path(path)), meta["preprocess"], labels


def classify_onnx(image, path: Path, top_k: int = 5) -> dict[str, float]:
    """Top-k labels with probabilities from an exported ONNX classifier (its folder's mmdemo.json says how)."""
    from ..checks import int_in_range

    if image is None:
        raise UserInputError("No image given: give an image to predict on.")
    top_k = int_in_range("top_k", top_k, 1, 1000, 5)
    sess, pre, labels = _loaded(str(path), Path(path).stat().st_mtime_ns)
    with _lock:
        logits = sess.run(None, {INPUT: preprocess(image, pre)})[0][0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:top_k]
    return {labels[i]: round(float(probs[i]), 5) for i in top}


def generate_onnx(encoder, decoder, pixels: np.ndarray, prompts: list[list[int]], sep_id: int, pad_id: int,
                  max_new_tokens: int = 20) -> list[list[int]]:
    """Greedy generation over an exported captioner's onnxruntime sessions, as ``ComposedCaptioner.generate``
    (num_beams=1) does: the new token ids of each row (``[SEP]`` and the padding after it included; decode them
    skipping special tokens).

    Args:
        encoder, decoder: sessions of ``encoder*.onnx`` (pixel_values -> memory) and ``decoder*.onnx``
            (input_ids, memory -> the last position's logits).
        pixels: preprocessed images, N x 3 x S x S float32, one per prompt.
        prompts: each row's start: ``[CLS]`` (captioning) or the tokenised question (VQA).
    """
    memory = encoder.run(None, {INPUT: pixels})[0]
    results: list[list[int]] = [[] for _ in prompts]
    # Prompts of one length share a batch (BERT's absolute positions make left padding unsafe); without a KV
    # cache each step runs the whole sequence again, which for answers and captions of a few tokens costs little.
    for length in sorted({len(p) for p in prompts}):
        idx = [i for i, p in enumerate(prompts) if len(p) == length]
        ids, done = np.array([prompts[i] for i in idx], np.int64), np.zeros(len(idx), bool)
        for _ in range(max_new_tokens):
            logits = decoder.run(None, {"input_ids": ids, "memory": memory[idx]})[0]
            token = np.where(done, pad_id, logits.argmax(-1))
            ids, done = np.concatenate([ids, token[:, None]], 1), done | (token == sep_id)
            if done.all():
                break
        for row, i in enumerate(idx):
            results[i] = ids[row, length:].tolist()
    return results
