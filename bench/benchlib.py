"""Shared by the bench/ scripts: one JSON line per figure, the machine's load, versions, test data.

Every figure line is ``{"figure": name, "value": x, "unit": ..., "load": 1-min load average, ...}``,
flushed at once so a run in the background can be polled. Timings on a shared machine are noisy:
the scripts compare two things by interleaving them in one process (A, B, A, B, ...) and report
medians; the load average printed with each figure says how busy the machine was.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from anywhere without installing

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the benchmarks never need the Hub


def load() -> float:
    return round(os.getloadavg()[0], 2)


def emit(figure: str, value, unit: str = "", **extra) -> dict:
    record = {"figure": figure, "value": value, "unit": unit, "load": load(), **extra}
    print(json.dumps(record), flush=True)
    return record


def skipped(figure: str, reason: str, **extra) -> dict:
    """The line a GPU-only part prints where there is no GPU."""
    return emit(figure, None, skipped=True, reason=reason, **extra)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def env_info() -> dict:
    """The header line of every script: device and library versions."""
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "torchvision", "timm", "transformers", "accelerate", "peft", "gradio"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {"info": "env", "device": device_name(), "cuda": torch.cuda.is_available(), "python": platform.python_version(),
            "versions": versions, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def print_env() -> dict:
    info = env_info()
    print(json.dumps(info), flush=True)
    return info


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs, q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def cuda_seconds_per_call(fn, warmup: int, calls: int) -> float:
    """Mean seconds per ``fn()`` on the GPU: ``warmup`` calls, then ``calls`` timed between two
    synchronisations (none in between, so the host queues work as it would in training)."""
    import time

    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls


def write_shapes(root: Path, per_class: int, side: int = 96, classes=("circle", "square", "triangle")) -> Path:
    """Class folders of drawn shapes (random background, position, size): a classification upload
    of any size, made offline in a second or two."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (side, side), tuple(rng.randrange(0, 140) for _ in range(3)))
            d = ImageDraw.Draw(img)
            r = rng.randrange(side // 6, side // 3)
            cx, cy = rng.randrange(r, side - r), rng.randrange(r, side - r)
            fill = tuple(rng.randrange(160, 256) for _ in range(3))
            if c == "circle":
                d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            elif c == "square":
                d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            img.save(root / c / f"{i:04d}.png")
    return root


def ingest_shapes(workspace: Path, per_class: int, side: int = 96) -> str:
    """write_shapes + mmdemo.data.ingest_dataset; returns the ingested dataset's path."""
    import datasets

    from mmdemo.data import ingest_dataset

    datasets.disable_progress_bars()
    raw = write_shapes(Path(workspace) / "raw", per_class, side)
    return ingest_dataset(raw, Path(workspace) / "ws").path
