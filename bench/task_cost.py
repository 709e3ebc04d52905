"""Per-row CPU costs, peak memory and checkpoint size of the default recipe of a task (for mmdemo.jobs.CPU_COST
and mmdemo.memory), from one real `python -m mmdemo train` child per task.

    python bench/task_cost.py [--task retrieval] [--task image_text_classification] [--epochs 0] [--threads 0]
        [--method METHOD] [--runs 1]

The child is started as the app starts it (mmdemo.procs.child_env: its thread count, niceness and memory
limit; one thread on a 2-core machine); --threads N gives it N threads instead. On a shared machine two
threads spin while they wait for each other, which the child's CPU seconds count: the CPU figure of the
same run was 98 s with two threads and 24 s with one (bench/RESULTS.md).

From the child's metrics.jsonl (every record has its time): setup (process start to the `start` record:
imports, model build and, for frozen encoders, their outputs computed once over every row), training (the
intervals ending in a `train` record, so the checkpoint an epoch end writes counts in the next epoch's first
step) and evaluation (the intervals ending in an `eval` record). Per-row figures divide by the rows the child saw. Peak RSS is
wait4's ru_maxrss, next to mmdemo.memory.estimate. The sizes of the last checkpoint and of model/ close it.
Timings on a shared machine are upper bounds: each line carries the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, emit  # noqa: E402

from mmdemo import memory, procs  # noqa: E402
from mmdemo.config import TrainConfig  # noqa: E402
from mmdemo.data import ingest_dataset  # noqa: E402

SAMPLES = {"retrieval": "sample_retrieval.zip", "image_text_classification": "sample_image_text.zip"}


def folder_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def phases(records: list[dict], started: float) -> dict:
    """Seconds of setup, training steps and evaluations, and their counts."""
    out = {"setup_s": records[0]["time"] - started, "train_s": 0.0, "eval_s": 0.0, "steps": 0, "evals": 0}
    previous = records[0]["time"]
    for r in records[1:]:
        if r["type"] == "train":
            out["train_s"] += r["time"] - previous
            out["steps"] += 1
        elif r["type"] == "eval":
            out["eval_s"] += r["time"] - previous
            out["evals"] += 1
        previous = r["time"]
    return {k: round(v, 2) for k, v in out.items()}


def run(task: str, work: Path, epochs: int, threads: int = 0, method: str = "", index: int = 0) -> None:
    summary = ingest_dataset(str(ROOT / "assets" / SAMPLES[task]), work / f"{task}-{index}", task=task)
    run_dir = work / f"{task}-run-{index}"
    run_dir.mkdir()
    cfg = TrainConfig(data=summary.path, output_dir=str(run_dir), task=task, epochs=epochs, method=method,
                      checkpoint_every_minutes=0)
    cfg.save(run_dir / "config.yaml")
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if threads:
        base["MMDEMO_TRAIN_THREADS"] = str(threads)
    env = procs.child_env(base)
    load_before = os.getloadavg()[0]
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "mmdemo", "train", "--config", str(run_dir / "config.yaml")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, code, usage = os.wait4(proc.pid, 0)
    wall = time.time() - started
    if code:
        raise SystemExit(f"the {task} run failed ({code}); see {run_dir}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cfg = TrainConfig.load(run_dir / "config.yaml")  # the values the child resolved
    p = phases(records, started)
    rows_train, rows_val = summary.num_train, summary.num_val
    if task == "image_text_classification":  # rows, not images: each image comes with several texts
        from mmdemo.data import load_splits

        splits = load_splits(summary.path)
        rows_train, rows_val = len(splits["train"]), len(splits["validation"])
    epochs_run = cfg.epochs
    result = json.loads((run_dir / "eval.json").read_text())
    quality = {k: result[k] for k in ("accuracy", "t2i_recall@1", "i2t_recall@1") if k in result}
    emit(f"{task} wall", round(wall, 1), "s", cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
         threads=int(env["OMP_NUM_THREADS"]), load_before=round(load_before, 2), **quality, epochs=epochs_run, rows_train=rows_train, rows_val=rows_val,
         method=cfg.method, batch_size=cfg.batch_size, image_size=cfg.image_size, **p)
    emit(f"{task} per train row", round(p["train_s"] / (epochs_run * rows_train), 4), "s")
    emit(f"{task} per val row", round(p["eval_s"] / (max(1, p["evals"]) * rows_val), 4), "s")
    emit(f"{task} setup per row", round(p["setup_s"] / (rows_train + rows_val), 4), "s")
    est = memory.estimate(cfg, summary.num_train + summary.num_val)
    measured = usage.ru_maxrss * 1024
    emit(f"{task} peak rss", round(measured / 2**20), "MiB", estimated_mib=round(est["bytes"] / 2**20),
         ratio=round(est["bytes"] / measured, 2), parts_mib={k: round(v / 2**20) for k, v in est["parts"].items()})
    ckpts = [d for d in run_dir.glob("checkpoint-*") if d.is_dir()]
    emit(f"{task} checkpoint size", folder_mb(ckpts[0]) if ckpts else None, "MiB",
         model_mib=folder_mb(run_dir / "model"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=sorted(SAMPLES), action="append")
    parser.add_argument("--epochs", type=int, default=0, help="0 = the method's default")
    parser.add_argument("--threads", type=int, default=0, help="the child's threads (0 = as the app gives them)")
    parser.add_argument("--method", default="", help="'' = the task's default method")
    parser.add_argument("--runs", type=int, default=1, help="children per task, one after the other")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmdemo-cost-"))
    for task in args.task or sorted(SAMPLES):
        for index in range(args.runs):
            run(task, work, args.epochs, args.threads, args.method, index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
