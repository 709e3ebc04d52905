"""One command that proves the training path on whatever device is there (a GPU: at most ~8 minutes).

    python bench/gpu_check.py            # every task x method, inference, export, throughput, LoRA vs full
    python bench/gpu_check.py --smoke    # the same sequence on the CPU with tiny models and sizes (CI)

1. Each task of the task registry (mmdemo/taskspec.py: tasks registered later are picked up) x each of
   its methods: a few dozen steps on the task's bundled sample, through the app's own path (JobManager,
   start_training, the child ``python -m mmdemo train``: bf16 autocast, fused AdamW, channels-last,
   loader workers, pinned memory, the GPU fit plan of mmdemo/fit.py). In --smoke the first method of each
   task runs as that child and the others in this process (the same ``train``), to stay near 90 s.
   prompt_tuning of the text tasks continues the task's first run (a fresh decoder refuses it, as the app does).
   Then inference from each run (the task's tab: Classify / Caption / Ask) and its export (hub.export_run).
2. Automatic micro-batch: a batch far too big for the device, fitted by real steps (--smoke: a
   simulated device).
3. Throughput: ViT-B/16 and ResNet-50 full and LoRA at 224 px (--smoke: timm test_vit / test_resnet at
   64 px), without and with torch.compile (not in --smoke: inductor's C++ build takes minutes on 2
   cores): images/s on resident batches, images/s fed by the engine's DataLoader (busy fraction = the
   resident step time / the fed one; also NVML's utilisation where pynvml is there), peak memory, MFU
   from a dense bf16 peak table keyed by device name (bench/gpu_throughput.py). LoRA / full ratios.

One JSON object per figure (bench/benchlib.emit); every failure is caught, printed as a
``{"figure": "failure", "check": ...}`` line, and the script goes on; the last line is
``{"ok": true|false, "summary": {...}}``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import shutil
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, emit, ingest_shapes, print_env  # noqa: E402
from gpu_throughput import NOMINAL_FWD_GFLOP, build, count_flops, make_step, peak_tflops  # noqa: E402

SAMPLES = {"classification": "sample_shapes.zip", "captioning": "sample_captions.zip", "vqa": "sample_vqa.zip",
           "image_text_classification": "sample_image_text.zip"}  # as ui/common.SAMPLES (no gradio import here)
FAILURES: list[str] = []


@contextmanager
def check(name: str, **tag):
    """Runs a block; an exception becomes a named failure line and the script goes on."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure is reported, none ends the run
        FAILURES.append(" ".join([name, *map(str, tag.values())])[:120])
        emit("failure", None, check=name, error=f"{type(e).__name__}: {e}"[:800],
             where=traceback.format_exc().strip().splitlines()[-3:], **tag)


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(steps=3, batch_size=4, image_size=64, classifier="test_resnet", vit_classifier="test_vit", rows=40,
                    models=("test_vit", "test_resnet"), tp_size=64, tp_batch=8, tp_steps=3, compile=(False,))
    return dict(steps=30, batch_size=0, image_size=0, classifier="", vit_classifier="vit_base_patch16_224", rows=0,
                models=("vit_base_patch16_224", "resnet50"), tp_size=224, tp_batch=128, tp_steps=30,
                compile=(False, True))


def small_copy(zip_path: Path, out: Path, rows: int) -> Path:
    """The sample unzipped, each metadata file (csv / jsonl) cut to its first ``rows`` rows."""
    shutil.unpack_archive(zip_path, out)
    for meta in [*out.rglob("*.jsonl"), *out.rglob("*.csv")]:
        lines = meta.read_text().splitlines()
        keep = lines[:rows + (1 if meta.suffix == ".csv" else 0)]
        meta.write_text("\n".join(keep) + "\n")
    return out


def dataset_for(task: str, work: Path, s: dict, smoke: bool) -> str:
    from mmdemo.data import ingest_dataset

    sample = ROOT / "assets" / SAMPLES.get(task, f"sample_{task}.zip")
    if not sample.exists():
        raise FileNotFoundError(f"no bundled sample for task {task!r} (looked for assets/{sample.name})")
    source = small_copy(sample, work / f"raw-{task}", s["rows"]) if smoke and task != "classification" else sample
    return ingest_dataset(source, work / "ws", task=task, val_fraction=0.25).path


# --- 1. tasks x methods through the app's path ------------------------------------------------------


def run_tasks(work: Path, s: dict, smoke: bool) -> dict:
    from mmdemo.jobs import JobManager, new_run_config, run_status, start_training
    from mmdemo.peft_methods import ADDED_METHODS
    from mmdemo.taskspec import TASK_SPECS
    from mmdemo.training import train

    manager = JobManager(root=work)
    runs = {}
    for task, spec in TASK_SPECS.items():
        dataset = None
        with check("dataset", task=task):
            dataset = dataset_for(task, work, s, smoke)
        for i, method in enumerate(spec.methods if dataset else ()):
            tag = dict(task=task, method=method)
            with check("train", **tag):
                params = dict(task=task, method=method, max_steps=s["steps"], log_every=1 if smoke else 10,
                              checkpoint_every_minutes=0, epochs=50)
                if s["batch_size"]:
                    params.update(batch_size=s["batch_size"], image_size=s["image_size"])
                if task == "classification" and s["classifier"]:
                    params.update(base_model=s["classifier"], pretrained=False)
                if task == "classification" and method in ADDED_METHODS:  # modules added to ViT blocks only
                    params.update(base_model=s["vit_classifier"], pretrained=False)
                if method == "prompt_tuning":  # a fresh decoder refuses it: it continues the task's first run
                    first = runs.get((task, spec.methods[0]))
                    if first is None:
                        raise RuntimeError(f"prompt_tuning continues the {spec.methods[0]} run, which did not complete")
                    params.update(base_model=first[1].name)
                cfg = new_run_config(work / "ws", dataset, **params)
                run_dir = Path(cfg.output_dir)
                t0 = time.time()
                path = "in-process" if smoke and i else "child"
                if path == "child":
                    start_training(cfg, manager)
                    while run_status(run_dir, manager)["status"] in ("queued", "running", "stopping") \
                            or manager.is_alive(run_dir):
                        time.sleep(0.3)
                else:
                    train(cfg)
                snap = run_status(run_dir, manager)
                report_run(run_dir, snap, time.time() - t0, path, tag)
                if snap["status"] != "completed":
                    log = (run_dir / "train.log").read_text(errors="replace")[-600:] if (run_dir / "train.log").exists() else ""
                    raise RuntimeError(f"status {snap['status']}: {snap['message']} {log}")
                runs[(task, method)] = (spec, run_dir)
            if (task, method) in runs:
                with check("inference", **tag):
                    infer(work / "ws", spec, run_dir, tag)
                with check("export", **tag):
                    export(run_dir, work / f"export-{task}-{method}", tag)
    return runs


def report_run(run_dir: Path, snap: dict, seconds: float, path: str, tag: dict) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next((r for r in records if r["type"] == "start"), {})
    train_lines = [r for r in records if r["type"] == "train"]
    ips = None
    if len(train_lines) >= 2:
        a, b = train_lines[0], train_lines[-1]
        ips = round((b["step"] - a["step"]) * start.get("images_per_step", 0) / max(1e-9, b["time"] - a["time"]), 1)
    emit("task_run_seconds", round(seconds, 1), "s", status=snap["status"], path=path, steps=snap["step"],
         device=start.get("device"), precision=start.get("precision"), num_workers=start.get("num_workers"),
         images_per_s=ips, metrics=snap["metrics"], **tag)
    for fit in (r for r in records if r["type"] in ("fit", "oom")):
        emit(f"task_{fit['type']}", fit.get("peak_bytes"), "bytes", **{k: v for k, v in fit.items() if k != "type"},
             **tag)


def infer(workspace: Path, spec, run_dir: Path, tag: dict) -> None:
    from PIL import Image

    from mmdemo import api

    image = Image.open(ROOT / "assets/examples/circle.png").convert("RGB")
    calls = {"Classify": lambda: api.classify(workspace, image, run_dir.name,
                                              text="what shape is it?" if "text" in spec.columns else ""),
             "Caption": lambda: api.caption(workspace, image, run_dir.name),
             "Ask": lambda: api.answer(workspace, image, "what shape is this?", run_dir.name),
             # retrieval: zero-shot labels through the run's two towers
             "Search": lambda: api.zero_shot(workspace, image, "a circle, a rectangle, a triangle", run_dir.name)}
    if spec.tab not in calls:
        raise NotImplementedError(f"gpu_check has no inference call for the {spec.tab!r} tab")
    t0 = time.perf_counter()
    out = calls[spec.tab]()  # the first call loads the model
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):
        calls[spec.tab]()
    emit("inference_ms", round((time.perf_counter() - t0) / 3 * 1000, 1), "ms", first_call_s=round(first, 2),
         output=str(out)[:120], **tag)


def export(run_dir: Path, out: Path, tag: dict) -> None:
    from mmdemo.hub import export_run

    files = export_run(run_dir, out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    emit("export_mb", round(size / 2**20, 2), "MiB", files=len(files), **tag)


# --- 2. the automatic micro-batch -------------------------------------------------------------------


def auto_batch(work: Path, dataset: str, smoke: bool) -> None:
    from mmdemo.config import TrainConfig
    from mmdemo.training import train

    # batch 64 / 4096 (too big: the search), then batch_size 0 (the automatic batch: the method's default).
    for name, batch_size in (("auto_micro_batch", 64 if smoke else 4096), ("auto_batch_zero", 0)):
        run = work / name
        if smoke:  # 20 MB + 10 MB per sample in 60 MB, less full's optimizer states: micro-batches of 2
            kw = dict(base_model="test_resnet", pretrained=False, image_size=64, batch_size=batch_size,
                      extra={"simulated_device": {"budget_mb": 60, "base_mb": 20, "per_sample_mb": 10}})
        else:  # ViT-B/16 full at 384 px: a batch of 4096 does not fit any GPU made today
            kw = dict(base_model="vit_base_patch16_224", pretrained=False, image_size=384, batch_size=batch_size)
        cfg = TrainConfig(data=dataset, output_dir=str(run), max_steps=1, epochs=1, checkpoint_every_minutes=0,
                          method="full", **kw)
        train(cfg)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        fit = next(r for r in records if r["type"] == "fit")
        if fit["auto"] != (batch_size == 0) or fit["micro_batch"] * fit["pieces"] < cfg.batch_size:
            raise AssertionError(f"{name}: the fit record does not keep the batch of {cfg.batch_size}: {fit}")
        emit(name, fit["micro_batch"], "images", pieces=fit["pieces"], probes=fit["probes"], auto=fit["auto"],
             peak_bytes=fit["peak_bytes"], capacity_bytes=fit["capacity_bytes"], device=fit["device"],
             eta_s=fit["eta_s"], batch_size=cfg.batch_size, model=kw["base_model"], image_size=kw["image_size"])


# --- 3. throughput ----------------------------------------------------------------------------------


def seconds_per_call(fn, device, warmup: int, calls: int) -> float:
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls


class Utilisation:
    """NVML's GPU utilisation (the share of time a kernel ran), sampled in a thread; None without pynvml."""

    def __init__(self):
        self.samples, self._stop = [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception:  # noqa: BLE001 - no NVML: the busy fraction from timings alone
            self._read = None

    def __enter__(self):
        if self._read:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.05):
            self.samples.append(self._read())

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mean(self):
        return round(sum(self.samples) / len(self.samples) / 100, 3) if self.samples else None


def fed_seconds(step, dataset: str, size: int, batch: int, steps: int, device) -> tuple[float, float | None]:
    """Seconds per step with batches from the engine's data path (decoded uint8 tensors, augmentation in
    loader workers, pinned memory), and NVML's utilisation meanwhile."""
    import torch

    from mmdemo.config import TrainConfig
    from mmdemo.data import load_splits
    from mmdemo.images import ImageTensors
    from mmdemo.training import loader_workers

    split = load_splits(dataset)["train"]
    ds = ImageTensors(split, size, list(range(len(split.features["label"].names))), train=True)
    workers = loader_workers(TrainConfig(data=dataset, output_dir="unused"))
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=batch * (steps + 3))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False, drop_last=True)
    it = iter(loader)
    for _ in range(3):  # workers started, first batches made
        x, y = next(it)
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    with Utilisation() as util:
        t0 = time.perf_counter()
        for x, y in it:
            step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        sync()
        dt = (time.perf_counter() - t0) / steps
    return dt, util.mean


def throughput(dataset: str, s: dict) -> None:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = peak_tflops(argparse.Namespace(peak_tflops=0.0), name) if device.type == "cuda" else None
    b, size = s["tp_batch"], s["tp_size"]
    for model in s["models"]:
        results = {}
        for method in ("full", "lora"):
            for compiled in s["compile"]:
                tag = dict(model=model, method=method, compiled=compiled, batch_size=b, image_size=size, device=name)
                with check("throughput", **tag):
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    step = make_step(build(model, method, False), method, device, dtype,
                                     channels_last="all" if "resnet" in model else "none", compile_=compiled)
                    x = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=device)
                    y = torch.randint(0, 10, (b,), device=device)
                    dt = seconds_per_call(functools.partial(step, x, y), device, 3, s["tp_steps"])
                    flops = count_flops(step, x, y) / b if not compiled else results[(method, False)]["flops"]
                    mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
                    fed, util = fed_seconds(step, dataset, size, b, s["tp_steps"], device)
                    results[(method, compiled)] = {"dt": dt, "mem": mem, "flops": flops}
                    emit("train_images_per_s", round(b / dt, 1), "images/s", fed_images_per_s=round(b / fed, 1), **tag)
                    emit("busy_fraction", round(min(1.0, dt / fed), 3), "resident step / fed step",
                         nvml_utilisation=util, target=">= 0.95", **tag)
                    emit("peak_memory", round(mem / 2**30, 3) if mem else None, "GiB", **tag)
                    nominal = 3 * NOMINAL_FWD_GFLOP.get(model, 0) * 1e9
                    emit("mfu", round(b / dt * flops / (peak * 1e12), 4) if peak else None,
                         "fraction of dense bf16 peak", counted_gflop_per_image=round(flops / 1e9, 3),
                         mfu_nominal_3x_forward=round(b / dt * nominal / (peak * 1e12), 4) if peak and nominal else None,
                         peak_tflops=peak, target=">= 0.45 (ViT-B/16 full, H100 class)" if "vit" in model else None,
                         **tag)
                    del step, x, y
        with check("lora_vs_full", model=model):
            full, lora = results[("full", False)], results[("lora", False)]
            emit("lora_vs_full_step_time", round(lora["dt"] / full["dt"], 4), "lora/full", model=model, device=name)
            emit("lora_vs_full_memory", round(lora["mem"] / full["mem"], 4) if full["mem"] else None, "lora/full",
                 model=model, device=name)
    if len(s["compile"]) == 1:
        emit("compile", None, skipped=True, reason="--smoke: torch.compile's C++ build takes minutes on 2 CPU cores")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes on the CPU (CI)")
    parser.add_argument("--only", choices=("tasks", "auto_batch", "throughput"), help="one part only")
    args = parser.parse_args(argv)
    import torch

    if args.smoke and torch.cuda.is_available():
        torch.cuda.is_available = lambda: False  # --smoke means the CPU, also on a GPU machine
    print_env()
    s = sizes(args.smoke)
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        with check("shapes_dataset"):
            shapes = ingest_shapes(work / "shapes", per_class=12 if args.smoke else 200, side=96 if args.smoke else 256)
        runs = {}
        if args.only in (None, "tasks"):
            runs = run_tasks(work, s, args.smoke)
        if args.only in (None, "auto_batch"):
            with check("auto_batch"):
                auto_batch(work, shapes, args.smoke)
        if args.only in (None, "throughput"):
            throughput(shapes, s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"seconds": round(time.time() - started, 1), "smoke": args.smoke, "failures": FAILURES,
               "runs_completed": len(runs), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    print(json.dumps({"ok": not FAILURES, "summary": summary}), flush=True)
    return 0 if not FAILURES else 1


if __name__ == "__main__":
    sys.exit(main())
