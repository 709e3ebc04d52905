"""Benchmark 1: the engine's training step against a bare PyTorch loop (ratio bare / engine).

    python bench/engine_vs_bare.py                       # default model, 160 px, batch 16, CPU or GPU
    python bench/engine_vs_bare.py --model vit_base_patch16_224 --image-size 224 --batch-size 64   # on a GPU

Engine: the real path, ``mmdemo.training.train`` on an ingested dataset (``max_steps`` N, one epoch,
augmentation off, num_workers 0, the default ``log_every`` 1 so every step writes metrics.jsonl with
its ``.item()``, checks the STOP file and steps the scheduler). The time of each step is the interval
between two consecutive calls of ``_Loop._stop_requested`` (called once at the end of every step), so
it holds the next batch from the DataLoader, the loss, backward, optimizer, scheduler, zero_grad,
the metrics line and the stop check; setup (decode, model build, accelerate) and the end of the run
(evaluation, saving) fall outside.

Bare loop: the same ``ClassificationTask`` (so the same model build, method and decoded uint8 pixels),
the batch taken by indexing the in-memory tensor, normalisation, forward, cross-entropy with the same
label smoothing, backward, ``torch.optim.AdamW`` with the same parameter groups / lr / weight decay /
fused flag, ``zero_grad(set_to_none=True)``; bf16 autocast where the engine uses it (on a GPU).

The two alternate in one process (bare, engine, engine, bare, ...: ABBA cancels a drift in load) and
the first ``--warmup`` steps of each run are dropped. Figures: per-step medians, the ratio of the
medians (bare / engine; 1.0 = the engine costs nothing on top), the median of the per-pair ratios,
and the ratio of window means (time from the first counted step to the last over their number,
with a synchronize at both ends on a GPU, where host intervals alone can mislead).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import emit, ingest_shapes, median, print_env  # noqa: E402

MARKS: list[tuple[float, float]] = []  # (wall clock, this process's CPU time, all threads)
SYNC_AT: set[int] = set()  # step indices whose timestamp waits for the GPU (window ends; none on a CPU)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def patch_step_clock() -> None:
    """Records a timestamp at the end of every engine step (the stop check is the step's last act)."""
    from mmdemo import training

    original = training._Loop._stop_requested

    def stop_requested(self):
        flag = original(self)
        if len(MARKS) in SYNC_AT:
            _sync()
        MARKS.append((time.perf_counter(), time.process_time()))
        return flag

    training._Loop._stop_requested = stop_requested


def make_cfg(args, data: str, out: Path):
    from mmdemo.config import TrainConfig

    return TrainConfig(data=data, output_dir=str(out), base_model=args.model, method=args.method,
                       pretrained=args.pretrained, epochs=1, max_steps=args.steps, batch_size=args.batch_size,
                       image_size=args.image_size, augment=False, log_every=args.log_every,
                       mixed_precision=args.precision, seed=0)


def intervals(args, marks: list[tuple[float, float]]) -> tuple[list[float], float, list[float]]:
    """Per-step wall intervals after the warm-up, the window mean between the two synchronised marks,
    and per-step CPU time (on a shared machine, less disturbed by other jobs than wall time)."""
    wall = [m[0] for m in marks]
    cpu = [m[1] for m in marks]
    steps = [b - a for a, b in zip(wall, wall[1:])][args.warmup:]
    window = (wall[-1] - wall[args.warmup]) / (len(wall) - 1 - args.warmup)
    return steps, window, [b - a for a, b in zip(cpu, cpu[1:])][args.warmup:]


def run_engine(args, data: str, out: Path) -> tuple[list[float], float, list[float]]:
    from mmdemo.training import train

    MARKS.clear()
    SYNC_AT.clear()
    SYNC_AT.update({args.warmup, args.steps - 1} if _cuda() else set())
    train(make_cfg(args, data, out))
    shutil.rmtree(out, ignore_errors=True)
    return intervals(args, list(MARKS))


def run_bare(args, data: str, out: Path) -> tuple[list[float], float, list[float]]:
    """The bare loop: setup outside the clock, then N steps, a timestamp after each."""
    import torch
    import torch.nn.functional as F
    from accelerate.utils import set_seed

    from mmdemo.data import load_splits
    from mmdemo.tasks import ClassificationTask
    from mmdemo.training import _precision

    cfg = make_cfg(args, data, out)
    set_seed(cfg.seed)
    task = ClassificationTask(cfg, load_splits(cfg.data))  # same build, same decoded pixels
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = task.model.to(device)
    pixels, labels = task.train_ds.pixels, task.train_ds.labels
    mean, std = (t.to(device) for t in task._stats)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=torch.cuda.is_available())
    precision = _precision(cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    task.train_mode(model)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    marks = []
    for s in range(cfg.max_steps):
        idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        x = pixels[idx].to(device, non_blocking=True)
        y = labels[idx].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model((x.float().div_(255) - mean) / std).float()
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s in (args.warmup, cfg.max_steps - 1):
            _sync()  # window ends only (a no-op on the CPU)
        marks.append((time.perf_counter(), time.process_time()))
    return intervals(args, marks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--method", default="full")
    parser.add_argument("--pretrained", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                        help="default: true for efficientnet_lite0 (offline weights), false otherwise")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=0, help="0: the model's own size")
    parser.add_argument("--steps", type=int, default=12, help="steps per run (one epoch)")
    parser.add_argument("--warmup", type=int, default=2, help="step intervals dropped at the start of each run")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each, interleaved ABBA")
    parser.add_argument("--log-every", type=int, default=1, help="engine's log_every (its default is 1)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = parser.parse_args(argv)
    if args.pretrained is None:
        args.pretrained = args.model == "efficientnet_lite0"

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print_env()
    patch_step_clock()
    work = Path(tempfile.mkdtemp(prefix="mmdemo-evb-"))
    try:
        # Enough train rows for one epoch of --steps batches (80% of the rows go to train).
        per_class = -(-(args.steps + 1) * args.batch_size * 5 // 4 // 3)
        data = ingest_shapes(work, per_class)
        engine, bare, pair_ratios, windows = [], [], [], {"bare": [], "engine": []}
        cpu = {"bare": [], "engine": []}
        order = ["bare", "engine", "engine", "bare"] * ((args.repeats + 1) // 2)
        pending = {}
        for k, which in enumerate(order[:2 * args.repeats]):
            t, window, c = (run_bare if which == "bare" else run_engine)(args, data, work / f"run{k}")
            (bare if which == "bare" else engine).extend(t)
            windows[which].append(window)
            cpu[which].extend(c)
            pending[which] = median(t)
            emit(f"{which}_step_run", round(median(t) * 1000, 2), "ms", run=k, steps=len(t),
                 window_mean_ms=round(window * 1000, 2), cpu_ms=round(median(c) * 1000, 2))
            if len(pending) == 2:
                pair_ratios.append(pending["bare"] / pending["engine"])
                pending = {}
        common = dict(model=args.model, method=args.method, batch_size=args.batch_size,
                      image_size=args.image_size or "model default", precision=args.precision,
                      log_every=args.log_every, device="cuda" if torch.cuda.is_available() else "cpu",
                      threads=torch.get_num_threads())
        emit("bare_step_median", round(median(bare) * 1000, 2), "ms", steps=len(bare), **common)
        emit("engine_step_median", round(median(engine) * 1000, 2), "ms", steps=len(engine), **common)
        emit("engine_vs_bare_ratio", round(median(bare) / median(engine), 4), "bare/engine",
             target=">= 0.95", pair_ratios=[round(r, 4) for r in pair_ratios], **common)
        emit("engine_vs_bare_ratio_pairs_median", round(median(pair_ratios), 4), "bare/engine", **common)
        emit("engine_vs_bare_ratio_window_means", round(median(windows["bare"]) / median(windows["engine"]), 4),
             "bare/engine", note="median over runs of (window time / steps), synchronised at both ends on a GPU",
             **common)
        emit("engine_vs_bare_ratio_cpu_time", round(median(cpu["bare"]) / median(cpu["engine"]), 4), "bare/engine",
             bare_cpu_ms=round(median(cpu["bare"]) * 1000, 2), engine_cpu_ms=round(median(cpu["engine"]) * 1000, 2),
             note="per-step process CPU time (all threads), medians", **common)
        emit("engine_images_per_s", round(args.batch_size / median(engine), 2), "images/s", **common)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
