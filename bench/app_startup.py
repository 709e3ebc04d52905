"""Benchmark 6: app start-up time to the first page, and /training_status latency while training runs.

    python bench/app_startup.py
    python bench/app_startup.py --starts 5 --calls 50

Start-up: ``python app.py`` in a fresh process (its own port and data directory, HF_HUB_OFFLINE=1),
from just before the process is spawned to the first HTTP 200 on ``/`` (polled every 20 ms); the
median of ``--starts`` starts. Each line also says whether torch was already mapped into the server
process when the page first served (it should not be: the page serves before torch loads).

/training_status: one more server; through ``gradio_client`` (as the API tests do) it ingests
assets/sample_shapes.zip, starts a default run (a training child process) and calls
``/training_status`` ``--calls`` times while the child trains (p50 / p95), then stops the run and
calls it as many times with no training running, for comparison.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, emit, median, percentile, print_env  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))  # the app-as-a-child-process helper lives with the tests
from appserver import AppProcess  # noqa: E402


def torch_mapped(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def start_app(data_dir: Path) -> tuple[AppProcess, bool]:
    """-> (the app, serving /, and whether torch was mapped into its process at that moment)."""
    app = AppProcess(data_dir, timeout=180, ready_path="/", poll=0.02)
    return app, torch_mapped(app.proc.pid)


def time_status(client, run_id: str, calls: int, gap: float) -> tuple[list[float], list[str]]:
    times, states = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        status = client.predict(run_id=run_id, api_name="/training_status")
        times.append(time.perf_counter() - t0)
        states.append(status["status"])
        time.sleep(gap)
    return times, states


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between status calls")
    args = parser.parse_args(argv)
    print_env()

    startups = []
    for k in range(args.starts):
        with tempfile.TemporaryDirectory(prefix="mmdemo-app-") as d:
            app, torch_in = start_app(Path(d))
            app.stop()
            seconds = app.startup_seconds
        startups.append(seconds)
        emit("app_start_run", round(seconds, 2), "s", start=k, torch_loaded_at_first_page=torch_in)
    emit("app_startup_to_first_page", round(median(startups), 2), "s", starts=[round(s, 2) for s in startups],
         note="spawn of `python app.py` -> first HTTP 200 on /")

    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory(prefix="mmdemo-app-") as d:
        app, _ = start_app(Path(d))
        with app:
            client = Client(app.url, verbose=False)
            dataset = client.predict(file=handle_file(str(ROOT / "assets" / "sample_shapes.zip")),
                                     task="classification", api_name="/load_dataset")
            run_id = client.predict(dataset_id=dataset["dataset_id"], epochs=3,
                                    api_name="/start_training")["run_id"]
            deadline = time.monotonic() + 180
            while client.predict(run_id=run_id, api_name="/training_status")["status"] != "running":
                if time.monotonic() > deadline:
                    raise RuntimeError("the run never started")
                time.sleep(0.5)
            busy, states = time_status(client, run_id, args.calls, args.gap)
            emit("training_status_latency_p50_while_training", round(percentile(busy, 50) * 1000, 1), "ms",
                 calls=len(busy), running_during=states.count("running"))
            emit("training_status_latency_p95_while_training", round(percentile(busy, 95) * 1000, 1), "ms",
                 calls=len(busy), max_ms=round(max(busy) * 1000, 1))
            client.predict(run_id=run_id, api_name="/stop_training")
            deadline = time.monotonic() + 120
            while client.predict(run_id=run_id, api_name="/training_status")["status"] in ("running", "queued"):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            idle, states = time_status(client, run_id, args.calls, args.gap)
            emit("training_status_latency_p50_idle", round(percentile(idle, 50) * 1000, 1), "ms", calls=len(idle),
                 status=states[-1])
            emit("training_status_latency_p95_idle", round(percentile(idle, 95) * 1000, 1), "ms", calls=len(idle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
