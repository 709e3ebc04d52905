"""Image + text classification on the bundled sample: each fusion (and, with --methods, each method) trained
by the engine with its default recipe; prints held-out accuracy, the modality ablation and the time.

    python bench/image_text.py [--fusions late,cross] [--methods frozen_encoders] [--epochs 0]

One JSON line per figure (benchlib.emit), then a summary line. The timings are the run's wall time on this
machine, noisy where other work shares the cores (each line carries the load average).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, emit

FUSIONS = {"late": "efficientnet_lite0+minilm", "cross": "efficientnet_lite0+minilm-cross"}


def main() -> None:
    from mmdemo.config import TrainConfig
    from mmdemo.data import ingest_dataset
    from mmdemo.training import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--fusions", default="late,cross")
    parser.add_argument("--methods", default="frozen_encoders")
    parser.add_argument("--epochs", type=int, default=0, help="0 = the method's default")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-itc-"))
    summary = ingest_dataset(ROOT / "assets" / "sample_image_text.zip", work / "ws", task="image_text_classification")
    results = {}
    for fusion in args.fusions.split(","):
        for method in args.methods.split(","):
            cfg = TrainConfig(data=summary.path, output_dir=str(work / f"{fusion}-{method}"),
                              task="image_text_classification", base_model=FUSIONS[fusion], method=method,
                              epochs=args.epochs)
            start = time.monotonic()
            result = train(cfg)
            seconds = round(time.monotonic() - start, 1)
            name = f"{fusion}/{method}"
            emit(f"{name} held-out accuracy", result["accuracy"], "", epochs=cfg.epochs, num_val=result["num_val"])
            emit(f"{name} image-only accuracy", result["ablation"]["image_only"])
            emit(f"{name} text-only accuracy", result["ablation"]["text_only"])
            emit(f"{name} training time", seconds, "s")
            results[name] = {**result["ablation"], "seconds": seconds}
    emit("summary", results)


if __name__ == "__main__":
    main()
