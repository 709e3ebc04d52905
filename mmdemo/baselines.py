"""Advice before training: what the offline backbone gives a classification dataset with no fine-tuning.

Right after a dataset is loaded, in seconds: the frozen pooled features of the offline default backbone
(computed once per dataset and kept in ``DATASET/features/``), a k-shot curve (k = 1, 2, 4, 8, 16 images
per class, several random draws), the full-data baselines on the validation split, and a recommended
recipe with its predicted time. The report is saved as ``DATASET/baselines.json``.

The rows come from registered baseline providers (``register_baseline``): each one gets the same
``BaselineData`` (features, labels, the validation images on demand) and returns rows of
``{"baseline", "shots", "accuracy", "std", "draws", "seconds"}``; ``shots`` is images per class, ``None``
for the whole training split, 0 for a method that uses no training image. Nearest class mean and the
logistic-regression linear probe are registered here.

    report = baseline_report(dataset_dir)
    report["recommendation"]["method"]   # "head", "lora" or "full"

No torch at import: the backbone loads when features are first computed.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UserInputError
from .runs import read_json, write_json_atomic

BACKBONE = "efficientnet_lite0"
# The default recipe's input side (models._build_default): the probe sees what fine-tuning would.
FEATURE_SIZE = 160
SHOTS = (1, 2, 4, 8, 16)
# Random draws of the k-shot training images per k: nearest class mean takes microseconds, a probe fit
# about 0.1 to 0.3 s on 2 busy CPU cores (1280 features), so it gets fewer.
NCM_DRAWS, PROBE_DRAWS = 10, 3
# Beyond this many rows per split the baselines use a stratified sample: features cost 50 to 100 ms per
# image at 160 px on 2 CPU cores, and the advice must come in seconds, not many minutes.
MAX_ROWS = 1000
FEATURES_DIR = "features"
REPORT_FILE = "baselines.json"
REPORT_VERSION = 1
# Recommendation thresholds on the full-data linear probe's validation accuracy (see ``recommend``).
HEAD_ENOUGH = 0.95
LORA_ENOUGH = 0.85

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass
class BaselineData:
    """What a baseline provider works from: pooled features and labels of both splits, the class names,
    and (on demand) the validation images, for providers that need pixels (zero-shot)."""

    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    dataset_dir: Path
    val_rows: list[int] = field(default_factory=list)

    def val_images(self, picked=None) -> list:
        """The PIL images of the validation rows the baselines use, in the order of ``val_y`` (only the
        positions ``picked`` of that order, when given: a provider that needs a few decodes only those)."""
        from .data import load_splits

        rows = self.val_rows if picked is None else [self.val_rows[int(i)] for i in picked]
        return load_splits(self.dataset_dir)["validation"].select(rows)["image"]


BaselineProvider = Callable[[BaselineData], list[dict]]
BASELINES: dict[str, BaselineProvider] = {}


def register_baseline(name: str):
    """Registers a provider under ``name`` (the report lists providers in registration order)."""
    def add(fn: BaselineProvider) -> BaselineProvider:
        if name in BASELINES:
            raise ValueError(f"baseline {name!r} is registered twice")
        BASELINES[name] = fn
        return fn
    return add


def row(baseline: str, shots: int | None, scores: list[float], seconds: float) -> dict:
    """One report row: the mean accuracy of ``scores`` (one per draw) and their spread."""
    return {"baseline": baseline, "shots": shots, "accuracy": round(float(np.mean(scores)), 4),
            "std": round(float(np.std(scores)), 4), "draws": len(scores), "seconds": round(seconds, 3)}


def k_shot_indices(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` random training rows of every class (all of a class's rows where it has fewer)."""
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), size=min(k, int((labels == c).sum())), replace=False)
              for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def usable_shots(labels: np.ndarray) -> list[int]:
    """The k of SHOTS that every class of the training split can supply."""
    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    return [k for k in SHOTS if k <= smallest]


def _curve(name: str, data: BaselineData, fit_predict, draws: int) -> list[dict]:
    """The k-shot rows (``draws`` draws each) and the full-data row of one method."""
    rows = []
    for k in usable_shots(data.train_y):
        t0, scores = time.perf_counter(), []
        for draw in range(draws):
            idx = k_shot_indices(data.train_y, k, seed=draw)
            scores.append(float((fit_predict(data.train_x[idx], data.train_y[idx], data.val_x) == data.val_y).mean()))
        rows.append(row(name, k, scores, time.perf_counter() - t0))
    t0 = time.perf_counter()
    full = float((fit_predict(data.train_x, data.train_y, data.val_x) == data.val_y).mean())
    rows.append(row(name, None, [full], time.perf_counter() - t0))
    return rows


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_class_mean(train_x, train_y, val_x) -> np.ndarray:
    """Cosine similarity to each class's mean unit feature; the most similar class wins."""
    classes = np.unique(train_y)
    means = _unit(np.stack([_unit(train_x[train_y == c]).mean(0) for c in classes]))
    return classes[np.argmax(_unit(val_x) @ means.T, axis=1)]


def linear_probe(train_x, train_y, val_x) -> np.ndarray:
    """Standardised features + multinomial logistic regression (as in bench/digits.py's probe)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        return np.full(len(val_x), train_y[0])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    with warnings.catch_warnings():  # a fit stopped at max_iter still scores: its accuracy is the figure
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(train_x, train_y).predict(val_x)


@register_baseline("nearest class mean")
def ncm_baseline(data: BaselineData) -> list[dict]:
    return _curve("nearest class mean", data, nearest_class_mean, NCM_DRAWS)


@register_baseline("linear probe")
def probe_baseline(data: BaselineData) -> list[dict]:
    return _curve("linear probe", data, linear_probe, PROBE_DRAWS)


# Zero-shot runs the offline ImageNet-based classifier on pixels (224 px, not the cached features): a
# seeded sample of this many validation images keeps the advice within seconds.
ZERO_SHOT_IMAGES = 200


@register_baseline("zero-shot")
def zero_shot_baseline(data: BaselineData) -> list[dict]:
    """The class names as free-text labels, no training image (mmdemo.zeroshot's offline classifier)."""
    from .zeroshot import zero_shot_batch

    t0 = time.perf_counter()
    picked = np.sort(np.random.default_rng(0).permutation(len(data.val_y))[:ZERO_SHOT_IMAGES])
    probs = zero_shot_batch(data.val_images(picked), data.classes)
    hits = [max(p, key=p.get) == data.classes[data.val_y[i]] for p, i in zip(probs, picked)]
    return [row("zero-shot", 0, [float(np.mean(hits))], time.perf_counter() - t0)]


# ---------------------------------------------------------------------------------------------
# Features


def _sample_rows(labels: list[int], limit: int) -> list[int]:
    """All rows, or a stratified sample of ``limit`` rows (seeded) when there are more."""
    if len(labels) <= limit:
        return list(range(len(labels)))
    rng = np.random.default_rng(0)
    labels = np.asarray(labels)
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        keep.append(rng.choice(rows, size=max(1, round(limit * len(rows) / len(labels))), replace=False))
    return sorted(int(i) for i in np.concatenate(keep))


def pooled_features(images, batch_size: int = 64):
    """The offline backbone's pooled features (N x 1280, float32) of PIL images at FEATURE_SIZE px,
    centre-cropped and normalised as the default recipe validates."""
    import torch

    from .images import normalize, resize_center_crop
    from .models import lite0_encoder

    encoder = lite0_encoder().eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.stack([resize_center_crop(img, FEATURE_SIZE) for img in images[start:start + batch_size]])
            # channels-last: 1.76x faster batch forward of this CNN on 2 CPU cores (models.prefers_channels_last)
            out.append(encoder(normalize(x, (0.5,) * 3, (0.5,) * 3, channels_last=True)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.num_features), dtype=np.float32)


def cached_features(dataset_dir: Path) -> tuple[BaselineData, dict]:
    """The features of both splits, from ``DATASET/features/`` or computed (then saved) once; and how long
    they took (``{"feature_seconds", "features_cached"}``)."""
    from .data import load_splits

    dataset_dir = Path(dataset_dir)
    path = dataset_dir / FEATURES_DIR / f"{BACKBONE}-{FEATURE_SIZE}.npz"
    splits = load_splits(dataset_dir)
    classes = list(splits["train"].features["label"].names)
    t0 = time.perf_counter()
    if path.is_file():
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        cached = True
    else:
        arrays = {}
        for split in ("train", "validation"):
            rows = _sample_rows(splits[split]["label"], MAX_ROWS)
            subset = splits[split].select(rows)
            arrays[f"{split}_x"] = pooled_features(subset["image"])
            arrays[f"{split}_y"] = np.asarray(subset["label"], dtype=np.int64)
            arrays[f"{split}_rows"] = np.asarray(rows, dtype=np.int64)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)  # atomic: a second reader sees all of it or nothing
        cached = False
    data = BaselineData(classes, arrays["train_x"], arrays["train_y"], arrays["validation_x"],
                        arrays["validation_y"], dataset_dir, arrays["validation_rows"].tolist())
    return data, {"feature_seconds": round(time.perf_counter() - t0, 3), "features_cached": cached}


# ---------------------------------------------------------------------------------------------
# The report


def baseline_report(dataset_dir: Path, *, gpu: bool | None = None) -> dict:
    """The baselines of a classification dataset and the recommended recipe (cached in baselines.json,
    recomputed from the cached features when the registered providers change).

    Returns:
        ``{"dataset_id", "backbone", "image_size", "num_train", "num_val", "sampled", "rows",
        "probe_accuracy", "ncm_accuracy", "recommendation", "feature_seconds", "features_cached",
        "fit_seconds", "cached"}``.

    Raises:
        UserInputError: the dataset is not a classification dataset, or has no validation images.
    """
    from .data import load_summary

    dataset_dir = Path(dataset_dir)
    summary = load_summary(dataset_dir)
    if summary.task != "classification":
        raise UserInputError(f"Baselines are computed for classification datasets; this one is {summary.task}. "
                             "Load a classification dataset (class folders or a label column).")
    if not summary.num_val:
        raise UserInputError("This dataset has no validation images to measure baselines on; upload at least "
                             "2 images per class so that some can be held out.")
    with _lock_for(dataset_dir):
        saved = read_json(dataset_dir / REPORT_FILE)
        if saved.get("version") == REPORT_VERSION and saved.get("providers") == list(BASELINES):
            return {**saved, "recommendation": recommend(summary, saved["probe_accuracy"], gpu), "cached": True}
        data, timing = cached_features(dataset_dir)
        t0 = time.perf_counter()
        rows = [r for provider in BASELINES.values() for r in provider(data)]
        report = {"version": REPORT_VERSION, "providers": list(BASELINES), "dataset_id": summary.dataset_id,
                  "backbone": BACKBONE, "image_size": FEATURE_SIZE, "num_train": int(len(data.train_y)),
                  "num_val": int(len(data.val_y)),
                  "sampled": bool(len(data.train_y) < summary.num_train or len(data.val_y) < summary.num_val),
                  "rows": rows, "probe_accuracy": _full_accuracy(rows, "linear probe"),
                  "ncm_accuracy": _full_accuracy(rows, "nearest class mean"), **timing,
                  "fit_seconds": round(time.perf_counter() - t0, 3)}
        write_json_atomic(dataset_dir / REPORT_FILE, report)
    return {**report, "recommendation": recommend(summary, report["probe_accuracy"], gpu), "cached": False}


def saved_report(dataset_dir: Path) -> dict:
    """The baselines.json of a dataset ({} before ``baseline_report`` ran on it)."""
    return read_json(Path(dataset_dir) / REPORT_FILE)


def _full_accuracy(rows: list[dict], baseline: str) -> float | None:
    return next((r["accuracy"] for r in rows if r["baseline"] == baseline and r["shots"] is None), None)


def _lock_for(dataset_dir: Path) -> threading.Lock:
    # Two requests for the same new dataset compute its features once; other datasets do not wait.
    with _locks_guard:
        return _locks.setdefault(str(dataset_dir.resolve()), threading.Lock())


METHOD_LABELS = {"head": "head only is enough", "lora": "LoRA", "full": "full fine-tune"}
# A training step of the default classifier (batch 16, 160 px, 2 CPU cores) relative to a full step, from
# bench/advice.py: the head trains on a frozen backbone (no backward through it), LoRA and BitFit still
# backpropagate through every layer. jobs.CPU_COST was measured with the full method.
METHOD_STEP_COST = {"full": 1.0, "head": 0.25, "lora": 0.88, "bitfit": 0.85}


def recommended_method(probe_accuracy: float | None) -> str:
    """The classification method ``recommend`` picks for a linear probe's validation accuracy."""
    if probe_accuracy is None:
        return "full"
    return "head" if probe_accuracy >= HEAD_ENOUGH else "lora" if probe_accuracy >= LORA_ENOUGH else "full"


def recommend(summary, probe_accuracy: float | None, gpu: bool | None = None) -> dict:
    """The recipe to start with, from the frozen features' linear probe on the validation split.

    The probe is what training the head alone reaches at most (roughly: the head method trains that
    same linear layer, with augmentation). At HEAD_ENOUGH or more, fine-tuning the backbone can win only
    the few points left, at several times the cost: head only. From LORA_ENOUGH the features are close,
    and a low-rank update adapts them at a fraction of the trainable parameters: LoRA. Below, the
    pretrained features miss what separates the classes: full fine-tune.

    ``cpu_seconds`` is ``jobs.estimate_cpu_seconds`` for that method's default recipe (epochs x training
    rows x 0.06 s + evaluations x validation rows x 0.02 s: ``jobs.CPU_COST``, measured with the full
    recipe on the bundled samples on 2 CPU cores) times the method's METHOD_STEP_COST; None where a GPU
    is visible.
    """
    from . import jobs
    from .config import TrainConfig
    from .progress import format_duration

    method = recommended_method(probe_accuracy)
    cfg = TrainConfig(data=summary.path or "-", output_dir="-", task="classification", method=method)
    gpu = jobs.has_gpu() if gpu is None else gpu
    seconds = None if gpu else round(jobs.estimate_cpu_seconds(summary, cfg) * METHOD_STEP_COST[method], 1)
    when = f", about {format_duration(seconds)} on this machine's CPU" if seconds is not None else " (on the GPU)"
    probe = "no probe" if probe_accuracy is None else f"the frozen {BACKBONE} features' linear probe reaches " \
                                                       f"{probe_accuracy:.1%} on the validation split"
    return {"method": method, "label": METHOD_LABELS[method], "epochs": cfg.epochs, "cpu_seconds": seconds,
            "text": f"{METHOD_LABELS[method][0].upper()}{METHOD_LABELS[method][1:]}{when}: {probe}.",
            "estimate": f"(epochs x training images x 0.06 s + evaluations x validation images x 0.02 s) x "
                        f"{METHOD_STEP_COST[method]} (the full recipe measured on 2 CPU cores, mmdemo.jobs.CPU_COST; "
                        f"a {method} step costs {METHOD_STEP_COST[method]} of a full one, bench/advice.py)"}


def training_vs_baselines(run_dir: Path) -> dict | None:
    """A finished classification run's validation accuracy next to its dataset's full-data baselines
    (and any zero-shot row): ``{"rows": [{"model", "accuracy"}], "verdict"}``; None without both."""
    from .runs import read_config, read_eval

    result, cfg = read_eval(run_dir), read_config(run_dir)
    if result.get("task", "classification") != "classification" or "accuracy" not in result:
        return None
    report = saved_report(cfg.get("data", "")) if cfg.get("data") else {}
    rows = [r for r in report.get("rows", []) if r["shots"] in (None, 0)]
    if not rows:
        return None
    tuned = float(result["accuracy"])
    table = [{"model": f"fine-tuned ({cfg.get('method', '')}, {Path(str(cfg.get('base_model', ''))).name})",
              "accuracy": round(tuned, 4)}]
    table += [{"model": f"{r['baseline']} ({'no training images' if r['shots'] == 0 else 'frozen ' + BACKBONE})",
               "accuracy": r["accuracy"]} for r in rows]
    best = max(rows, key=lambda r: r["accuracy"])
    gap = (tuned - best["accuracy"]) * 100
    sample = f" (baselines on a sample of {report['num_val']} validation images)" if report.get("sampled") else ""
    verdict = (f"Training beat the base model: {tuned:.1%} against the best baseline ({best['baseline']}, "
               f"{best['accuracy']:.1%}), {gap:+.1f} points{sample}." if gap > 0 else
               f"Training did not beat the base model: {tuned:.1%} against {best['baseline']} at "
               f"{best['accuracy']:.1%} ({gap:+.1f} points{sample}). Try the head method, more epochs, or more images.")
    return {"rows": table, "verdict": verdict}
