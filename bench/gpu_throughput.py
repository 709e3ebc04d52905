"""Benchmarks 3 and 4: GPU training throughput and MFU; LoRA vs full fine-tuning (peak memory, step time).

    python bench/gpu_throughput.py                     # GPU figures with CUDA ("skipped" lines without), CPU part always
    python bench/gpu_throughput.py --compile           # also torch.compile, with its compile time
    python bench/gpu_throughput.py --peak-tflops 989   # a GPU the table below does not know

GPU part (only with CUDA): ViT-B/16 (timm ``vit_base_patch16_224``) and ResNet-50 at 224 px, random
init, built through the engine's own registry and PEFT path (``build_classifier`` + ``apply_method``,
so LoRA has the engine's targets), bf16 autocast, TF32, channels-last for the CNN, fused AdamW, SDPA
attention (timm's default), batches resident on the GPU (the input pipeline is benchmark 2). Per
model x method: images/s, step time, peak memory (``torch.cuda.max_memory_allocated``), and MFU =
achieved FLOP/s / the GPU's dense bf16 peak. FLOPs per trained image are counted by
``torch.utils.flop_counter.FlopCounterMode`` over one real step (forward + backward), so LoRA, which
computes no weight gradients for the frozen layers, is charged what it does; the nominal 3 x forward
figure (ViT-B/16: 3 x 35.2 = 105.6 GFLOP) is printed beside it.

CPU part (4 on the CPU): the default model (efficientnet_lite0, 160 px, batch 16, channels-last input
as the engine feeds it) full vs LoRA, each
variant in a fresh subprocess (A, B, B, A, ...): step-time median and the peak resident memory
(VmHWM from /proc/self/status, reset with /proc/self/clear_refs once the model is built), both as
it is and less the resident memory of the built model (what training itself adds: gradients,
optimizer state, activations).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cuda_seconds_per_call, emit, median, print_env, skipped  # noqa: E402

# Dense bf16 peak (no sparsity) in TFLOP/s, matched on the device name.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0),
                    ("A10G", 70.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.0), ("B200", 2250.0)]
NOMINAL_FWD_GFLOP = {"vit_base_patch16_224": 35.2, "resnet50": 8.2}  # 2 x multiply-adds, 224 px
GPU_MODELS = ("vit_base_patch16_224", "resnet50")
LABELS = [f"class_{i}" for i in range(10)]


def build(name: str, method: str, pretrained: bool):
    from mmdemo.models import apply_method, build_classifier

    clf, _ = build_classifier(name, LABELS, pretrained)
    apply_method(clf, method)
    return clf


def make_step(clf, method: str, device, dtype, channels_last: str, compile_: bool):
    """One training step on uint8 pixels, the engine's way: normalise on the device, autocast, AdamW.

    channels_last: "none"; "input" (the engine's way: ClassificationTask converts a CNN's input only);
    "all" (weights too, the usual GPU recipe)."""
    import torch
    import torch.nn.functional as F

    from mmdemo.images import normalize

    clf = clf.to(device)
    if channels_last == "all":
        clf = clf.to(memory_format=torch.channels_last)
    clf.train(method not in ("head", "lora"))  # as ClassificationTask.train_mode
    params = [p for p in clf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as the engine
    pre = clf.preprocess
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    forward = torch.compile(clf) if compile_ else clf
    fmt = torch.channels_last if channels_last != "none" else torch.contiguous_format

    def step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = forward(normalize(x, mean, std).contiguous(memory_format=fmt)).float()
        loss = F.cross_entropy(logits, y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step.model = clf
    return step


def count_flops(step, x, y) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(x, y)
    return float(counter.get_total_flops())


def peak_tflops(args, name: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    return next((v for key, v in PEAK_BF16_TFLOPS if key in name), None)


def gpu_part(args) -> None:
    import torch

    if not torch.cuda.is_available():
        for model in GPU_MODELS:
            for method in ("full", "lora"):
                skipped("gpu_train_images_per_s", "no CUDA device on this machine", model=model, method=method)
                skipped("gpu_mfu", "no CUDA device on this machine", model=model, method=method)
                skipped("gpu_peak_memory", "no CUDA device on this machine", model=model, method=method)
        return
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(0)
    peak = peak_tflops(args, gpu)
    results = {}
    for model in GPU_MODELS:
        for method in ("full", "lora"):
            for compiled in ([False, True] if args.compile else [False]):
                b = args.batch_size
                gc.collect()  # the previous variant's model, optimizer and compiled graph
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                step = make_step(build(model, method, False), method, dev, torch.bfloat16,
                                 channels_last="all" if model.startswith("resnet") else "none", compile_=compiled)
                x = torch.randint(0, 256, (b, 3, 224, 224), dtype=torch.uint8, device=dev)
                y = torch.randint(0, len(LABELS), (b,), device=dev)
                t0 = time.perf_counter()
                step(x, y)
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                dt = cuda_seconds_per_call(functools.partial(step, x, y), args.warmup, args.steps)
                mem = torch.cuda.max_memory_allocated()
                flops = count_flops(step, x, y) / b if not compiled else results[(model, method, False)]["flops"]
                ips = b / dt
                tag = dict(model=model, method=method, compiled=compiled, batch_size=b, precision="bf16",
                           image_size=224, device=gpu)
                results[(model, method, compiled)] = {"flops": flops, "dt": dt, "mem": mem}
                emit("gpu_train_images_per_s", round(ips, 1), "images/s", step_ms=round(dt * 1000, 2), **tag)
                if compiled:
                    emit("gpu_compile_seconds", round(first - dt, 1), "s", note="first step minus a steady step",
                         **tag)
                nominal = 3 * NOMINAL_FWD_GFLOP[model] * 1e9
                emit("gpu_mfu", round(ips * flops / (peak * 1e12), 4) if peak else None, "fraction of dense bf16 peak",
                     counted_gflop_per_image=round(flops / 1e9, 2),
                     mfu_nominal_3x_forward=round(ips * nominal / (peak * 1e12), 4) if peak else None,
                     peak_tflops=peak, target=">= 0.45 for ViT-B/16 full" if model.startswith("vit") else None,
                     **tag)
                emit("gpu_peak_memory", round(mem / 2**30, 3), "GiB", **tag)
                del step, x, y
        full, lora = results[(model, "full", False)], results[(model, "lora", False)]
        emit("gpu_lora_vs_full_memory", round(lora["mem"] / full["mem"], 4), "lora/full", model=model, device=gpu)
        emit("gpu_lora_vs_full_step_time", round(lora["dt"] / full["dt"], 4), "lora/full", model=model, device=gpu)


# --- CPU part: one variant per fresh process ----------------------------------------------------------


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    """Runs one variant and prints {"step_s": [...], "peak_rss": ..., "rss_built": ...} as its last line."""
    import torch

    torch.manual_seed(0)
    step = make_step(build(args.cpu_model, args.child, args.cpu_model == "efficientnet_lite0"), args.child,
                     torch.device("cpu"), None, channels_last="input", compile_=False)
    size, b = args.cpu_image_size, args.cpu_batch
    x = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8)
    y = torch.randint(0, len(LABELS), (b,))
    rss_built = _vm("VmRSS")  # model built, nothing trained yet
    try:  # reset the high-water mark so only training counts (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    step(x, y)  # first step, untimed: optimizer state, gradients, allocator warm-up
    times = []
    for _ in range(args.cpu_steps):
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in step.model.parameters() if p.requires_grad)
    print(json.dumps({"step_s": times, "peak_rss": _vm("VmHWM"), "rss_built": rss_built,
                      "hwm_reset": reset, "trainable": trainable}), flush=True)


def cpu_part(args) -> None:
    import os

    samples = {"full": [], "lora": []}
    peaks = {"full": [], "lora": []}
    extra = {"full": [], "lora": []}  # training's own peak: VmHWM over the steps - RSS of the built model
    order = ["full", "lora", "lora", "full"] * args.cpu_repeats
    for method in order[:2 * args.cpu_repeats]:
        cmd = [sys.executable, __file__, "--child", method, "--cpu-steps", str(args.cpu_steps), "--cpu-batch",
               str(args.cpu_batch), "--cpu-image-size", str(args.cpu_image_size), "--cpu-model", args.cpu_model]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        samples[method].append(median(r["step_s"]))
        peaks[method].append(r["peak_rss"])
        extra[method].append(r["peak_rss"] - r["rss_built"])
        emit("cpu_variant_run", round(median(r["step_s"]) * 1000, 1), "ms", method=method,
             peak_rss_mib=round(r["peak_rss"] / 2**20, 1), rss_built_mib=round(r["rss_built"] / 2**20, 1),
             hwm_reset=r["hwm_reset"], trainable_params=r["trainable"])
    tag = dict(model=args.cpu_model, image_size=args.cpu_image_size, batch_size=args.cpu_batch, device="cpu",
               precision="fp32")
    for method in ("full", "lora"):
        emit("cpu_step_time", round(median(samples[method]) * 1000, 1), "ms", method=method, **tag)
        emit("cpu_peak_rss", round(median(peaks[method]) / 2**20, 1), "MiB", method=method,
             note="VmHWM of a fresh process over the training steps (process baseline included)", **tag)
        emit("cpu_training_peak_memory", round(median(extra[method]) / 2**20, 1), "MiB", method=method,
             note="VmHWM over the steps minus the RSS once the model is built: what training adds", **tag)
    emit("cpu_lora_vs_full_step_time", round(median(samples["lora"]) / median(samples["full"]), 4), "lora/full", **tag)
    emit("cpu_lora_vs_full_peak_rss", round(median(peaks["lora"]) / median(peaks["full"]), 4), "lora/full", **tag)
    emit("cpu_lora_vs_full_training_memory", round(median(extra["lora"]) / median(extra["full"]), 4), "lora/full",
         **tag)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128, help="GPU batch")
    parser.add_argument("--steps", type=int, default=30, help="GPU timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="GPU: also time torch.compile variants")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak; 0: from the table")
    parser.add_argument("--cpu-model", default="efficientnet_lite0")
    parser.add_argument("--cpu-image-size", type=int, default=160)
    parser.add_argument("--cpu-batch", type=int, default=16)
    parser.add_argument("--cpu-steps", type=int, default=6)
    parser.add_argument("--cpu-repeats", type=int, default=3)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    print_env()
    gpu_part(args)
    if not args.skip_cpu:
        cpu_part(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
