"""The export lab: every variant measured next to the PyTorch model, by running that file.

For each variant (torch fp32, onnx fp32, int8, fp16): validation accuracy on the run's own validation split,
its delta to PyTorch (points), top-1 agreement with PyTorch, file size, CPU latency p50 / p95 at batch 1.
A variant that drops more than ``MAX_DROP_POINTS`` gets a warning with the likely fix; the fastest variant
within that drop is the best one.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from .onnx import INPUT

MAX_DROP_POINTS = 1.0
LATENCY_RUNS, WARMUP_RUNS = 30, 3
FIXES = {
    "fp32": "the exported graph differs from PyTorch: this is an exporter problem (try another opset or report it); "
            "use the PyTorch model meanwhile.",
    "int8": "calibrate on more images (--calibration-images 300), keep the first and last layers in fp32 "
            "(--keep-fp32 first,last), try --calibration entropy / percentile, or the other --activations (int8 / "
            "uint8); per-channel weights are on, and 7-bit weights (reduce_range) where the CPU lacks VNNI. int8 "
            "loses far more on a CPU without VNNI than on one with it: measure on the machine that will serve.",
    "fp16": "some activations overflow fp16: keep fp32 (model.onnx), or run fp16 on a GPU provider only.",
}


def session(path: Path, threads: int = 0):
    """An onnxruntime CPU session; ``threads`` 0 = onnxruntime's default."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(sess, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([sess.run(None, {INPUT: pixels[i:i + batch]})[0] for i in range(0, len(pixels), batch)])


def torch_logits(clf, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([clf(torch.from_numpy(pixels[i:i + batch])).float().numpy()
                               for i in range(0, len(pixels), batch)])


def latency_ms(predict, one: np.ndarray, runs: int = LATENCY_RUNS) -> tuple[float, float]:
    """p50 and p95 wall milliseconds of ``predict(one)`` (batch 1) over ``runs`` calls after a warm-up."""
    for _ in range(WARMUP_RUNS):
        predict(one)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        predict(one)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return round(statistics.median(times), 2), round(times[min(len(times) - 1, round(0.95 * (len(times) - 1)))], 2)


def variant_row(name: str, file: str, logits: np.ndarray, reference: np.ndarray, targets: np.ndarray,
                size_bytes: int, latency: tuple[float, float]) -> dict:
    """One row of the lab table; ``targets`` are model output indices (-1: a class the model lacks)."""
    preds, ref = logits.argmax(1), reference.argmax(1)
    accuracy = float((preds == targets).mean()) if len(targets) else None
    ref_accuracy = float((ref == targets).mean()) if len(targets) else None
    return {"variant": name, "file": file, "accuracy": None if accuracy is None else round(accuracy, 5),
            "delta_points": None if accuracy is None else round(100 * (accuracy - ref_accuracy), 2),
            "agreement": round(float((preds == ref).mean()), 5) if len(ref) else None,
            "max_abs_logit_diff": round(float(np.abs(logits - reference).max()), 5) if len(ref) else None,
            "logit_std_ratio": _std_ratio(logits, reference),
            "size_mb": round(size_bytes / 1e6, 3), "latency_ms_p50": latency[0], "latency_ms_p95": latency[1],
            "best": False, "warning": ""}


def _std_ratio(logits, reference) -> float | None:
    # Near 0: the collapsed logits of a broken int8 model (every class scored alike).
    ref = float(reference.std()) if len(reference) else 0.0
    return round(float(logits.std()) / ref, 4) if ref else None


def judge(rows: list[dict], kind_of: dict[str, str]) -> list[str]:
    """Flags each variant that drops more than MAX_DROP_POINTS (or whose logits collapse) with the likely
    fix, marks the fastest variant within the drop as ``best``; returns the warnings."""
    warnings = []
    for row in rows:
        kind = kind_of.get(row["variant"])
        if kind is None:
            continue  # the PyTorch reference
        drop = -(row["delta_points"] or 0.0)
        collapsed = row["logit_std_ratio"] is not None and row["logit_std_ratio"] < 0.2
        if drop > MAX_DROP_POINTS or collapsed:
            what = (f"loses {drop:.1f} accuracy points" if drop > MAX_DROP_POINTS else
                    f"has collapsed logits (spread {row['logit_std_ratio']:.2f}x PyTorch's)")
            row["warning"] = f"{row['variant']} {what} against PyTorch (agreement {row['agreement']:.1%}). " \
                             f"Likely fix: {FIXES[kind]}"
            warnings.append(row["warning"])
    fine = [r for r in rows if not r["warning"]]
    if fine:
        min(fine, key=lambda r: r["latency_ms_p50"])["best"] = True
    return warnings


def unrunnable(row: dict, error: Exception) -> dict:
    """``row`` of a file this CPU's onnxruntime provider cannot run: its size stays, its measurements go."""
    return {**row, "accuracy": None, "delta_points": None, "agreement": None, "latency_ms_p50": None,
            "latency_ms_p95": None, "error": f"onnxruntime's CPU provider cannot run it: {error}"[:300]}


def conclude(rows: list[dict], kind_of: dict[str, str]) -> dict:
    """The lab's verdict over its rows (each ONNX row named in ``kind_of``, the PyTorch one not): ``judge``'s
    warnings and ``best``, unrunnable files' fixes, each row's size against ONNX fp32."""
    runnable = [r for r in rows if r.get("latency_ms_p50") is not None]
    warnings = judge(runnable, kind_of)
    warnings += [f"{r['variant']}: {r['error']}. Likely fix: {FIXES[kind_of[r['variant']]]}" for r in rows if r.get("error")]
    fp32_size = next(r["size_mb"] for r in rows if r["variant"] == "onnx fp32")
    for r in rows:
        r["size_vs_onnx_fp32"] = round(r["size_mb"] / fp32_size, 3) if fp32_size else None
    return {"best": next((r["variant"] for r in rows if r["best"]), None), "warnings": warnings}


def machine(threads: int, latency_runs: int) -> dict:
    """Where the lab measured: export.json's threads, latency_runs, cpu and loadavg."""
    return {"threads": threads, "latency_runs": latency_runs, "cpu": _cpu_name(),
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def _cpu_name() -> str:
    try:
        line = next(li for li in Path("/proc/cpuinfo").read_text().splitlines() if li.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return ""
