"""Benchmark: learning new classes without forgetting the old ones (mmdemo.continual).

    python bench/continual.py                      # keep_old = off, replay, distill, both
    python bench/continual.py --modes both --image-size 96

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="off,replay,distill,both")
    ap.add_argument("--image-size", type=int, default=96, help="0 = the model's own (160 px; slow on 2 cores)")
    ap.add_argument("--keep", default="", help="keep the work folder here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default; 1 on a crowded machine)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

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
