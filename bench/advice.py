"""Benchmark: the advice before training (mmdemo.baselines) and the cost of a training step per method.

    python bench/advice.py                      # sample shapes + digits baselines, step cost per method
    python bench/advice.py --skip-digits        # the sample only

(a) ``baseline_report`` on the bundled sample (120 images) and on scikit-learn's digits (1,797 images
as 32x32 PNGs, as bench/digits.py writes them): the seconds for features (cold, then cached) and fits,
the k-shot curve, the full-data probe and nearest class mean, the recommendation. (b) The median seconds
of a batch-16 training step of the default classifier at 160 px for each method (full, head, lora,
bitfit), in one process, interleaved, so that the ratios to ``full`` hold even on a busy machine.

Prints one JSON line per figure ({"figure": ..., "value": ...}) with the load average next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))


def emit(figure: str, value, **extra) -> None:
    print(json.dumps({"figure": figure, "value": value, "load": round(os.getloadavg()[0], 2), **extra}), flush=True)


def bench_baselines(name: str, dataset_dir: Path) -> None:
    from mmdemo.baselines import baseline_report

    t0 = time.perf_counter()
    first = baseline_report(dataset_dir)
    emit(f"{name}_baselines_cold_seconds", round(time.perf_counter() - t0, 2),
         feature_seconds=first["feature_seconds"], fit_seconds=first["fit_seconds"],
         num_train=first["num_train"], num_val=first["num_val"], sampled=first["sampled"])
    (dataset_dir / "baselines.json").unlink()
    t0 = time.perf_counter()
    again = baseline_report(dataset_dir)
    emit(f"{name}_baselines_cached_features_seconds", round(time.perf_counter() - t0, 2),
         feature_seconds=again["feature_seconds"], fit_seconds=again["fit_seconds"])
    for r in first["rows"]:
        emit(f"{name}_{r['baseline'].replace(' ', '_')}_accuracy", r["accuracy"], shots=r["shots"], std=r["std"],
             draws=r["draws"])
    emit(f"{name}_recommendation", first["recommendation"]["method"], text=first["recommendation"]["text"])


def step_seconds(steps: int = 6) -> None:
    """Median training-step seconds per method (batch 16, 160 px, the default classifier, CPU)."""
    import torch
    import torch.nn.functional as F

    from mmdemo.images import normalize
    from mmdemo.models import apply_method, build_classifier

    torch.manual_seed(0)
    x = torch.randint(0, 255, (16, 3, 160, 160), dtype=torch.uint8)
    y = torch.randint(0, 3, (16,))
    models = {}
    for method in ("full", "head", "lora", "bitfit"):
        clf, _ = build_classifier("efficientnet_lite0", ["a", "b", "c"], pretrained=True)
        apply_method(clf, method)
        clf.train(method not in ("head", "lora"))
        params = [p for p in clf.parameters() if p.requires_grad]
        models[method] = (clf, torch.optim.AdamW(params, lr=1e-3))
    times = {m: [] for m in models}
    for i in range(steps + 1):
        for method, (clf, opt) in models.items():
            t0 = time.perf_counter()
            loss = F.cross_entropy(clf(normalize(x, (0.5,) * 3, (0.5,) * 3, channels_last=True)), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # the first step of each warms up
                times[method].append(time.perf_counter() - t0)
    full = statistics.median(times["full"])
    for method, t in times.items():
        emit(f"step_seconds_{method}", round(statistics.median(t), 4), ratio_to_full=round(statistics.median(t) / full, 3),
             threads=torch.get_num_threads())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mmdemo.data import ingest_dataset

    root = Path(tempfile.mkdtemp(prefix="bench-advice-"))
    try:
        if not args.skip_steps:
            step_seconds()
        sample = ingest_dataset(Path(__file__).resolve().parents[1] / "assets" / "sample_shapes.zip", root / "ws")
        bench_baselines("sample", Path(sample.path))
        if not args.skip_digits:
            from digits import write_digits

            write_digits(root / "digits", 32)
            digits = ingest_dataset(root / "digits", root / "ws", val_fraction=0.2, seed=0)
            bench_baselines("digits", Path(digits.path))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
