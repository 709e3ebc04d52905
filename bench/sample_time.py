"""Benchmark: ingest assets/sample_shapes.zip and train the default model with every default.

    python bench/sample_time.py

What a user gets from the app's sample dataset: TrainConfig with only data/output_dir set
(efficientnet_lite0, method "full", the method's epochs / batch size / learning rate, 160 px).
Prints one JSON line per figure ({"figure": ..., "value": ...}) and a final {"summary": ...} line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # run from anywhere without installing

from digits import saved_model_accuracy  # noqa: E402  (bench/digits.py)

FIGURES: dict = {}


def emit(figure: str, value, **extra) -> None:
    FIGURES[figure] = value
    print(json.dumps({"figure": figure, "value": value, **extra}), flush=True)


def main(argv=None) -> int:
    import argparse

    import datasets
    import torch

    from mmdemo.config import TrainConfig
    from mmdemo.data import ingest_dataset, load_splits
    from mmdemo.training import train

    datasets.disable_progress_bars()  # one JSON line per figure, no progress noise in the log
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    deviations = {}

    print(json.dumps({"info": "start", "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "loadavg": os.getloadavg(), "deviations": deviations}), flush=True)
    workspace = Path(tempfile.mkdtemp(prefix="mmdemo-sample-"))
    try:
        t0 = time.time()
        summary = ingest_dataset(ROOT / "assets" / "sample_shapes.zip", workspace)
        emit("sample_ingest_seconds", round(time.time() - t0, 1), num_train=summary.num_train,
             num_val=summary.num_val, classes=summary.classes, warnings=summary.warnings)

        run_dir = workspace / "run"
        cfg = TrainConfig(data=summary.path, output_dir=str(run_dir))
        t1 = time.time()
        result = train(cfg)
        seconds = time.time() - t1
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        start = next(r for r in records if r["type"] == "start")
        evals = [r for r in records if r["type"] == "eval"]
        marks = [start["time"]] + [r["time"] for r in evals]
        cfg = TrainConfig.load(run_dir / "config.yaml")  # as train() resolved it (image_size filled in)
        resolved = {"base_model": cfg.base_model, "method": cfg.method, "epochs": cfg.epochs,
                    "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
                    "image_size": cfg.image_size, "total_steps": start["total_steps"]}
        emit("sample_epoch_seconds", [round(b - a, 1) for a, b in zip(marks, marks[1:])],
             note="train epoch + validation + checkpoint")
        emit("sample_val_accuracy_per_epoch", [r["accuracy"] for r in evals])
        emit("sample_train_seconds", round(seconds, 1), note="train() wall time incl. model build, decode, "
             "final evaluation and saving")
        emit("sample_total_seconds", round(time.time() - t0, 1), note="ingest + train")
        emit("sample_val_accuracy", result["accuracy"], num_val=result["num_val"], val_loss=result["val_loss"],
             recipe=resolved, deviations=deviations)
        saved = saved_model_accuracy(run_dir / "model", load_splits(summary.path)["validation"])
        emit("sample_saved_model_val_accuracy", round(saved, 5),
             note="run_dir/model reloaded, eval mode, same validation images", deviations=deviations)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    print(json.dumps({"summary": {**FIGURES, "loadavg_end": os.getloadavg(), "deviations": deviations}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
