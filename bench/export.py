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

Then PyTorch int8 on the CPU (torch.ao.quantization, not part of the product), measured the same way on the same
images next to a fresh PyTorch fp32 row: ``quantize_dynamic`` (int8 weights, activations quantised per call; it
touches only ``nn.Linear`` layers, which in EfficientNet-Lite0 is the classifier head alone) and FX graph-mode
static post-training quantisation (``prepare_fx`` / ``convert_fx``, the x86 backend's default qconfig: per-channel
int8 convolutions, calibrated on the same training images as onnxruntime's int8). ``--no-torch-int8`` skips them.
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
    parser.add_argument("--torch-int8", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure PyTorch int8 (torch.ao: dynamic, FX static)")
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
        torch_rows = torch_int8_rows(run, args.calibration_images, args.latency_runs) if args.torch_int8 else []
        for row in torch_rows:
            benchlib.emit(f"variant {row['variant']}", row["accuracy"], "accuracy", **row)
        print(json.dumps({"summary": {"goals": goals, "torch_int8": {r["variant"]: {
                              k: r.get(k) for k in ("accuracy", "delta_points", "agreement", "size_mb", "latency_ms_p50",
                                                    "latency_ms_p95", "latency_ms_1_thread", "error")} for r in torch_rows}, "best": lab["best"], "warnings": lab["warnings"],
                                      "quantization": lab["quantization"], "threads": lab["threads"],
                                      "num_val": lab["num_val"], "image_size": lab["image_size"],
                                      "deviations": deviations, "loadavg_end": benchlib.load(),
                                      "total_seconds": round(time.time() - t_all, 1)}}), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workspace, ignore_errors=True)
    return 0


def torch_int8_rows(run: Path, calibration_images: int, latency_runs: int) -> list[dict]:
    """PyTorch fp32 and int8 (torch.ao.quantization) rows on the run's validation images, as the lab measures."""
    import copy
    import io
    import warnings

    import torch
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from mmdemo.deploy.export import _model_and_data
    from mmdemo.deploy.lab import latency_ms, torch_logits, variant_row
    from mmdemo.deploy.onnx import static_padding
    from mmdemo.runs import read_config

    warnings.filterwarnings("ignore", module="torch.ao")  # torch.ao.quantization warns that it moves to torchao
    clf, (pixels, targets), calibration = _model_and_data(run, read_config(run), calibration_images, 0)
    reference, one = torch_logits(clf, pixels), pixels[:1]

    def row(name: str, model) -> dict:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        try:
            logits = torch_logits(model, pixels)
            latency = latency_ms(lambda x: torch_logits(model, x), one, latency_runs)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # two threads on a busy machine wait on each other (bench/RESULTS.md, section 5)
            try:
                one_thread = latency_ms(lambda x: torch_logits(model, x), one, latency_runs)
            finally:
                torch.set_num_threads(threads)
        except Exception as e:  # noqa: BLE001 - a quantised model this torch cannot run: say so, keep the others
            return {"variant": name, "accuracy": None, "error": f"{type(e).__name__}: {e}"[:300]}
        return {**variant_row(name, "state_dict", logits, reference, targets, buffer.tell(), latency),
                "threads": threads, "latency_ms_1_thread": one_thread, "engine": torch.backends.quantized.engine}

    rows = [row("torch fp32 (same moment)", clf)]
    dynamic = quantize_dynamic(copy.deepcopy(clf), {torch.nn.Linear}, dtype=torch.qint8)
    touched = [n for n, m in dynamic.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    rows.append({**row("torch int8 dynamic (nn.Linear only)", dynamic), "quantized_modules": touched})
    try:  # FX graph mode: the whole network, convolutions included, with the constant padding the ONNX export uses
        net = copy.deepcopy(static_padding(clf, clf.preprocess.image_size).net).eval()
        prepared = prepare_fx(net, get_default_qconfig_mapping(torch.backends.quantized.engine),
                              (torch.from_numpy(one),))
        with torch.no_grad():
            for i in range(0, len(calibration), 16):
                prepared(torch.from_numpy(calibration[i:i + 16]))
        static = convert_fx(prepared)
    except Exception as e:  # noqa: BLE001 - FX cannot trace / convert this network: the row says why
        return rows + [{"variant": "torch int8 static (FX)", "accuracy": None, "error": f"{type(e).__name__}: {e}"[:300]}]
    return rows + [row("torch int8 static (FX, x86)", static)]


if __name__ == "__main__":
    sys.exit(main())
