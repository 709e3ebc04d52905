"""Benchmark: the engine's default classification recipe against the baselines an expert tries first.

    nice -n 5 python bench/recipes.py --dataset digits        # one dataset (a few minutes on 2 cores)
    nice -n 5 python bench/recipes.py --dataset all --seeds 0 1

Four small offline datasets of different kinds, each with a fixed held-out test split that no method
sees while training (the engine also gets a fixed validation split, carved from the same source and
used only for its own choices, such as keeping the best epoch):

| name | source | classes | train / validation / test per class | native side |
|---|---|---|---|---|
| digits | scikit-learn ``load_digits`` (8x8 grey glyphs, written as 32x32 PNGs) | 10 | 30 / 10 / 20 | 32 |
| shapes | easy-VQA images labelled with their shape (from the Q/A pairs) | 3 | 30 / 10 / 30 | 64 |
| faces | scikit-image ``lfw_subset`` (25x25 grey patches): face vs non-face | 2 | 50 / 15 / 35 | 25 |
| photos | crops of scikit-image sample photos, one class per photo; train crops from the left 60%, validation / test from the right 40% of each photo (no shared pixels) | 8 | 30 / 10 / 20 | 96 |

Methods, all on EfficientNet-Lite0 with the package's ImageNet weights:
- ``linear_probe``: logistic regression (StandardScaler + LogisticRegression) on frozen pooled features,
  at 128 px and at the size the engine's default picks; the better of the two is the figure.
- ``class_mean``: nearest class mean of L2-normalised frozen features (same sizes).
- ``naive_ft``: everything trained, AdamW 1e-3 (weight decay 0.01), one-cycle, batch 16, 5 epochs at
  128 px, cross-entropy, no augmentation, the last epoch's weights (``--naive-set`` turns on some of the
  engine's settings in this loop, e.g. ``label_smoothing=0.1 freeze_early=on drop_last=on channels_last=on``).
- ``default``: ``mmdemo.training.train(TrainConfig(data, output_dir))`` (every other field at its default),
  then the saved run_dir/model on the test split.

Prints one JSON line per figure (bench/benchlib.py) and a ``{"summary": ...}`` line; each line carries the
1-minute load average. Times are wall (``seconds``) and CPU (``cpu_seconds``) seconds of the whole method
(decode, training, final prediction; the engine's run also writes its reports: model, confusion matrix,
replay memory); ``train_seconds`` is the training loop's wall time alone (steps and evaluations).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402  (puts the repository on sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

PER_CLASS = {"digits": (30, 10, 20), "shapes": (30, 10, 30), "faces": (50, 15, 35), "photos": (30, 10, 20)}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "grass", "gravel", "brick")
NAIVE = {"learning_rate": 1e-3, "weight_decay": 0.01, "batch_size": 16, "epochs": 5, "image_size": 128}
PROBE_SIZE = 128


def _split_counts(name: str) -> dict:
    train, val, test = PER_CLASS[name]
    return {"train": train, "validation": val, "test": test}


def _save(root: Path, split: str, label: str, index: int, image: Image.Image) -> None:
    folder = root / split / label
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{index:04d}.png")


def _write_per_class(root: Path, name: str, images_of: dict) -> None:
    """``images_of``: label -> images in a fixed order; the first go to train, then validation, then test."""
    counts = _split_counts(name)
    for label, images in images_of.items():
        start = 0
        for split, n in counts.items():
            for i, image in enumerate(images[start:start + n]):
                _save(root, split, label, i, image)
            start += n


def build_digits(root: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images_of: dict = {}
    for pixels, label in zip(digits.images, digits.target):
        grey = (pixels * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
        images_of.setdefault(str(int(label)), []).append(
            Image.fromarray(grey, mode="L").resize((32, 32), Image.BICUBIC).convert("RGB"))
    _write_per_class(root, "digits", images_of)


def build_shapes(root: Path) -> None:
    from easy_vqa import get_train_image_paths, get_train_questions

    paths = get_train_image_paths()
    shape_of = {}
    for _question, answer, image_id in zip(*get_train_questions()):
        if answer in ("circle", "rectangle", "triangle"):
            shape_of.setdefault(image_id, answer)
    images_of: dict = {}
    for image_id in sorted(shape_of):
        images_of.setdefault(shape_of[image_id], []).append(Image.open(paths[image_id]).convert("RGB"))
    _write_per_class(root, "shapes", images_of)


def build_faces(root: Path) -> None:
    from skimage.data import lfw_subset

    patches = lfw_subset()  # the first 100 are faces, the next 100 not
    rng = random.Random(0)
    images_of = {}
    for label, block in (("face", patches[:100]), ("not_face", patches[100:])):
        order = list(range(len(block)))
        rng.shuffle(order)
        images_of[label] = [Image.fromarray((block[i] * 255).round().astype(np.uint8), mode="L").convert("RGB")
                            for i in order]
    _write_per_class(root, "faces", images_of)


def _random_crops(photo: np.ndarray, n: int, rng: random.Random, side: int = 96) -> list[Image.Image]:
    h, w = photo.shape[:2]
    crops = []
    for _ in range(n):
        c = rng.randint(min(h, w) // 6, min(h, w) // 3)
        top, left = rng.randint(0, h - c), rng.randint(0, w - c)
        crop = Image.fromarray(photo[top:top + c, left:left + c]).convert("RGB")
        crops.append(crop.resize((side, side), Image.BICUBIC))
    return crops


def build_photos(root: Path) -> None:
    from skimage import data

    rng = random.Random(0)
    counts = _split_counts("photos")
    for label in PHOTOS:
        photo = getattr(data, label)()
        cut = int(photo.shape[1] * 0.6)  # train crops from the left part, held-out crops from the right
        parts = {"train": photo[:, :cut], "validation": photo[:, cut:], "test": photo[:, cut:]}
        for split, n in counts.items():
            for i, image in enumerate(_random_crops(parts[split], n, rng)):
                _save(root, split, label, i, image)


BUILDERS = {"digits": build_digits, "shapes": build_shapes, "faces": build_faces, "photos": build_photos}


def load_folder(root: Path, split: str, classes: list[str]) -> tuple[list[Image.Image], np.ndarray]:
    images, labels = [], []
    for k, label in enumerate(classes):
        for path in sorted((root / split / label).glob("*.png")):
            images.append(Image.open(path).convert("RGB"))
            labels.append(k)
    return images, np.asarray(labels)


# ---------------------------------------------------------------------------------------------
# Methods


def _lite0(num_classes: int):
    from mmdemo.models import build_classifier

    clf, _ = build_classifier("efficientnet_lite0", [str(i) for i in range(num_classes)])
    return clf


def _pixels(images, size: int) -> torch.Tensor:
    from mmdemo.images import resize_center_crop

    return torch.stack([resize_center_crop(im, size) for im in images])


def _normalised(x: torch.Tensor) -> torch.Tensor:
    from mmdemo.images import normalize

    return normalize(x, (0.5,) * 3, (0.5,) * 3, channels_last=True)


@torch.no_grad()
def pooled(net, images, size: int, batch: int = 64) -> np.ndarray:
    net.eval()
    x = _pixels(images, size)
    return np.concatenate([net.forward_head(net.forward_features(_normalised(x[i:i + batch])), pre_logits=True).numpy()
                           for i in range(0, len(x), batch)])


def frozen_feature_methods(data: dict, classes: list[str], size: int) -> dict:
    """Linear probe and nearest class mean on the frozen features at ``size``: accuracies and seconds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.time()
    net = _lite0(len(classes)).net
    feats = {s: pooled(net, data[s][0], size) for s in ("train", "test")}
    t_feat = time.time() - t0
    y_train, y_test = data["train"][1], data["test"][1]
    t1 = time.time()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(feats["train"], y_train)
    lp = float((probe.predict(feats["test"]) == y_test).mean())
    t_lp = time.time() - t1
    t2 = time.time()
    unit = {s: f / np.linalg.norm(f, axis=1, keepdims=True) for s, f in feats.items()}
    means = np.stack([unit["train"][y_train == k].mean(0) for k in range(len(classes))])
    ncm = float(((unit["test"] @ means.T).argmax(1) == y_test).mean())
    t_ncm = time.time() - t2
    return {"linear_probe": (lp, round(t_feat + t_lp, 1)), "class_mean": (ncm, round(t_feat + t_ncm, 1))}


# The naive loop's switches (``--naive-set``), each one of the engine's settings, to tell which of them moves a
# figure: label smoothing, the early layers frozen (mmdemo.recipe.freeze_early), the last partial batch dropped,
# channels-last input.
NAIVE_SWITCHES = {"label_smoothing": 0.0, "freeze_early": False, "drop_last": False, "channels_last": False}


def naive_finetune(data: dict, classes: list[str], seed: int, **switches) -> tuple[float, float]:
    """AdamW + one-cycle, everything trained, no augmentation or other tricks; test accuracy, seconds."""
    from mmdemo.recipe import freeze_early

    sw = {**NAIVE_SWITCHES, **switches}
    torch.manual_seed(seed)
    t0, c0 = time.time(), time.process_time()
    net = _lite0(len(classes)).net
    if sw["freeze_early"]:
        freeze_early(net)
    x_train, y_train = _pixels(data["train"][0], NAIVE["image_size"]), torch.as_tensor(data["train"][1])
    bs, epochs = NAIVE["batch_size"], NAIVE["epochs"]
    steps_per_epoch = len(x_train) // bs if sw["drop_last"] and len(x_train) > bs else -(-len(x_train) // bs)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=NAIVE["learning_rate"],
                            weight_decay=NAIVE["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, NAIVE["learning_rate"], total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    if sw["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    t1, c1 = time.time(), time.process_time()
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x_train), generator=g).split(bs)[:steps_per_epoch]:
            x = _normalised(x_train[idx])
            if sw["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = torch.nn.functional.cross_entropy(net(x), y_train[idx], label_smoothing=sw["label_smoothing"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    loop = {"train_seconds": round(time.time() - t1, 1), "train_cpu_seconds": round(time.process_time() - c1, 1)}
    accuracy = _net_accuracy(net, data["test"], NAIVE["image_size"])
    return accuracy, round(time.time() - t0, 1), round(time.process_time() - c0, 1), loop


@torch.no_grad()
def _net_accuracy(net, split, size: int, batch: int = 64) -> float:
    net.eval()
    x, y = _pixels(split[0], size), torch.as_tensor(split[1])
    preds = torch.cat([net(_normalised(x[i:i + batch])).argmax(-1) for i in range(0, len(x), batch)])
    return float((preds == y).float().mean())


def engine_default(dataset_dir: str, run_dir: Path, data: dict, classes: list[str], seed: int,
                   overrides: dict | None = None) -> dict:
    """``train`` with the default TrainConfig (only the seed set, plus ``--set`` values when a candidate
    change is measured), then the saved model on the test split."""
    from mmdemo.config import TrainConfig
    from mmdemo.models import load_classifier
    from mmdemo.training import train

    t0, c0 = time.time(), time.process_time()
    result = train(TrainConfig(data=dataset_dir, output_dir=str(run_dir), seed=seed, **(overrides or {})))
    seconds, cpu = round(time.time() - t0, 1), round(time.process_time() - c0, 1)
    clf = load_classifier(run_dir / "model")
    order = [clf.labels.index(c) for c in classes]  # model output index of each dataset class
    net = clf.net
    net.eval()
    x, y = _pixels(data["test"][0], clf.preprocess.image_size), torch.as_tensor(data["test"][1])
    with torch.no_grad():
        logits = torch.cat([net(_normalised(x[i:i + 64])) for i in range(0, len(x), 64)])
    preds = logits[:, order].argmax(-1)
    cfg = TrainConfig.load(run_dir / "config.yaml")
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in ("data", "output_dir")}
    # The training loop alone (first to last metrics record: steps and evaluations), without the run's setup
    # and its reports (model, confusion matrix, replay memory).
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"accuracy": float((preds == y).float().mean()), "seconds": seconds, "cpu_seconds": cpu,
            "val_accuracy": result["accuracy"], "train_seconds": round(times[-1] - times[0], 1),
            "image_size": clf.preprocess.image_size, "recipe": recipe}


# ---------------------------------------------------------------------------------------------


def run_dataset(name: str, workspace: Path, seeds: list[int], skip: set, overrides: dict | None = None,
                probe_sizes: tuple = (), naive_switches: dict | None = None) -> dict:
    from mmdemo.data import ingest_dataset

    raw = workspace / name
    BUILDERS[name](raw)
    classes = sorted(p.name for p in (raw / "train").iterdir())
    data = {s: load_folder(raw, s, classes) for s in ("train", "validation", "test")}
    # The engine's dataset: train + validation only; the test split stays with the benchmark.
    upload = workspace / f"{name}-upload"
    for split in ("train", "validation"):
        shutil.copytree(raw / split, upload / split)
    summary = ingest_dataset(upload, workspace / "ws", seed=0)
    benchlib.emit(f"{name}_dataset", {s: len(d[1]) for s, d in data.items()}, classes=len(classes),
                  warnings=summary.warnings)
    row: dict = {}
    defaults = []
    if "default" not in skip:
        for seed in seeds:
            d = engine_default(summary.path, workspace / f"run-{name}-{seed}", data, classes, seed, overrides)
            defaults.append(d)
            benchlib.emit(f"{name}_default_test_accuracy", round(d["accuracy"], 4), seed=seed, seconds=d["seconds"],
                          cpu_seconds=d["cpu_seconds"], train_seconds=d["train_seconds"], val_accuracy=d["val_accuracy"],
                          recipe=d["recipe"])
        row["default"] = _mean_of([(d["accuracy"], d["seconds"], d["cpu_seconds"]) for d in defaults])
    sizes = sorted({PROBE_SIZE, *probe_sizes, *(d["image_size"] for d in defaults)})
    if "probe" not in skip:
        for size in sizes:
            for method, (acc, seconds) in frozen_feature_methods(data, classes, size).items():
                benchlib.emit(f"{name}_{method}_test_accuracy", round(acc, 4), image_size=size, seconds=seconds)
                best = row.get(method)
                if best is None or acc > best[0]:
                    row[method] = (acc, seconds, size)
    if "naive" not in skip:
        runs = []
        for seed in seeds:
            acc, seconds, cpu, loop = naive_finetune(data, classes, seed, **(naive_switches or {}))
            runs.append((acc, seconds, cpu))
            benchlib.emit(f"{name}_naive_ft_test_accuracy", round(acc, 4), seed=seed, seconds=seconds, cpu_seconds=cpu,
                          **loop, **NAIVE, switches={**NAIVE_SWITCHES, **(naive_switches or {})})
        row["naive_ft"] = _mean_of(runs)
    return row


def _mean_of(runs: list[tuple]) -> tuple:
    """(mean accuracy, mean wall seconds, mean CPU seconds) of (accuracy, seconds, cpu seconds) runs."""
    return (float(np.mean([r[0] for r in runs])), *(round(float(np.mean([r[k] for r in runs])), 1) for k in (1, 2)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="all", choices=("all", *BUILDERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=("default", "probe", "naive"))
    parser.add_argument("--probe-sizes", type=int, nargs="*", default=[],
                        help="also probe at these sides (the default's, when it is skipped)")
    parser.add_argument("--keep", default="", help="keep the datasets and runs in this folder")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="candidate changes to the default (TrainConfig fields), echoed in every line")
    parser.add_argument("--naive-set", nargs="*", default=[], metavar="SWITCH=VALUE",
                        help=f"the naive loop with some of the engine's settings: {', '.join(NAIVE_SWITCHES)} "
                             "(label_smoothing a number, the others on / off)")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    naive_switches = {}
    for item in args.naive_set:
        key, value = item.split("=", 1)
        if key not in NAIVE_SWITCHES:
            parser.error(f"--naive-set: {key} is not one of {', '.join(NAIVE_SWITCHES)}")
        naive_switches[key] = float(value) if key == "label_smoothing" else value == "on"

    import datasets

    datasets.disable_progress_bars()
    benchlib.print_env()
    workspace = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mmdemo-recipes-"))
    workspace.mkdir(parents=True, exist_ok=True)
    names = list(BUILDERS) if args.dataset == "all" else [args.dataset]
    table = {}
    try:
        for name in names:
            table[name] = run_dataset(name, workspace, args.seeds, set(args.skip), overrides, tuple(args.probe_sizes),
                                      naive_switches)
    finally:
        if not args.keep:
            shutil.rmtree(workspace, ignore_errors=True)
    for name, row in table.items():
        if "default" in row and "linear_probe" in row and "naive_ft" in row:
            row["default_wins"] = row["default"][0] >= max(row["linear_probe"][0], row["naive_ft"][0])
            row["default_not_slower"] = row["default"][1] <= row["naive_ft"][1]
            row["default_not_more_cpu"] = row["default"][2] <= row["naive_ft"][2]
    print(json.dumps({"summary": table, "seeds": args.seeds, "set": overrides, "load": benchlib.load()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
