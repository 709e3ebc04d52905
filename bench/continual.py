"""Benchmark: learning new classes without forgetting the old ones (mmdemo.continual).

    python bench/continual.py                      # keep_old = off, replay, distill, both
    python bench/continual.py --modes both --image-size 96
    python bench/continual.py --task vqa           # VQA: keep_old = replay, off

VQA (``--task vqa``): the bundled assets/sample_vqa.zip split into two disjoint halves, by image and by
question kind: A = images 0-399 with their "what shape / what colour" questions (shape and colour answers),
B = images 400-799 with up to ``--per-image`` of their yes / no questions. Run A: the default recipe
(frozen_vision, batch 16) for ``--epochs-a`` epochs on A; run B, per keep_old mode (or METHOD:MODE, e.g.
``prompt_tuning:off``), ``--epochs-b`` epochs on B with base_model = run A. Each run B's forgetting table gives VQA accuracy on A's validation images (old)
before / after, and on B's (new) before / after.

Steps: scikit-learn's digits as 32x32 PNGs -> two datasets, digits 0-4 and digits 5-9 (each ingested with
its seeded 20% validation split) -> run A: the default recipe on 0-4 -> for each keep_old mode, run B:
the default recipe on 5-9 with base_model = run A. Each run B's forgetting table (eval.json) gives the
old classes' accuracy on run A's validation split before / after, and the new classes' accuracy.
Goal: old >= 0.7 and new >= 0.8 with the defaults. Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_digits(root: Path, digits_wanted, side: int = 32) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        if int(label) not in digits_wanted:
            continue
        grey = (pixels * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey, mode="L").resize((side, side), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")


def write_vqa_halves(work: Path, per_image: int) -> tuple[Path, Path]:
    """Two upload folders from the VQA sample: A (images 0-399, open questions), B (400-799, yes / no)."""
    import zipfile

    root = Path(__file__).resolve().parents[1]
    with zipfile.ZipFile(root / "assets" / "sample_vqa.zip") as z:
        z.extractall(work / "sample")
    rows = [json.loads(line) for line in (work / "sample" / "metadata.jsonl").read_text().splitlines() if line]
    halves = {"a": work / "vqa_a", "b": work / "vqa_b"}
    kept: dict[str, list] = {"a": [], "b": []}
    per: dict[str, int] = {}
    for row in rows:
        index = int(Path(row["file_name"]).stem)
        yes_no = row["answer"] in ("yes", "no")
        half = "a" if index < 400 and not yes_no else "b" if index >= 400 and yes_no else None
        if half == "b" and per.get(row["file_name"], 0) >= per_image:
            continue
        if half:
            per[row["file_name"]] = per.get(row["file_name"], 0) + 1
            kept[half].append(row)
    for half, folder in halves.items():
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for name in {r["file_name"] for r in kept[half]}:
            shutil.copy(work / "sample" / name, folder / name)
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept[half]))
    return halves["a"], halves["b"]


def main_vqa(args) -> None:
    from mmdemo.config import TrainConfig
    from mmdemo.data import ingest_dataset
    from mmdemo.training import train

    work = Path(args.keep or tempfile.mkdtemp(prefix="continual-vqa-"))
    work.mkdir(parents=True, exist_ok=True)
    folder_a, folder_b = write_vqa_halves(work, args.per_image)
    a_ds, b_ds = (ingest_dataset(f, work / "ws", task="vqa") for f in (folder_a, folder_b))
    for name, ds in (("A", a_ds), ("B", b_ds)):
        print(json.dumps({"figure": f"dataset {name}", "counts": ds.counts}), flush=True)
    load, t0 = os.getloadavg()[0], time.time()
    if (work / "run_a" / "eval.json").is_file():  # --keep of an earlier call: its run A again (the old split is
        # read from run A's config, so the dataset ingested now only feeds run B)
        a = json.loads((work / "run_a" / "eval.json").read_text())
        print(json.dumps({"figure": "run A (kept)", "value": a["vqa_accuracy"]}), flush=True)
    else:
        a = train(TrainConfig(task="vqa", data=a_ds.path, output_dir=str(work / "run_a"), epochs=args.epochs_a))
        print(json.dumps({"figure": "run A VQA accuracy (open questions, images 0-399)", "value": a["vqa_accuracy"],
                          "epochs": args.epochs_a, "seconds": round(time.time() - t0), "load_1min": round(load, 2)}),
              flush=True)
    for entry in args.modes.split(","):  # MODE, or METHOD:MODE (e.g. prompt_tuning:off)
        method, _, mode = entry.rpartition(":")
        out = work / f"run_b_{entry.replace(':', '_')}_{args.epochs_b}ep"
        shutil.rmtree(out, ignore_errors=True)
        load, t0 = os.getloadavg()[0], time.time()
        b = train(TrainConfig(task="vqa", data=b_ds.path, output_dir=str(out), base_model=str(work / "run_a"),
                              keep_old=mode, epochs=args.epochs_b, method=method))
        rows = {(r["group"], r["metric"]): r for r in b["forgetting"]}
        old_row, new_row = rows[("old", "vqa_accuracy")], rows[("new", "vqa_accuracy")]
        print(json.dumps({"figure": f"method={method or 'default'} keep_old={mode}", "old_before": old_row["before"], "old_after": old_row["after"],
                          "new_before": new_row["before"], "new_after": new_row["after"], "epochs": args.epochs_b,
                          "seconds": round(time.time() - t0), "load_1min_at_start": round(load, 2),
                          "load_1min_at_end": round(os.getloadavg()[0], 2), "continual": b["continual"]}), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="classification", choices=("classification", "vqa"))
    ap.add_argument("--modes", default="", help="keep_old modes (classification: off,replay,distill,both; vqa: "
                                                "replay,off, or METHOD:MODE such as prompt_tuning:off)")
    ap.add_argument("--epochs-a", type=int, default=4, help="vqa: epochs of run A")
    ap.add_argument("--epochs-b", type=int, default=2, help="vqa: epochs of each run B")
    ap.add_argument("--per-image", type=int, default=3, help="vqa: yes / no questions kept per image of B")
    ap.add_argument("--image-size", type=int, default=96, help="0 = the model's own (160 px; slow on 2 cores)")
    ap.add_argument("--keep", default="", help="keep the work folder here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default; 1 on a crowded machine)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.task == "vqa":
        args.modes = args.modes or "replay,off"
        return main_vqa(args)
    args.modes = args.modes or "off,replay,distill,both"

    from mmdemo.config import TrainConfig
    from mmdemo.data import ingest_dataset
    from mmdemo.training import train

    work = Path(args.keep or tempfile.mkdtemp(prefix="continual-"))
    work.mkdir(parents=True, exist_ok=True)
    write_digits(work / "old", range(5))
    write_digits(work / "new", range(5, 10))
    old = ingest_dataset(work / "old", work / "ws").path
    new = ingest_dataset(work / "new", work / "ws").path
    size = {"image_size": args.image_size} if args.image_size else {}
    load = os.getloadavg()[0]
    t0 = time.time()
    a = train(TrainConfig(data=old, output_dir=str(work / "run_a"), **size))
    print(json.dumps({"figure": "run A accuracy (digits 0-4)", "value": a["accuracy"],
                      "seconds": round(time.time() - t0), "load_1min": round(load, 2)}), flush=True)
    for mode in args.modes.split(","):
        out = work / f"run_b_{mode}"
        shutil.rmtree(out, ignore_errors=True)
        load, t0 = os.getloadavg()[0], time.time()
        b = train(TrainConfig(data=new, output_dir=str(out), base_model=str(work / "run_a"), keep_old=mode, **size))
        rows = {(r["group"], r["class"]): r for r in b["forgetting"]} if "forgetting" in b else {}
        old_row, new_row = rows.get(("old", "all"), {}), rows.get(("new", "all"), {})
        print(json.dumps({"figure": f"keep_old={mode}", "old_before": old_row.get("before"),
                          "old_after": old_row.get("after"), "new_after": new_row.get("after"),
                          "goal_met": bool(old_row.get("after", 0) >= 0.7 and new_row.get("after", 0) >= 0.8),
                          "seconds": round(time.time() - t0), "load_1min_at_start": round(load, 2),
                          "load_1min_at_end": round(os.getloadavg()[0], 2), "continual": b.get("continual")}),
              flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
