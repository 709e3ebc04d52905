"""Load bench: one training job plus many concurrent /classify users, through the real app.

    .venv/bin/python bench/load.py [--users 20] [--calls 15] [--epochs 20] [--timeout 300] [--train-threads 1] [--warm]

Launches `python app.py` on a free port with a fresh data directory, starts one training run on the
sample dataset through gradio_client, and once it trains, runs --users threads, each with a Client of
its own (so a user of its own), calling /classify (the default checkpoint, an example image) --calls
times, while the run's owner polls /training_status. Prints one JSON line per endpoint (errors, p50 /
p95 / max latency), first for a bare Gradio app with trivial handlers under the same training load
(bench/bare_app.py, the baseline), then for mmdemo, then mmdemo's p50 / p95 as a ratio of the bare app's,
one line for the training run, and a total; exits 1 if any call failed. Everything is
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


def measure(url: str, run_id: str, args, deadline: float, owner=None) -> tuple[list[dict], float]:
    """--users threads (a Client each) calling /classify --calls times while ``owner`` (the run's own
    client: runs are per session; a new one for the bare app) polls /training_status; returns the
    per-endpoint summaries and the seconds it took."""
    from gradio_client import Client, handle_file

    owner = owner or Client(url, verbose=False)
    warm_up = []
    if args.warm:  # one call first, untimed in the summaries: the model's one-time load is left out
        t0 = time.perf_counter()
        owner.predict(image=handle_file(str(IMAGE)), checkpoint="", top_k=5, api_name="/classify")
        warm_up.append({"endpoint": "warm_up_classify", "calls": 1, "errors": 0,
                        "seconds": round(time.perf_counter() - t0, 3)})
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
                labels = client.predict(image=handle_file(str(IMAGE)), checkpoint="", top_k=5, api_name="/classify")
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
    return warm_up + [summary(name, *results[name]) for name in ("classify", "training_status", "client_start")], \
        time.monotonic() - bench_start


def run(args) -> int:
    from gradio_client import Client, handle_file

    start = time.monotonic()
    deadline = start + args.timeout
    work = Path(tempfile.mkdtemp(prefix="mmdemo-load-"))
    env = {"MMDEMO_TRAIN_THREADS": str(args.train_threads)} if args.train_threads else {}
    with AppProcess(work / "data", work / "app.log", env=env, timeout=120) as app:
        owner = Client(app.url, verbose=False)
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
        rows = []
        # The baseline first, under the same training load: a bare Gradio app with trivial handlers.
        if not args.no_bare:
            with AppProcess(work / "bare", work / "bare.log", timeout=120, script="bench/bare_app.py",
                            ready_path="/") as bare:
                bare_rows, _ = measure(bare.url, run_id, args, deadline)
            rows += [{**r, "app": "bare"} for r in bare_rows]
        ours, bench_s = measure(app.url, run_id, args, deadline, owner)
        rows += [{**r, "app": "mmdemo"} for r in ours]
        final = owner.predict(run_id=run_id, api_name="/training_status")
        owner.predict(run_id=run_id, api_name="/stop_training")

        by = {(r["app"], r["endpoint"]): r for r in rows}
        for endpoint in ("classify", "training_status"):
            bare_row, our_row = by.get(("bare", endpoint)), by.get(("mmdemo", endpoint))
            if bare_row and our_row and "p95_s" in bare_row and "p95_s" in our_row:
                rows.append({"ratio": endpoint, "p95_vs_bare": round(our_row["p95_s"] / bare_row["p95_s"], 2),
                             "p50_vs_bare": round(our_row["p50_s"] / bare_row["p50_s"], 2)})
        rows.append({"training": run_id[:8], "status_after_bench": final["status"],
                     "steps_during_bench": final["step"] - step_at_start, "total_steps": final["total_steps"]})
        errors = sum(r.get("errors", 0) for r in rows)
        classify_ok = by[("mmdemo", "classify")]["calls"] - by[("mmdemo", "classify")]["errors"]
        rows.append({"total": True, "users": args.users, "calls_per_user": args.calls, "errors": errors,
                     "bench_s": round(bench_s, 1), "classify_per_s": round(classify_ok / bench_s, 2),
                     "wall_s": round(time.monotonic() - start, 1), "cpus": os.cpu_count(),
                     "load_1min": round(os.getloadavg()[0], 2)})
        for row in rows:
            print(json.dumps(row), flush=True)
        return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20)
    # 15 calls each: 300 latencies, of which the 20 clients' start-up burst is a small part; a p95 over 100 calls
    # moved by +-0.25 of the ratio between identical runs (bench/RESULTS.md, section 7).
    parser.add_argument("--calls", type=int, default=15, help="/classify calls per user")
    parser.add_argument("--epochs", type=int, default=20, help="enough that the run outlasts the bench")
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the whole bench")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-app baseline")
    parser.add_argument("--warm", action="store_true",
                        help="one untimed /classify call on each app first (leaves out the model's one-time load)")
    parser.add_argument("--train-threads", type=int, default=0,
                        help="MMDEMO_TRAIN_THREADS of the app's training child (0: the app's default)")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
