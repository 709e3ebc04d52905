"""The offline default captioning / VQA model on a bundled sample: default recipe, held-out figures, time.

    python bench/text_default.py --task vqa           # assets/sample_vqa.zip
    python bench/text_default.py --task captioning    # assets/sample_captions.zip
    python bench/text_default.py --task vqa --learning-rate 1e-3 --epochs 2    # a recipe other than the default
    OMP_NUM_THREADS=1 python bench/text_default.py --task vqa --images 400     # a smaller set: the first 400 images

``--images N`` keeps the first N images of the sample's training files (VQA: of its 800 images, with all
their questions; captioning: of train/, easy-VQA's test/ kept whole) before the ingest holds out its 20 %.

One JSON line per figure: ingest and training time, the main metric and exact match on the validation
split (images never seen in training) after every evaluation and at the end, and, for captioning,
exact match on easy-VQA's own test images through ``mmdemo.inference.caption``.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, emit  # noqa: E402

SAMPLES = {"vqa": "sample_vqa.zip", "captioning": "sample_captions.zip"}


def first_images(zip_path: Path, folder: Path, n: int) -> Path:
    """The sample unpacked into ``folder`` with each training metadata.jsonl cut to the rows of its first ``n``
    images (in file order); a ``test/`` part stays whole."""
    import zipfile

    with zipfile.ZipFile(zip_path) as z:
        z.extractall(folder)
    for meta in folder.rglob("metadata.jsonl"):
        if meta.parent.name == "test":
            continue
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        kept = sorted({r["file_name"] for r in rows})[:n]
        meta.write_text("".join(json.dumps(r) + "\n" for r in rows if r["file_name"] in set(kept)))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=sorted(SAMPLES), default="vqa")
    parser.add_argument("--learning-rate", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--images", type=int, default=0, help="keep only the first N images (0: all)")
    parser.add_argument("--method", default="", help="the method ('': what the defaults pick for the data)")
    args = parser.parse_args()

    from mmdemo.config import TrainConfig
    from mmdemo.data import ingest_dataset, load_splits
    from mmdemo.training import train

    work = Path(tempfile.mkdtemp(prefix=f"mmdemo-{args.task}-"))
    source = ROOT / "assets" / SAMPLES[args.task]
    if args.images:
        source = first_images(source, work / "subset", args.images)
    start = time.time()
    summary = ingest_dataset(source, work / "ws", task=args.task)
    emit(f"{args.task}_sample_ingest_seconds", round(time.time() - start, 1), "s",
         rows=summary.num_train + summary.num_val, train_rows=summary.num_train, images=args.images or "all")
    cfg = TrainConfig(task=args.task, data=summary.path, output_dir=str(work / "run"), learning_rate=args.learning_rate,
                      epochs=args.epochs, batch_size=args.batch_size, method=args.method)
    start, cpu = time.time(), time.process_time()
    report = train(cfg)
    emit(f"{args.task}_default_train_seconds", round(time.time() - start, 1), "s",
         cpu_seconds=round(time.process_time() - cpu, 1), method=cfg.method, learning_rate=cfg.learning_rate,
         batch_size=cfg.batch_size, epochs=cfg.epochs)
    lines = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    t0 = lines[0]["time"]
    steps = [line for line in lines if line["type"] == "train"]
    emit(f"{args.task}_default_steps", steps[-1]["step"], "", epochs=lines[0]["epochs"],
         median_step_seconds=sorted(s["step_time"] for s in steps)[len(steps) // 2])
    metric = "vqa_accuracy" if args.task == "vqa" else "cider"
    for line in lines:
        if line["type"] == "eval":
            emit(f"{args.task}_default_val_{metric}_during", line[metric], "", step=line["step"],
                 exact_match=line["exact_match"], seconds=round(line["time"] - t0, 1))
    # The validation split holds images never seen in training.
    emit(f"{args.task}_default_val_{metric}", report[metric], "", num_val=report["num_val"])
    emit(f"{args.task}_default_val_exact_match", report["exact_match"], "")
    if args.task == "captioning":
        from mmdemo.inference import caption

        test = load_splits(summary.path)["test"]  # easy-VQA's own test images
        hits = [caption(row["image"], work / "run").strip().lower() in {c.lower() for c in row["captions"]}
                for row in test]
        emit("captioning_default_test_exact_match", round(sum(hits) / len(hits), 5), "", num_test=len(hits))
    splits = load_splits(summary.path)
    if args.task == "vqa" and "test" in splits:  # a test/ part of the upload: images and questions never seen
        from mmdemo.inference import generate_batch
        from mmdemo.metrics import vqa_metrics

        test, preds = splits["test"], []
        for i in range(0, len(test), 64):
            rows = test[i:i + 64]
            preds += generate_batch(rows["image"], rows["question"], work / "run")
        emit("vqa_default_test_vqa_accuracy", round(vqa_metrics(preds, list(test["answers"]))["vqa_accuracy"], 5), "",
             num_test=len(preds))


if __name__ == "__main__":
    main()
