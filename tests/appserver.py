"""The app as a child process: `python app.py` on a free local port with a data directory of its own,
started, waited for and stopped together with any training runs it launched.

The tests and the benchmarks drive the real app through this (standard library only; the benchmarks put
tests/ on sys.path to import it)::

    with AppProcess(data_dir) as app:
        Client(app.url).predict(...)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serves(url: str) -> bool:
    """True when GET url answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class AppStartError(RuntimeError):
    pass


class AppProcess:
    """Starts `python app.py` at once; `url` serves when the constructor returns.

    Args:
        data_dir: MMDEMO_DATA_DIR of the app (created if missing).
        log_path: where the app's stdout and stderr go (default: data_dir/app.log).
        env: extra environment variables, for example {"MMDEMO_MAX_UPLOAD": "200kb"}.
        timeout: seconds to wait for the first 200 on `ready_path`.
        ready_path: the page polled (every `poll` seconds) to decide that the app serves.
        script: the script to serve, relative to the repository (bench/bare_app.py for the baseline).

    Raises AppStartError with the tail of the app's log when it exits or does not serve in time.
    `startup_seconds` is the time from spawning the process to that first 200.
    """

    def __init__(self, data_dir: Path, log_path: Path | None = None, env: dict | None = None,
                 timeout: float = 90.0, ready_path: str = "/config", poll: float = 0.5, script: str = "app.py"):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_path) if log_path else self.data_dir / "app.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        full_env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": port,
                    "MMDEMO_DATA_DIR": str(self.data_dir), "HF_HUB_OFFLINE": "1",
                    "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **(env or {})}
        start = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, script], cwd=REPO, env=full_env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while not serves(self.url + ready_path):
            if self.proc.poll() is not None or time.perf_counter() - start > timeout:
                why = (f"exited with code {self.proc.returncode}" if self.proc.poll() is not None
                       else f"did not serve {self.url} within {timeout:.0f} s")
                self.stop()
                raise AppStartError(f"{script} {why}; its log ({self.log_path}):\n{self.log_tail()}")
            time.sleep(poll)
        self.startup_seconds = time.perf_counter() - start

    def log_tail(self, chars: int = 5000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stops the app, then every training run it started: those children run in a session of their
        own and outlive the app, so each is asked to stop (its STOP file), then ended."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)  # the app gives its training runs up to 30 s to checkpoint
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        stop_training_runs(self.data_dir)

    def __enter__(self) -> "AppProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_training_runs(data_dir: Path, grace: float = 10.0) -> None:
    """Asks every queued or running run under data_dir to stop; SIGTERMs those still alive after `grace` s."""
    from mmdemo.jobs import pid_alive
    from mmdemo.runs import ACTIVE, STOP_FILE, read_status_file

    pids = []
    for status_file in Path(data_dir).glob("users/*/runs/*/status.json"):
        status = read_status_file(status_file.parent)
        if status.get("status") in ACTIVE and status.get("pid"):
            (status_file.parent / STOP_FILE).touch()
            pids.append(int(status["pid"]))
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if pid_alive(pid)]
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
