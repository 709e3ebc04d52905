"""Benchmark 1: the engine's training step against a bare PyTorch loop (ratio bare / engine).

    python bench/engine_vs_bare.py                       # default model, 160 px, batch 16, CPU or GPU
    python bench/engine_vs_bare.py --model vit_base_patch16_224 --image-size 224 --batch-size 64   # on a GPU

Engine: the real path, ``mmdemo.training.train`` on an ingested dataset (``max_steps`` N, one epoch,
augmentation off, the engine's automatic ``num_workers`` and ``log_every``: on the CPU no loader
workers and a metrics line with its ``.item()`` every step, on a GPU the spare cores and a line every
10 steps; it checks the STOP file and steps the scheduler). The time of each step is the interval
between two consecutive calls of ``_Loop._stop_requested`` (called once at the end of every step), so
it holds the next batch from the DataLoader, the loss, backward, optimizer, scheduler, zero_grad,
the metrics line and the stop check; setup (decode, model build, accelerate) and the end of the run
(evaluation, saving) fall outside.

Bare loop: the same ``ClassificationTask`` (so the same model build, method and decoded uint8 pixels),
the batch taken by indexing the in-memory tensor, normalisation, forward, cross-entropy with the same
label smoothing, backward, ``torch.optim.AdamW`` with the same parameter groups / lr / weight decay /
fused flag, ``zero_grad(set_to_none=True)``; bf16 autocast where the engine uses it (on a GPU). With
``--bare-format plain`` (default) it feeds NCHW tensors as a plain loop does; with ``engine`` it also
uses the engine's channels-last input for CNNs, so the ratio isolates the engine's own overhead.

Step mode (the default on the CPU): during each engine run, one bare step runs right after every
engine step (inside the same hook, outside the engine's intervals), so the two alternate step by
step, A B A B ..., and see the same load on a shared machine; the ratio is the median over steps of
bare step / engine step (1.0 = the engine costs nothing on top). The bare loop has its own model
(same build) and optimizer. Runs mode (the default on a GPU, where a sync per step would change what
is measured): whole runs in turn (bare, engine, engine, bare, ...), each timed over a window with a
synchronize at both ends. The first ``--warmup`` steps of each run are dropped. Per-step process CPU
time (all threads) is reported beside wall time.
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

MARKS: list[tuple[float, float]] = []  # end of each engine step: (wall clock, process CPU time, all threads)
RESUMES: list[tuple[float, float]] = []  # where the engine resumes after the bare step run in between
BARE_STEPS: list[tuple[float, float]] = []  # (wall, CPU) of each bare step run in between
SYNC_AT: set[int] = set()  # runs mode: engine steps whose timestamp waits for the GPU (window ends)
INTERLEAVED: list = []  # step mode: the BareLoop whose steps run between the engine's


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def patch_step_clock() -> None:
    """Timestamps the end of every engine step (the stop check is the step's last act) and, in step
    mode, runs one bare step right there, outside the engine's intervals."""
    from mmdemo import training

    original = training._Loop._stop_requested

    def stop_requested(self):
        flag = original(self)
        if INTERLEAVED or len(MARKS) in SYNC_AT:
            _sync()
        MARKS.append(_clock())
        if INTERLEAVED:
            INTERLEAVED[0].step()
            _sync()
            after = _clock()
            BARE_STEPS.append((after[0] - MARKS[-1][0], after[1] - MARKS[-1][1]))
            RESUMES.append(after)
        return flag

    training._Loop._stop_requested = stop_requested


def make_cfg(args, data: str, out: Path):
    from mmdemo.config import TrainConfig

    return TrainConfig(data=data, output_dir=str(out), base_model=args.model, method=args.method,
                       pretrained=args.pretrained, epochs=1, max_steps=args.steps, batch_size=args.batch_size,
                       image_size=args.image_size, augment=False, log_every=args.log_every,
                       mixed_precision=args.precision, seed=0)


class BareLoop:
    """A bare PyTorch training loop on the engine's own model build and decoded pixels (setup here,
    outside any clock); ``step()`` is one step: index the in-memory batch, normalise, forward,
    cross-entropy, backward, AdamW, zero_grad."""

    def __init__(self, cfg, bare_format: str = "plain"):
        import torch
        from accelerate.utils import set_seed

        from mmdemo.data import load_splits
        from mmdemo.tasks import ClassificationTask
        from mmdemo.training import _precision

        set_seed(cfg.seed)
        task = ClassificationTask(cfg, load_splits(cfg.data))  # same build, same decoded pixels
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = task.model.to(self.device)
        self.pixels, self.labels = task.train_ds.pixels, task.train_ds.labels
        pre = task.model.preprocess
        self.mean, self.std = (torch.tensor(v, device=self.device).view(1, 3, 1, 1) for v in (pre.mean, pre.std))
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [g for g in ({"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}) if g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=True)  # as the engine's
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(_precision(cfg))
        self.smoothing, self.batch_size = cfg.label_smoothing, cfg.batch_size
        task.train_mode(self.model)
        # "plain": the loop as anyone writes it (NCHW); "engine": the engine's input memory format too.
        self.fmt = torch.channels_last if bare_format == "engine" and getattr(task, "channels_last", False) \
            else torch.contiguous_format
        self.order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(0))
        self.s = 0

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        n = len(self.order) // self.batch_size
        k = self.s % n
        self.s += 1
        idx = self.order[k * self.batch_size:(k + 1) * self.batch_size]
        x = self.pixels[idx].to(self.device, non_blocking=True)
        y = self.labels[idx].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            x = ((x.float().div_(255) - self.mean) / self.std).contiguous(memory_format=self.fmt)
            logits = self.model(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.smoothing)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def intervals(args, marks: list[tuple[float, float]]) -> tuple[list[float], float, list[float]]:
    """Per-step wall intervals after the warm-up, the window mean between the two synchronised marks,
    and per-step CPU time."""
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
    """Runs mode: N bare steps, a timestamp after each (synchronised at the window ends only)."""
    bare = BareLoop(make_cfg(args, data, out), args.bare_format)
    marks = []
    for s in range(args.steps):
        bare.step()
        if s in (args.warmup, args.steps - 1):
            _sync()  # a no-op on the CPU
        marks.append(_clock())
    return intervals(args, marks)


def run_interleaved(args, data: str, out: Path) -> dict:
    """Step mode: one engine run with a bare step after each of its steps -> per-step pairs."""
    from mmdemo.training import train

    for lst in (MARKS, RESUMES, BARE_STEPS, INTERLEAVED):
        lst.clear()
    SYNC_AT.clear()
    cfg = make_cfg(args, data, out)
    INTERLEAVED.append(BareLoop(cfg, args.bare_format))
    try:
        train(cfg)
    finally:
        INTERLEAVED.clear()
    shutil.rmtree(out, ignore_errors=True)
    # Engine step k: from where it resumed after bare step k-1 to its own end mark.
    engine = [(m[0] - r[0], m[1] - r[1]) for r, m in zip(RESUMES, MARKS[1:])]
    bare = BARE_STEPS[1:]
    skip = max(0, args.warmup - 1)
    return {"engine": engine[skip:], "bare": bare[skip:len(engine)]}


def measure_steps(args, data: str, work: Path, common: dict) -> None:
    pairs = []  # (engine wall, engine CPU, bare wall, bare CPU) per step
    for k in range(args.repeats):
        r = run_interleaved(args, data, work / f"run{k}")
        got = [(e[0], e[1], b[0], b[1]) for e, b in zip(r["engine"], r["bare"])]
        pairs += got
        emit("step_pairs_run", round(median([p[2] / p[0] for p in got]), 4), "bare/engine", run=k, steps=len(got),
             engine_ms=round(median([p[0] for p in got]) * 1000, 2), bare_ms=round(median([p[2] for p in got]) * 1000, 2),
             engine_steps_ms=[round(p[0] * 1000, 1) for p in got], bare_steps_ms=[round(p[2] * 1000, 1) for p in got],
             engine_cpu_ms=[round(p[1] * 1000, 1) for p in got], bare_cpu_ms=[round(p[3] * 1000, 1) for p in got])
    e_wall, e_cpu, b_wall, b_cpu = ([p[i] for p in pairs] for i in range(4))
    emit("bare_step_median", round(median(b_wall) * 1000, 2), "ms", steps=len(pairs), cpu_ms=round(median(b_cpu) * 1000, 2),
         **common)
    emit("engine_step_median", round(median(e_wall) * 1000, 2), "ms", steps=len(pairs),
         cpu_ms=round(median(e_cpu) * 1000, 2), **common)
    emit("engine_vs_bare_ratio", round(median([p[2] / p[0] for p in pairs]), 4), "bare/engine", target=">= 0.95",
         note="median over steps of (bare step / engine step), each engine step followed by a bare step",
         **common)
    emit("engine_vs_bare_ratio_of_medians", round(median(b_wall) / median(e_wall), 4), "bare/engine", **common)
    emit("engine_vs_bare_ratio_cpu_time", round(median([p[3] / p[1] for p in pairs]), 4), "bare/engine",
         note="median over steps of the per-step process CPU time ratio (all threads)", **common)
    emit("engine_images_per_s", round(args.batch_size / median(e_wall), 2), "images/s", **common)


def measure_runs(args, data: str, work: Path, common: dict) -> None:
    engine, bare, pair_ratios = [], [], []
    windows, cpu = {"bare": [], "engine": []}, {"bare": [], "engine": []}
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
    emit("bare_step_median", round(median(bare) * 1000, 2), "ms", steps=len(bare), **common)
    emit("engine_step_median", round(median(engine) * 1000, 2), "ms", steps=len(engine), **common)
    emit("engine_vs_bare_ratio_of_medians", round(median(bare) / median(engine), 4), "bare/engine",
         pair_ratios=[round(r, 4) for r in pair_ratios], **common)
    emit("engine_vs_bare_ratio", round(median(windows["bare"]) / median(windows["engine"]), 4), "bare/engine",
         target=">= 0.95", note="median over runs of (window time / steps), synchronised at both ends on a GPU",
         **common)
    emit("engine_vs_bare_ratio_cpu_time", round(median(cpu["bare"]) / median(cpu["engine"]), 4), "bare/engine",
         bare_cpu_ms=round(median(cpu["bare"]) * 1000, 2), engine_cpu_ms=round(median(cpu["engine"]) * 1000, 2),
         note="per-step process CPU time (all threads), medians", **common)
    emit("engine_images_per_s", round(args.batch_size / median(engine), 2), "images/s", **common)


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
    parser.add_argument("--repeats", type=int, default=4, help="engine runs (runs mode: runs of each, ABBA)")
    parser.add_argument("--mode", choices=("step", "runs"), default=None,
                        help="step: a bare step after every engine step (default on the CPU); runs: whole runs "
                             "in turn, timed between two synchronisations (default on a GPU, where a sync per "
                             "step would change what is measured)")
    parser.add_argument("--log-every", type=int, default=0, help="engine's log_every (0, its default: automatic)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--bare-format", choices=("plain", "engine"), default="plain",
                        help="plain: the bare loop feeds NCHW as a plain loop does; engine: it uses the "
                             "engine's input memory format too (channels-last for CNNs), isolating the "
                             "engine's own overhead")
    args = parser.parse_args(argv)
    if args.pretrained is None:
        args.pretrained = args.model == "efficientnet_lite0"

    import torch

    args.mode = args.mode or ("runs" if torch.cuda.is_available() else "step")
    if args.threads:
        torch.set_num_threads(args.threads)
    print_env()
    patch_step_clock()
    work = Path(tempfile.mkdtemp(prefix="mmdemo-evb-"))
    try:
        # Enough train rows for one epoch of --steps batches (80% of the rows go to train).
        per_class = -(-(args.steps + 1) * args.batch_size * 5 // 4 // 3)
        data = ingest_shapes(work, per_class)
        common = dict(model=args.model, method=args.method, batch_size=args.batch_size,
                      image_size=args.image_size or "model default", precision=args.precision,
                      log_every=args.log_every, device="cuda" if torch.cuda.is_available() else "cpu",
                      threads=torch.get_num_threads(), mode=args.mode, bare_format=args.bare_format)
        if args.mode == "step":
            measure_steps(args, data, work, common)
        else:
            measure_runs(args, data, work, common)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
