"""Load bench: one training job plus many concurrent /classify users, through the real app.

    .venv/bin/python bench/load.py [--users 20] [--calls 5] [--epochs 20] [--timeout 300]

Launches `python app.py` on a free port with a fresh data directory, starts one training run on the
sample dataset through gradio_client, and once it trains, runs --users threads, each with a Client of
its own (so a user of its own), calling /classify (the default checkpoint, an example image) --calls
times, while the run's owner polls /training_status. Prints one JSON line per endpoint (errors, p50 /
p95 / max latency), one for the training run, and a total; exits 1 if any call failed. Everything is
stopped at the end, and the whole bench is bounded by --timeout seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT as REPO  # noqa: E402  (also puts the repository on sys.path)

sys.path.insert(0, str(REPO / "tests"))  # the app-as-a-child-process helper lives with the tests
from appserver import AppProcess  # noqa: E402

SAMPLE = REPO / "assets" / "sample_shapes.zip"
IMAGE = REPO / "assets" / "examples" / "cat.jpg"


def summary(name: str, latencies: list[float], errors: list[str]) -> dict:
    row = {"endpoint": name, "calls": len(latencies) + len(errors), "errors": len(errors)}
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=20, method="inclusive")
        row.update(p50_s=round(statistics.median(latencies), 3), p95_s=round(cuts[18], 3),
                   max_s=round(max(latencies), 3))
    if errors:
        row["first_errors"] = errors[:3]
    return row


def run(args) -> int:
    from gradio_client import Client, handle_file

    start = time.monotonic()
    deadline = start + args.timeout
    work = Path(tempfile.mkdtemp(prefix="mmdemo-load-"))
    with AppProcess(work / "data", work / "app.log", timeout=120) as app:
        url = app.url
        owner = Client(url, verbose=False)
        dataset = owner.predict(file=handle_file(str(SAMPLE)), task="classification", api_name="/load_dataset")
        run_id = owner.predict(dataset_id=dataset["dataset_id"], epochs=args.epochs,
                               api_name="/start_training")["run_id"]
        while True:  # the bench measures serving *while* the child trains, not while it imports torch
            status = owner.predict(run_id=run_id, api_name="/training_status")
            if status["step"] > 0 or status["status"] not in ("queued", "running"):
                break
            if time.monotonic() > deadline:
                raise SystemExit("the training run did not take a step in time")
            time.sleep(0.5)
        step_at_start = status["step"]

        lock = threading.Lock()
        results = {"classify": ([], []), "training_status": ([], []), "client_start": ([], [])}
        users_done = threading.Event()

        def record(name, seconds=None, error=None):
            with lock:
                (results[name][1].append(error) if error else results[name][0].append(seconds))

        def user(index: int):
            t0 = time.perf_counter()
            try:
                client = Client(url, verbose=False)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                record("client_start", error=f"user {index}: {type(e).__name__}: {e}")
                return
            record("client_start", time.perf_counter() - t0)
            for _ in range(args.calls):
                if time.monotonic() > deadline:
                    record("classify", error=f"user {index}: bench timeout")
                    continue
                t0 = time.perf_counter()
                try:
                    labels = client.predict(image=handle_file(str(IMAGE)), checkpoint="", top_k=5,
                                            api_name="/classify")
                    if len(labels) != 5:
                        raise ValueError(f"expected 5 labels, got {labels}")
                    record("classify", time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001
                    record("classify", error=f"user {index}: {type(e).__name__}: {str(e)[:200]}")

        def poll():
            while not users_done.is_set() and time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    owner.predict(run_id=run_id, api_name="/training_status")
                    record("training_status", time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001
                    record("training_status", error=f"{type(e).__name__}: {str(e)[:200]}")
                time.sleep(args.poll_interval)

        bench_start = time.monotonic()
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        users = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(args.users)]
        for t in users:
            t.start()
        for t in users:
            t.join(max(0.0, deadline - time.monotonic()))
        users_done.set()
        poller.join(10)
        bench_s = time.monotonic() - bench_start
        final = owner.predict(run_id=run_id, api_name="/training_status")
        owner.predict(run_id=run_id, api_name="/stop_training")

        rows = [summary(name, *results[name]) for name in ("classify", "training_status", "client_start")]
        rows.append({"training": run_id[:8], "status_during_bench": final["status"],
                     "steps_during_bench": final["step"] - step_at_start, "total_steps": final["total_steps"]})
        errors = sum(r.get("errors", 0) for r in rows)
        classify_ok = len(results["classify"][0])
        rows.append({"total": True, "users": args.users, "calls_per_user": args.calls, "errors": errors,
                     "bench_s": round(bench_s, 1), "classify_per_s": round(classify_ok / bench_s, 2),
                     "wall_s": round(time.monotonic() - start, 1), "cpus": os.cpu_count()})
        for row in rows:
            print(json.dumps(row), flush=True)
        return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--calls", type=int, default=5, help="/classify calls per user")
    parser.add_argument("--epochs", type=int, default=20, help="enough that the run outlasts the bench")
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the whole bench")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
