"""Peak memory of short real training runs against mmdemo.memory's estimate (CPU RAM).

    .venv/bin/python bench/memory_estimate.py [--steps 3]

For the default classifier and the default composed captioner at a few batch / image sizes it runs
`python -m mmdemo train` for --steps steps (plus its final evaluation) and reads the child's peak RSS
(wait4's ru_maxrss). One JSON line per point: measured, estimated, their ratio; then the activation
factor and base that a least-squares fit of these points gives, to update memory.py's constants.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, emit  # noqa: E402

from mmdemo import memory  # noqa: E402
from mmdemo.config import TrainConfig  # noqa: E402
from mmdemo.data import ingest_dataset  # noqa: E402

POINTS = {"classification": ("sample_shapes.zip", "efficientnet_lite0", "full", [(8, 160), (32, 160), (16, 320)]),
          "captioning": ("sample_captions.zip", "efficientnet_lite0+minilm", "frozen_vision",
                         [(8, 128), (32, 128), (16, 256)])}


def peak_rss(config: Path) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mmdemo", "train", "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, code, usage = os.wait4(proc.pid, 0)
    if code:
        raise SystemExit(f"the run for {config} failed ({code}); see its train.log")
    return usage.ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--task", choices=sorted(POINTS), action="append")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmdemo-memory-"))
    for task in args.task or sorted(POINTS):
        sample, model, method, points = POINTS[task]
        summary = ingest_dataset(str(ROOT / "assets" / sample), work / task, task=task)
        images = summary.num_train + summary.num_val
        fit = []
        for batch, size in points:
            run = work / f"{task}-{batch}-{size}"
            run.mkdir()
            cfg = TrainConfig(data=summary.path, output_dir=str(run), task=task, base_model=model, method=method,
                              batch_size=batch, image_size=size, max_steps=args.steps, epochs=1)
            cfg.save(run / "config.yaml")
            measured = peak_rss(run / "config.yaml")
            est = memory.estimate(cfg, images)
            rest = measured - sum(v for k, v in est["parts"].items() if k not in ("base", "activations"))
            fit.append((batch * size * size, rest))
            emit(f"peak_rss_{task}", round(measured / 2**20), "MiB", batch_size=batch, image_size=size,
                 estimated_mib=round(est["bytes"] / 2**20), ratio=round(est["bytes"] / measured, 2),
                 parts_mib={k: round(v / 2**20) for k, v in est["parts"].items()})
        n = len(fit)
        mx, my = sum(x for x, _ in fit) / n, sum(y for _, y in fit) / n
        slope = sum((x - mx) * (y - my) for x, y in fit) / max(1, sum((x - mx) ** 2 for x, _ in fit))
        emit(f"fitted_{task}", round(slope, 1), "bytes per sample-pixel", base_mib=round((my - slope * mx) / 2**20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
