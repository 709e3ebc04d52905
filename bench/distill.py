"""Benchmark: distillation, an EfficientNet-Lite2 teacher into a Lite0 student, on scikit-learn's digits.

    nice -n 5 python bench/distill.py                      # 30 / 10 / 20 images per digit, 32 px, 4 epochs
    python bench/distill.py --per-class 60 --epochs 6      # more data, longer

Steps: load_digits() -> 32x32 RGB PNGs in train / validation / test folders (bench/recipes.py's digits,
``--per-class`` training images per digit) -> the teacher: ``python -m mmdemo train`` with base model
efficientnet_lite2 (full fine-tune) -> ``python -m mmdemo distill TEACHER --student efficientnet_lite0
--baseline`` (the student alone, then with the teacher; same settings). Every run goes through the headless
train child. Prints one JSON line per model (validation accuracy, CPU latency p50 at batch 1 on one thread,
parameters, training seconds) and the table as Markdown for bench/RESULTS.md.
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

import recipes  # noqa: E402  (bench/recipes.py: the digits folders; puts the repository on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def train_seconds(run_dir: Path) -> float:
    """Seconds from the run's start record to its end record (model building and data decoding excluded)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    starts = [r["time"] for r in records if r["type"] == "start"]
    ends = [r["time"] for r in records if r["type"] == "end"]
    return round(ends[-1] - starts[0], 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=30, help="training images per digit (validation 10, test 20)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--student-epochs", type=int, help="the students' epochs (default: --epochs)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per training child (default 1: on a shared "
                                                         "machine two threads waiting on each other ran 20x slower)")
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)

    recipes.PER_CLASS["digits"] = (args.per_class, 10, 20)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-distill-"))
    data = work / "digits"
    if not data.exists():
        recipes.build_digits(data)
    threads = str(args.threads)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads}
    common = ["--epochs", str(args.epochs), "--image-size", str(args.image_size)]
    teacher = work / "teacher"
    t0 = time.time()
    if not (teacher / "eval.json").is_file():  # a --workdir that has its teacher keeps it
        subprocess.run([sys.executable, "-m", "mmdemo", "train", "--data", str(data), "--output-dir", str(teacher),
                        "--base-model", "efficientnet_lite2", "--quiet", *common], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    student_epochs = args.student_epochs or args.epochs
    students = work / f"student-e{student_epochs}-t{args.temperature:g}-a{args.alpha:g}"
    out = subprocess.run([sys.executable, "-m", "mmdemo", "distill", str(teacher), "--student", "efficientnet_lite0",
                          "--baseline", "--temperature", str(args.temperature), "--alpha", str(args.alpha),
                          "--output-dir", str(students), "--epochs", str(student_epochs),
                          "--image-size", str(args.image_size)], check=True, env=env, capture_output=True, text=True)
    result = json.loads(out.stdout)
    seconds = {"teacher": train_seconds(teacher), "student (distilled)": train_seconds(Path(result["run_dir"])),
               "student alone": train_seconds(Path(result["baseline_run_dir"]))}
    print("| model | base | accuracy (validation) | CPU latency p50, batch 1 (ms) | parameters | training (s) |")
    print("|---|---|---|---|---|---|")
    for row in result["distill"]["rows"]:
        row["train_seconds"] = seconds[row["model"]]
        print(json.dumps({"figure": row["model"], **row}), file=sys.stderr, flush=True)
        print(f"| {row['model']} | {row['base_model']} | {row['accuracy']:.3f} | {row['latency_ms_p50']:.1f} | "
              f"{row['params'] / 1e6:.2f} M | {row['train_seconds']:.0f} |")
    print(json.dumps({"summary": {"per_class": args.per_class, "epochs": args.epochs, "student_epochs": student_epochs, "image_size": args.image_size,
                                  "threads": args.threads, "temperature": args.temperature, "alpha": args.alpha,
                                  "agreement_with_teacher": result["distill"]["rows"][1].get("agreement_with_teacher"),
                                  "wall_seconds": round(time.time() - t0), "load": os.getloadavg()[0],
                                  "workdir": str(work)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
