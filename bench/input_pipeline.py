"""Benchmark 2: how fast the ingested dataset delivers augmented batches, and whether a GPU waits for them.

    python bench/input_pipeline.py                 # CPU figures; the GPU part prints a "skipped" line without CUDA
    python bench/input_pipeline.py --sizes 224 --gpu-batch 256

CPU part: an ingested dataset (drawn shapes, ``mmdemo.data.ingest_dataset``) decoded once into
``mmdemo.images.ImageTensors`` with the standard train augmentation (RandomResizedCrop + flip on
uint8 tensors), read through ``torch.utils.data.DataLoader`` the way the engine builds it
(EpochSampler, default collate) with num_workers 0 (in the main process, 1 torch thread) and 1 (one
worker process, which DataLoader limits to 1 thread). Both use one core for the augmentation. Per
core = images per CPU-second of the process that does the work (read from /proc: on a shared
machine wall time also counts the other jobs); wall-clock images/s is printed too. The variants
alternate (A, B, C, C, B, A, ...) and medians are reported; "no augmentation" (indexing + collate
only) is the floor.

GPU part (only with CUDA): ViT-B/16 and ResNet-50 at 224 px, bf16, fused AdamW, full fine-tuning.
The busy fraction is the step time on batches already resident on the GPU divided by the step time
when the batches come from the DataLoader (pinned memory, non-blocking copies, persistent workers):
1.0 means the GPU never waits for data. The per-step time the loop spends waiting in ``next()`` is
reported as well.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cuda_seconds_per_call, emit, ingest_shapes, median, print_env, skipped  # noqa: E402


def make_loader(ds, batch_size: int, workers: int, pin: bool = False, prefetch: int = 2):
    import torch

    from mmdemo.training import EpochSampler

    kw = dict(prefetch_factor=prefetch, persistent_workers=True) if workers else {}
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=EpochSampler(len(ds), 0), num_workers=workers,
                                       drop_last=True, pin_memory=pin, **kw)


def batches(loader):
    """Endless batches, a new epoch (and a new sampler permutation) each time one ends."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def worker_cpu_seconds(loader) -> float:
    """User + system CPU time of a loader's worker processes so far (from /proc/<pid>/stat)."""
    total = 0
    for w in loader._iterator._workers:
        fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def time_batches(it, loader, n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds spent producing the batches) for n batches in steady state.

    A worker has up to prefetch_factor batches ready while another variant was being timed: those
    are taken untimed first. CPU time is the worker's (num_workers 1) or this process's (0): on a
    shared machine it measures the work per core, where wall time also measures the other jobs."""
    if loader.num_workers:
        for _ in range(loader.prefetch_factor * loader.num_workers):
            next(it)
    cpu = worker_cpu_seconds if loader.num_workers else (lambda _: time.process_time())
    c0, t0 = cpu(loader), time.perf_counter()
    for _ in range(n):
        next(it)
    return time.perf_counter() - t0, cpu(loader) - c0


def cpu_part(args, splits) -> dict:
    import torch

    from mmdemo.images import ImageTensors

    torch.set_num_threads(1)  # "per core": the in-process variant gets exactly one core's worth of threads
    label_map = list(range(len(splits["train"].features["label"].names)))
    rates = {}
    # ImageTensors imports torchvision's v2 transforms: that first import takes seconds, not part of the decode.
    import torchvision.transforms.v2  # noqa: F401

    for size in args.sizes:
        t0, c0 = time.perf_counter(), time.process_time()
        aug = ImageTensors(splits["train"], size, label_map, train=True)
        emit("decode_images_per_cpu_second", round(len(aug) / (time.process_time() - c0), 1), "images/s/core",
             image_size=size, wall_images_per_s=round(len(aug) / (time.perf_counter() - t0), 1),
             note="one-time PNG decode + resize into uint8 (ImageTensors construction), 1 thread")
        plain = ImageTensors(splits["train"], size, label_map, train=False)
        variants = {("augment", 0): make_loader(aug, args.batch_size, 0),
                    ("augment", 1): make_loader(aug, args.batch_size, 1),
                    ("none", 0): make_loader(plain, args.batch_size, 0)}
        iters = {k: batches(v) for k, v in variants.items()}
        for k, it in iters.items():  # warm-up: worker start-up, first epoch permutation
            t0 = time.perf_counter()
            next(it)
            emit("loader_first_batch_s", round(time.perf_counter() - t0, 3), "s", image_size=size, augment=k[0],
                 num_workers=k[1])
        samples = {k: [] for k in variants}
        cpu_samples = {k: [] for k in variants}
        keys = list(variants)
        n = args.batch_size * args.batches
        for r in range(args.repeats):
            for k in (keys if r % 2 == 0 else keys[::-1]):
                wall, cpu = time_batches(iters[k], variants[k], args.batches)
                samples[k].append(n / wall)
                cpu_samples[k].append(n / max(cpu, 1e-3))
        for (augment, workers), xs in samples.items():
            rate, cpu_rate = median(xs), median(cpu_samples[(augment, workers)])
            rates[(size, augment, workers)] = cpu_rate
            tag = dict(image_size=size, augment=augment, num_workers=workers, batch_size=args.batch_size,
                       stored_side=aug.pixels.shape[-1] if augment == "augment" else plain.pixels.shape[-1])
            emit("input_images_per_cpu_second", round(cpu_rate, 1), "images/s/core",
                 repeats=[round(x, 1) for x in cpu_samples[(augment, workers)]],
                 note="images per CPU-second of the process doing the work (the worker for num_workers 1)", **tag)
            emit("input_images_per_s_wall", round(rate, 1), "images/s", repeats=[round(x, 1) for x in xs],
                 note="wall clock, one core's worth of threads; slowed by whatever else runs on the machine", **tag)
        del iters, variants
    return rates


def gpu_part(args, splits, rates) -> None:
    import torch

    if not torch.cuda.is_available():
        for model in ("vit_base_patch16_224", "resnet50"):
            skipped("gpu_busy_fraction", "no CUDA device on this machine", model=model)
        return
    import timm
    import torch.nn.functional as F

    from mmdemo.images import ImageTensors, normalize

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda")
    label_map = list(range(len(splits["train"].features["label"].names)))
    ds = ImageTensors(splits["train"], 224, label_map, train=True)
    workers = args.gpu_workers or max(1, min(8, (os.cpu_count() or 2) - 1))
    mean = torch.tensor((0.5,) * 3, device=dev).view(1, 3, 1, 1)
    std = torch.tensor((0.5,) * 3, device=dev).view(1, 3, 1, 1)
    for name in ("vit_base_patch16_224", "resnet50"):
        model = timm.create_model(name, pretrained=False, num_classes=len(label_map)).to(dev)
        fmt = torch.channels_last if name.startswith("resnet") else torch.contiguous_format
        model = model.to(memory_format=fmt).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(x, y):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(normalize(x, mean, std).contiguous(memory_format=fmt)).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        b = args.gpu_batch
        xr = ds.pixels[:b, :, :224, :224].to(dev)
        yr = ds.labels[:b].to(dev)
        resident = cuda_seconds_per_call(lambda: step(xr, yr), 5, args.gpu_steps)

        it = batches(make_loader(ds, b, workers, pin=True, prefetch=4))
        for _ in range(5):
            x, y = next(it)
            step(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
        torch.cuda.synchronize()
        waits = []
        t0 = time.perf_counter()
        for _ in range(args.gpu_steps):
            tw = time.perf_counter()
            x, y = next(it)
            waits.append(time.perf_counter() - tw)
            step(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
        torch.cuda.synchronize()
        fed = (time.perf_counter() - t0) / args.gpu_steps
        emit("gpu_busy_fraction", round(min(1.0, resident / fed), 4), "fraction", model=name, batch_size=b,
             num_workers=workers, resident_step_ms=round(resident * 1000, 2), loader_step_ms=round(fed * 1000, 2),
             median_wait_ms=round(median(waits) * 1000, 3), max_wait_ms=round(max(waits) * 1000, 3),
             gpu_images_per_s=round(b / resident, 1),
             workers_needed=round(b / resident / max(1e-9, rates.get((224, "augment", 1), float("nan"))), 1))
        model = opt = it = None  # free the GPU memory before the next model
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[160, 224])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="batches per timed sample")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=120, help="images per class in the ingested dataset")
    parser.add_argument("--gpu-batch", type=int, default=128)
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument("--gpu-workers", type=int, default=0, help="0: min(8, cores - 1)")
    args = parser.parse_args(argv)

    print_env()
    from mmdemo.data import load_splits

    work = Path(tempfile.mkdtemp(prefix="mmdemo-input-"))
    try:
        # 320 px sources: the stored train pixels (1.15 x the input size) are downscaled, as with photos.
        import torch

        # A GPU epoch should hold many batches (an epoch boundary restarts the workers' prefetch).
        per_class = max(args.per_class, args.gpu_batch * 4) if torch.cuda.is_available() else args.per_class
        splits = load_splits(ingest_shapes(work, per_class, side=320))
        rates = cpu_part(args, splits)
        gpu_part(args, splits, rates)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
