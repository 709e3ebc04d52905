"""Shared fixtures: the real app, served by `python app.py` in a child process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# No test may reach the Hub: offline mode before any test module imports huggingface_hub / datasets
# (they read it once, at import), so a Hub id fails at once instead of after minutes of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/config", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """URL of the app running as `python app.py` with a fresh data directory; stopped at the end."""
    data_dir = tmp_path_factory.mktemp("mmdemo-data")
    log_path = tmp_path_factory.mktemp("mmdemo-app") / "app.log"
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "MMDEMO_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1"}
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _serves(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with code {proc.returncode}" if proc.poll() is not None
                       else f"did not serve {url} within {STARTUP_TIMEOUT_S} s")
                pytest.fail(f"app.py {why}; its log:\n{log_path.read_text(errors='replace')[-5000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _stop_training_children(data_dir)


def _stop_training_children(data_dir: Path) -> None:
    """Training children run in their own session, so they outlive the app: a test that failed
    mid-run must not leave one training. Ask each to stop (the STOP file), then end stragglers."""
    pids = []
    for status_file in data_dir.glob("users/*/runs/*/status.json"):
        try:
            status = json.loads(status_file.read_text())
        except (OSError, ValueError):
            continue
        if status.get("status") in ("queued", "running") and status.get("pid"):
            (status_file.parent / "STOP").touch()
            pids.append(int(status["pid"]))
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.2)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
