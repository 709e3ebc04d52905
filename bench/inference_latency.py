"""Benchmark 5: inference latency p50 / p95 for classify, caption and answer; batched classify throughput.

    python bench/inference_latency.py                  # CPU figures; GPU lines say "skipped" without CUDA
    python bench/inference_latency.py --calls 50 --train-steps 5

classify: ``mmdemo.inference.classify`` with the embedded ImageNet default (efficientnet_lite0, 224 px),
one call per image as the app makes it (resize + crop, normalise, forward, top-5). caption / answer:
``mmdemo.inference.caption`` / ``answer`` on a composed model (efficientnet_lite0 + MiniLM, the offline
default) trained for a few steps (``--train-steps``) on assets/sample_captions.zip / sample_vqa.zip
through ``mmdemo.data.ingest_dataset`` (validation cut to ``--val-rows`` rows, so the run's own
evaluations stay short) and ``mmdemo.training.train``: latency does not depend on how
well it was trained, except through how many tokens it generates, which is printed with each figure.
The first call (model load + first forward) is reported apart as "cold"; p50 / p95 are over
``--calls`` warm calls on the example images in turn.

Batched classify throughput: ``mmdemo.inference.classify_batch`` over batches of 1, 8 and 32 images
(images/s, preprocessing included and also reported alone), with the engine's channels-last input
and, interleaved, with contiguous NCHW input.

GPU (only with CUDA): the CPU figures come first (MMDEMO_INFERENCE_DEVICE=cpu); then the same calls
where the engine puts its models by itself, the GPU (fp32).
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
from benchlib import ROOT, emit, median, percentile, print_env, skipped  # noqa: E402

EXAMPLES = sorted((ROOT / "assets" / "examples").glob("*.jpg")) + sorted((ROOT / "assets" / "examples").glob("*.png"))
QUESTION = "What shape is in the picture?"


def images():
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in EXAMPLES]


def latencies(fn, imgs, calls: int) -> tuple[list[float], list]:
    times, outs = [], []
    for k in range(calls):
        t0 = time.perf_counter()
        outs.append(fn(imgs[k % len(imgs)]))
        times.append(time.perf_counter() - t0)
    return times, outs


def emit_latency(name: str, times: list[float], **extra) -> None:
    emit(f"{name}_latency_p50", round(percentile(times, 50) * 1000, 1), "ms", calls=len(times), **extra)
    emit(f"{name}_latency_p95", round(percentile(times, 95) * 1000, 1), "ms", calls=len(times), **extra)


def shrink_validation(dataset_dir: str, rows: int, out: Path) -> str:
    """A copy of an ingested dataset with only the first ``rows`` validation rows: the run's
    evaluations (generation over the whole split, twice) would cost far more than the latencies."""
    import datasets

    from mmdemo.data import load_splits

    splits = load_splits(dataset_dir)
    small = datasets.DatasetDict({k: (v.select(range(min(rows, len(v)))) if k == "validation" else v)
                                  for k, v in splits.items()})
    small.save_to_disk(str(out / "data"))
    shutil.copy(Path(dataset_dir) / "summary.json", out / "summary.json")
    return str(out)


def train_text_model(task: str, zip_name: str, work: Path, steps: int, val_rows: int) -> Path:
    from mmdemo.config import TrainConfig
    from mmdemo.data import ingest_dataset
    from mmdemo.training import train

    t0 = time.perf_counter()
    summary = ingest_dataset(ROOT / "assets" / zip_name, work / "ws", task=task)
    data = shrink_validation(summary.path, val_rows, work / f"small-{task}")
    run_dir = work / f"run-{task}"
    train(TrainConfig(data=data, output_dir=str(run_dir), task=task, max_steps=steps))
    emit(f"{task}_setup_seconds", round(time.perf_counter() - t0, 1), "s",
         note=f"ingest + {steps} training steps + evaluation on {val_rows} validation rows (not a latency)")
    return run_dir


def classify_part(args, imgs) -> None:
    import torch

    from mmdemo.images import resize_center_crop
    from mmdemo.inference import classify, classify_batch, load_predictor

    t0 = time.perf_counter()
    classify(imgs[0])
    emit("classify_cold_seconds", round(time.perf_counter() - t0, 2), "s", note="model build + first call")
    # Default threads and 1 thread, call by call in turn: on a busy machine two threads that wait for
    # each other at every layer can be much slower than one.
    threads = torch.get_num_threads()
    variants = [threads, 1] if threads > 1 else [threads]
    times = {t: [] for t in variants}
    for k in range(args.calls):
        for t in variants:
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            classify(imgs[k % len(imgs)])
            times[t].append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    for t in variants:
        emit_latency("classify" if t == threads else "classify_1thread", times[t], device="cpu",
                     model="efficientnet_lite0 ImageNet, 224 px", threads=t)

    # Batched: the engine's own batched entry point (preprocessing included), channels-last input
    # (what the engine does for a CNN) against contiguous NCHW, interleaved batch by batch.
    clf = load_predictor(None, "classification")
    for b in (1, 8, 32):
        batch = [imgs[k % len(imgs)] for k in range(b)]
        total = {True: [], False: []}
        for _ in range(args.batch_repeats + 1):  # the first round is a warm-up at this shape
            for fmt in (True, False):
                clf.channels_last_input = fmt
                t0 = time.perf_counter()
                classify_batch(batch)
                total[fmt].append(time.perf_counter() - t0)
        clf.channels_last_input = True
        prep = []
        for _ in range(args.batch_repeats):
            t0 = time.perf_counter()
            [resize_center_crop(im, clf.preprocess.image_size, clf.preprocess.crop_pct) for im in batch]
            prep.append(time.perf_counter() - t0)
        fast, plain = median(total[True][1:]), median(total[False][1:])
        emit("classify_batched_images_per_s", round(b / fast, 1), "images/s", batch_size=b, device="cpu",
             memory_format="channels_last (the engine's)", contiguous_nchw_images_per_s=round(b / plain, 1),
             speedup=round(plain / fast, 2), preprocess_images_per_s=round(b / median(prep), 1),
             repeats=args.batch_repeats)


def text_part(args, imgs, work: Path) -> dict:
    from mmdemo.inference import answer, caption

    runs = {}
    for task, zip_name in (("captioning", "sample_captions.zip"), ("vqa", "sample_vqa.zip")):
        run_dir = train_text_model(task, zip_name, work, args.train_steps, args.val_rows)
        runs[task] = run_dir
        if task == "captioning":
            def fn(im, run_dir=run_dir):
                return caption(im, run_dir)
        else:
            def fn(im, run_dir=run_dir):
                return answer(im, QUESTION, run_dir)
        name = "caption" if task == "captioning" else "answer"
        t0 = time.perf_counter()
        fn(imgs[0])
        emit(f"{name}_cold_seconds", round(time.perf_counter() - t0, 2), "s", note="model load + first call")
        times, outs = latencies(fn, imgs, args.calls)
        words = median([len(o.split()) for o in outs])
        emit_latency(name, times, device="cpu", model="efficientnet_lite0+minilm (composed, offline default)",
                     median_words_generated=words, max_new_tokens=30 if name == "caption" else 10,
                     example_output=outs[0])
    return runs


def gpu_part(args, imgs, runs: dict) -> None:
    import torch

    if not torch.cuda.is_available():
        for name in ("classify", "caption", "answer"):
            skipped(f"{name}_latency_p50_gpu", "no CUDA device on this machine")
        skipped("classify_batched_images_per_s_gpu", "no CUDA device on this machine")
        return
    from mmdemo.inference import answer, caption, classify, classify_batch

    os.environ.pop("MMDEMO_INFERENCE_DEVICE", None)  # the engine now moves its models to the GPU itself
    name = torch.cuda.get_device_name(0)
    for _ in range(3):
        classify(imgs[0])
    times, _ = latencies(classify, imgs, args.calls)
    emit_latency("classify_gpu", times, device=name, precision="fp32")
    for b in (1, 32, 256):
        batch = [imgs[k % len(imgs)] for k in range(b)]
        classify_batch(batch)
        ts = []
        for _ in range(args.batch_repeats):
            t0 = time.perf_counter()
            classify_batch(batch)
            ts.append(time.perf_counter() - t0)
        emit("classify_batched_images_per_s_gpu", round(b / median(ts), 1), "images/s", batch_size=b, device=name,
             note="CPU preprocessing included")
    for task, label in (("captioning", "caption"), ("vqa", "answer")):
        def fn(im, task=task, label=label):
            return caption(im, runs[task]) if label == "caption" else answer(im, QUESTION, runs[task])

        fn(imgs[0])
        times, _ = latencies(fn, imgs, args.calls)
        emit_latency(f"{label}_gpu", times, device=name, precision="fp32")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--batch-repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=3, help="training steps of the caption / VQA models")
    parser.add_argument("--val-rows", type=int, default=8, help="validation rows kept for those runs' evaluations")
    args = parser.parse_args(argv)

    import datasets

    datasets.disable_progress_bars()
    os.environ["MMDEMO_INFERENCE_DEVICE"] = "cpu"  # CPU figures first, even where there is a GPU
    print_env()
    imgs = images()
    work = Path(tempfile.mkdtemp(prefix="mmdemo-infer-"))
    try:
        classify_part(args, imgs)
        runs = text_part(args, imgs, work)
        gpu_part(args, imgs, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
