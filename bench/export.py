"""Benchmark: the export lab on the digits benchmark (ONNX fp32, int8, fp16 against PyTorch).

    nice -n 5 python bench/export.py                       # default recipe, 160 px (slow on 2 cores)
    nice -n 5 python bench/export.py --image-size 64 --recipe lp-ft --max-steps 5   # what a busy machine allowed

Steps: bench/digits.py's dataset (sklearn load_digits as 32x32 PNGs, seeded stratified 20% validation) ->
mmdemo.training.train with the default recipe (every deviation is echoed) -> mmdemo.deploy.export_onnx_run
with int8 and fp16 (int8: static, MinMax, per channel, int8 symmetric activations, the last Gemm in fp32, 100 training
images) -> one JSON
line per variant (accuracy on the 359 validation images run through that file, delta to PyTorch, top-1
agreement, size, CPU latency p50 / p95 at batch 1) and a ``{"summary": ...}`` line with the goals checked:
ONNX fp32 agrees on >= 99%, int8 within 1 point and <= 0.35x the fp32 file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402  (puts the repository on sys.path)
from digits import write_digits  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=0, help="0: the engine default")
    parser.add_argument("--epochs", type=int, default=0, help="0: the engine default")
    parser.add_argument("--recipe", default="", help="'': the engine default; lp-ft fits the head first")
    parser.add_argument("--max-steps", type=int, default=0, help="0: no limit")
    parser.add_argument("--calibration", default="minmax")
    parser.add_argument("--calibration-images", type=int, default=100)
    parser.add_argument("--keep-fp32", default="last")
    parser.add_argument("--activations", default="int8")
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--keep", default="", help="keep the workspace in this folder (and reuse its run)")
    args = parser.parse_args(argv)

    import datasets

    from mmdemo.config import TrainConfig
    from mmdemo.data import ingest_dataset
    from mmdemo.deploy import export_onnx_run
    from mmdemo.training import train

    datasets.disable_progress_bars()
    deviations = {k: v for k, v in (("image_size", args.image_size), ("epochs", args.epochs), ("recipe", args.recipe),
                                    ("max_steps", args.max_steps)) if v}
    workspace = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mmdemo-export-"))
    workspace.mkdir(parents=True, exist_ok=True)
    benchlib.emit("start", None, cpu=benchlib.cpu_model(), deviations=deviations)
    t_all = time.time()
    try:
        run = workspace / "run"
        if not (run / "model" / "mmdemo.json").is_file():
            shutil.rmtree(workspace / "digits", ignore_errors=True)
            write_digits(workspace / "digits", 32)
            summary = ingest_dataset(workspace / "digits", workspace, val_fraction=0.2, seed=0)
            t0 = time.time()
            result = train(TrainConfig(data=summary.path, output_dir=str(run), **deviations))
            benchlib.emit("digits_train_seconds", round(time.time() - t0, 1), "s", accuracy=result["accuracy"],
                          deviations=deviations)
        out = workspace / "export"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        lab = export_onnx_run(run, out, quantize=["int8", "fp16"], calibration=args.calibration,
                              calibration_images=args.calibration_images, keep_fp32=args.keep_fp32,
                              latency_runs=args.latency_runs, activations=args.activations)
        benchlib.emit("export_lab_seconds", round(time.time() - t0, 1), "s", note="export + quantise + measure all")
        for row in lab["variants"]:
            benchlib.emit(f"variant {row['variant']}", row["accuracy"], "accuracy", **row)
        rows = {r["variant"]: r for r in lab["variants"]}
        goals = {"onnx_fp32_agreement_ge_0.99": rows["onnx fp32"]["agreement"] >= 0.99,
                 "int8_within_1_point": (rows["onnx int8"]["delta_points"] or -100) >= -1.0,
                 "int8_size_le_0.35x": rows["onnx int8"]["size_vs_onnx_fp32"] <= 0.35}
        print(json.dumps({"summary": {"goals": goals, "best": lab["best"], "warnings": lab["warnings"],
                                      "quantization": lab["quantization"], "threads": lab["threads"],
                                      "num_val": lab["num_val"], "image_size": lab["image_size"],
                                      "deviations": deviations, "loadavg_end": benchlib.load(),
                                      "total_seconds": round(time.time() - t_all, 1)}}), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workspace, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
