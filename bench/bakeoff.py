"""Benchmark: the PEFT bake-off (mmdemo.bakeoff) on digits and on the sample shapes, as the app runs it.

    python bench/bakeoff.py --data digits --steps 40 --image-size 64
    python bench/bakeoff.py --data shapes --steps 40 --image-size 64

Ingests the dataset into a fresh workspace, calls ``mmdemo.api.start_bakeoff`` (one training child per
applicable method, queued by a real JobManager, one at a time), polls ``bakeoff_status`` until every run
has finished and prints the table as JSON lines, then as a Markdown table (for bench/RESULTS.md).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=("digits", "shapes"), default="shapes")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--base-model", default="")
    args = ap.parse_args()

    from mmdemo import api
    from mmdemo.jobs import JobManager

    work = Path(tempfile.mkdtemp(prefix="bakeoff-"))
    if args.data == "digits":
        from continual import write_digits

        write_digits(work / "digits", range(10))
        source = work / "digits"
    else:
        source = ROOT / "assets" / "sample_shapes.zip"
    ds = api.ingest(work / "ws", str(source))["dataset_id"]
    load0, t0 = os.getloadavg()[0], time.time()
    started = api.start_bakeoff(work / "ws", ds, args.base_model, args.steps, args.image_size,
                                manager=(manager := JobManager()))
    print(json.dumps({"started": started["methods"], "skipped": list(started["skipped"])}), flush=True)
    while not (status := api.bakeoff_status(work / "ws", started["bakeoff_id"], manager=manager))["done"]:
        time.sleep(5)
    seconds = round(time.time() - t0)
    for r in status["rows"]:
        print(json.dumps(r), flush=True)
    print(f"\n{args.data}, base {status['base_model']}, {args.steps} steps of batch 16 at {args.image_size} px, "
          f"{seconds} s in all, load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print("| method | trainable params | peak memory (MB) | step time (s) | adapter (MB) | val accuracy | pick |")
    print("|---|---|---|---|---|---|---|")
    for r in status["rows"]:
        if r.get("trainable_params") is None:
            print(f"| {r['method']} | {r['status'][:60]} | | | | | |")
            continue
        print(f"| {r['method']} | {r['trainable_params']:,} | {r['peak_memory_mb']} | {r['step_time_s']} | "
              f"{r['adapter_mb']} | {r['value']} | {'✓' if r['pick'] else ''} |")
    manager.shutdown() if hasattr(manager, "shutdown") else None
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
