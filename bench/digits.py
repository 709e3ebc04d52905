"""Benchmark: the engine's default recipe vs a linear probe on scikit-learn's digits.

    python bench/digits.py                   # default recipe (TrainConfig with data/output_dir only)
    python bench/digits.py --image-size 96   # the one deviation allowed when 160 px is too slow

Steps: load_digits() (1,797 8x8 grey images, 10 classes) -> 32x32 RGB PNGs in class folders
0/ .. 9/ -> mmdemo.data.ingest_dataset (seeded, stratified 20% validation) ->
(a) mmdemo.training.train with the default recipe, (b) logistic regression on the frozen default
backbone's pooled features of the same split, at the same image size, without augmentation.

Prints one JSON line per figure ({"figure": ..., "value": ...}) and a final {"summary": ...} line.
The --lr / --epochs / --no-augment / --no-hflip flags exist only to investigate a default recipe
that loses to the probe; every deviation from the defaults is echoed in each JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import numpy as np
import torch

FIGURES: dict[str, float] = {}


def emit(figure: str, value, **extra) -> None:
    """One JSON line per measured figure, flushed so a background run can be polled."""
    FIGURES[figure] = value
    print(json.dumps({"figure": figure, "value": value, **extra}), flush=True)


def write_digits(root: Path, side: int) -> int:
    """Writes load_digits() as side x side RGB PNGs in one folder per digit; returns the count."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = (pixels * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)  # 0..16 ink -> 0..255
        image = Image.fromarray(grey, mode="L").resize((side, side), Image.BICUBIC).convert("RGB")
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.png")
    return len(digits.target)


def patch_no_hflip() -> None:
    """Investigation only: the engine's train augmentation without RandomHorizontalFlip."""
    from torchvision.transforms import v2

    from mmdemo import images

    original = images.ImageTensors.__init__

    def init(self, split, image_size, label_map, train):
        original(self, split, image_size, label_map, train)
        self.augment = v2.Compose([t for t in self.augment.transforms if not isinstance(t, v2.RandomHorizontalFlip)])

    images.ImageTensors.__init__ = init


@torch.no_grad()
def saved_model_accuracy(model_dir: Path, split, batch: int = 64) -> float:
    """Accuracy of the saved run_dir/model in eval mode, as mmdemo.inference would run it."""
    from mmdemo.images import normalize, resize_center_crop
    from mmdemo.models import load_classifier

    clf = load_classifier(model_dir).eval()
    pre = clf.preprocess
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    names = split.features["label"].names
    images, labels = split["image"], split["label"]
    correct = 0
    for i in range(0, len(images), batch):
        x = torch.stack([resize_center_crop(im, pre.image_size, pre.crop_pct) for im in images[i:i + batch]])
        preds = clf(normalize(x, mean, std)).argmax(-1).tolist()
        correct += sum(clf.labels[p] == names[y] for p, y in zip(preds, labels[i:i + batch]))
    return correct / len(labels)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_default_recipe(dataset_dir: str, run_dir: Path, args, deviations: dict) -> None:
    from mmdemo.config import TrainConfig
    from mmdemo.data import load_splits
    from mmdemo.training import train

    overrides = {k: v for k, v in (("image_size", args.image_size), ("epochs", args.epochs),
                                   ("learning_rate", args.lr), ("max_steps", args.max_steps)) if v}
    if args.no_augment:
        overrides["augment"] = False
    cfg = TrainConfig(data=dataset_dir, output_dir=str(run_dir), **overrides)
    t0 = time.time()
    result = train(cfg)
    seconds = time.time() - t0

    records = read_metrics(run_dir)
    start = next(r for r in records if r["type"] == "start")
    evals = [r for r in records if r["type"] == "eval"]
    steps = [r for r in records if r["type"] == "train"]
    # Between two eval lines: one training epoch + its validation pass + a checkpoint.
    marks = [start["time"]] + [r["time"] for r in evals]
    epoch_seconds = [round(b - a, 1) for a, b in zip(marks, marks[1:])]
    step_time = round(float(np.median([r["step_time"] for r in steps])), 3) if steps else None
    cfg = TrainConfig.load(run_dir / "config.yaml")  # as train() resolved it (image_size filled in)
    resolved = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
                "image_size": cfg.image_size, "augment": cfg.augment, "method": cfg.method,
                "base_model": cfg.base_model, "total_steps": start["total_steps"]}
    emit("digits_default_recipe_epoch_seconds", epoch_seconds, note="train epoch + validation + checkpoint",
         median_step_seconds=step_time, batch_size=cfg.batch_size, deviations=deviations)
    emit("digits_default_recipe_val_accuracy_per_epoch", [r["accuracy"] for r in evals], deviations=deviations)
    emit("digits_default_recipe_train_seconds", round(seconds, 1), note="train() wall time incl. model build, "
         "decode, final evaluation and saving", deviations=deviations)
    emit("digits_default_recipe_val_accuracy", result["accuracy"], num_val=result["num_val"],
         val_loss=result["val_loss"], recipe=resolved, deviations=deviations)
    saved = saved_model_accuracy(run_dir / "model", load_splits(dataset_dir)["validation"])
    emit("digits_saved_model_val_accuracy", round(saved, 5),
         note="run_dir/model reloaded, eval mode, same validation images", deviations=deviations)


@torch.no_grad()
def pooled_features(net, images, size, mean, std, batch=64) -> np.ndarray:
    from mmdemo.images import normalize, resize_center_crop

    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch):
        # The engine's validation path: resize + centre crop (crop_pct 1.0), normalise on the batch.
        x = torch.stack([resize_center_crop(im, size) for im in images[i:i + batch]])
        out.append(net.forward_head(net.forward_features(normalize(x, mean, std)), pre_logits=True).numpy())
    return np.concatenate(out)


def run_probe(dataset_dir: str, image_size: int, deviations: dict) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mmdemo.data import load_splits
    from mmdemo.models import build_classifier

    t0 = time.time()
    splits = load_splits(dataset_dir)
    classes = splits["train"].features["label"].names
    clf, _ = build_classifier("efficientnet_lite0", classes)
    clf.eval()
    size = image_size or clf.preprocess.image_size
    pre = clf.preprocess
    feats = {s: pooled_features(clf.net, splits[s]["image"], size, pre.mean, pre.std) for s in ("train", "validation")}
    labels = {s: np.asarray(splits[s]["label"]) for s in ("train", "validation")}
    t1 = time.time()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(feats["train"], labels["train"])
    accuracy = float((probe.predict(feats["validation"]) == labels["validation"]).mean())
    t2 = time.time()
    emit("digits_linear_probe_feature_seconds", round(t1 - t0, 1), num_train=len(labels["train"]),
         num_val=len(labels["validation"]), feature_dim=int(feats["train"].shape[1]), image_size=size)
    emit("digits_linear_probe_fit_seconds", round(t2 - t1, 1))
    emit("digits_linear_probe_seconds", round(t2 - t0, 1), note="features + fit")
    emit("digits_linear_probe_val_accuracy", round(accuracy, 5), image_size=size, deviations=deviations)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=0, help="0: the engine default (160 px)")
    parser.add_argument("--png-side", type=int, default=32, help="side of the PNGs written from the 8x8 digits")
    parser.add_argument("--epochs", type=int, default=0, help="investigation only; 0: default")
    parser.add_argument("--lr", type=float, default=0.0, help="investigation only; 0: default")
    parser.add_argument("--max-steps", type=int, default=0, help="timing probe only; 0: no limit")
    parser.add_argument("--no-augment", action="store_true", help="investigation only: augment=False")
    parser.add_argument("--no-hflip", action="store_true", help="investigation only: drop the horizontal flip")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-probe", action="store_true")
    parser.add_argument("--keep", default="", help="keep the workspace in this folder instead of a temp dir")
    args = parser.parse_args(argv)

    import datasets

    from mmdemo.data import ingest_dataset

    datasets.disable_progress_bars()  # one JSON line per figure, no progress noise in the log

    deviations = {k: v for k, v in (("image_size", args.image_size), ("epochs", args.epochs),
                                    ("learning_rate", args.lr), ("max_steps", args.max_steps),
                                    ("augment", False if args.no_augment else None),
                                    ("horizontal_flip", False if args.no_hflip else None)) if v}
    if args.no_hflip:
        patch_no_hflip()
    print(json.dumps({"info": "start", "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "loadavg": os.getloadavg(), "deviations": deviations}), flush=True)
    workspace = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mmdemo-digits-"))
    workspace.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    try:
        t0 = time.time()
        n = write_digits(workspace / "digits", args.png_side)
        summary = ingest_dataset(workspace / "digits", workspace, val_fraction=0.2, seed=0)
        emit("digits_ingest_seconds", round(time.time() - t0, 1), images=n, num_train=summary.num_train,
             num_val=summary.num_val, warnings=summary.warnings)
        if not args.skip_train:
            run_default_recipe(summary.path, workspace / "run", args, deviations)
        if not args.skip_probe:
            run_probe(summary.path, args.image_size, deviations)
    finally:
        if not args.keep:
            shutil.rmtree(workspace, ignore_errors=True)

    default, probe = FIGURES.get("digits_default_recipe_val_accuracy"), FIGURES.get("digits_linear_probe_val_accuracy")
    verdict = None if default is None or probe is None else default > probe
    final = {**FIGURES, "default_beats_probe": verdict, "total_seconds": round(time.time() - t_all, 1),
             "loadavg_end": os.getloadavg(), "deviations": deviations}
    print(json.dumps({"summary": final}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
