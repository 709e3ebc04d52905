"""Training jobs as child processes: start, queue, status snapshots, stop, resume, list.

The web server never trains in its own process: a crash or an out-of-memory error in training cannot
take it down, and GPU memory is freed when the child exits. Run directories are the source of truth,
so a page reload, a second tab or an app restart all see the same runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from . import settings
from .config import TrainConfig
from .errors import UserInputError
from .runs import (ACTIVE, CONFIG_FILE, ID_RE, LOG_FILE, MODEL_DIR, STOP_FILE, find_run, read_metrics, read_status_file,
                   runs_dir, write_status)


class JobManager:
    """Starts training children, at most ``max_concurrent`` at a time (one GPU job by default);
    the rest wait in a FIFO queue that a background thread drains."""

    def __init__(self, max_concurrent: int | None = None):
        self.max_concurrent = max_concurrent or settings.max_jobs()
        self._procs: dict[Path, subprocess.Popen] = {}
        self._queue: list[Path] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain_forever, daemon=True)
        self._thread.start()

    def submit(self, run_dir: Path) -> None:
        # A stop pressed after a run ended must not end its resumption at the first step.
        (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)
        with self._lock:
            write_status(run_dir, "queued", message="Waiting for a free slot.", queued=time.time())
            self._queue.append(Path(run_dir))
        self._drain()

    def queue_position(self, run_dir: Path) -> int | None:
        with self._lock:
            return self._queue.index(Path(run_dir)) + 1 if Path(run_dir) in self._queue else None

    def is_alive(self, run_dir: Path) -> bool:
        proc = self._procs.get(Path(run_dir))
        return proc is not None and proc.poll() is None

    def stop(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        with self._lock:
            if run_dir in self._queue:
                self._queue.remove(run_dir)
                write_status(run_dir, "stopped", message="Stopped before it started.")
                return
        (run_dir / STOP_FILE).touch()

    def _drain_forever(self) -> None:
        while True:
            time.sleep(0.5)
            self._drain()

    def _drain(self) -> None:
        with self._lock:
            for run_dir, proc in list(self._procs.items()):
                if proc.poll() is not None:
                    del self._procs[run_dir]
                    _mark_crashed(run_dir, proc.returncode)
            while self._queue and len(self._procs) < self.max_concurrent:
                run_dir = self._queue.pop(0)
                self._procs[run_dir] = _launch(run_dir)


def _launch(run_dir: Path) -> subprocess.Popen:
    # The same command a user runs headless; its output goes to train.log for post-mortems.
    log = open(run_dir / "train.log", "ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmdemo", "train", "--config", str(run_dir / "config.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    log.close()
    write_status(run_dir, "running", message="Starting: loading the data and the model.", pid=proc.pid)
    return proc


def _mark_crashed(run_dir: Path, returncode: int) -> None:
    status = read_status_file(run_dir)
    if status.get("status") in ACTIVE:
        write_status(run_dir, "failed", message=f"The training process exited unexpectedly (exit code "
                     f"{returncode}). The last checkpoint is kept: press Resume to continue. {_log_tail(run_dir)}")


def _log_tail(run_dir: Path, lines: int = 3) -> str:
    try:
        tail = (run_dir / LOG_FILE).read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return "Last log lines: " + " | ".join(tail) if tail else ""


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def run_status(run_dir: Path, manager: JobManager | None = None) -> dict:
    """The status snapshot the UI and the API show, built from the run directory alone."""
    run_dir = Path(run_dir)
    status = read_status_file(run_dir)
    state = status.get("status", "queued")
    live = manager is not None and manager.is_alive(run_dir)
    if state == "running" and not live and not pid_alive(status.get("pid")):
        # The app restarted (or the child died unseen): the directory says running, nothing runs.
        state = "failed"
        status["message"] = "Interrupted: the app restarted while this run was training. Press Resume to continue."
    elif state == "queued" and manager is not None and _lost_from_queue(run_dir, manager):
        state = "failed"  # queued in a previous app process: no queue holds it now
        status["message"] = "Interrupted: the app restarted before this run started. Press Resume to start it."
    records = read_metrics(run_dir)
    main_metric = status.get("main_metric", "accuracy")
    # A resumed run replays steps after its last checkpoint: the latest record of a step wins.
    train = list({r["step"]: r for r in records if r["type"] == "train"}.values())
    evals = [r for r in records if r["type"] == "eval"]
    step = train[-1]["step"] if train else 0
    total = status.get("total_steps") or 0
    snapshot = {
        "run_id": run_dir.name, "status": state, "step": step, "total_steps": total,
        "epoch": train[-1]["epoch"] if train else 0, "eta_s": _eta(train, total),
        "train_loss": [[r["step"], r["loss"]] for r in train],
        "val": [[r["epoch"], r["val_loss"], r.get(main_metric)] for r in evals],
        "val_metrics": [{k: v for k, v in r.items() if k not in ("type", "time")} for r in evals],
        "main_metric": main_metric,
        "metrics": status.get("metrics") or {}, "message": status.get("message", ""),
    }
    if state == "queued" and manager is not None:
        position = manager.queue_position(run_dir)
        if position:
            snapshot["message"] = f"Queued: position {position} (one training job runs at a time)."
    return snapshot


def has_active_run(workspace: Path, manager: JobManager | None = None) -> bool:
    """Whether ``workspace`` holds a queued or running run (the workspace cleanup's ``is_busy``)."""
    runs = [cfg.parent for cfg in runs_dir(workspace).glob(f"*/{CONFIG_FILE}")]
    return any(run_status(run_dir, manager)["status"] in ACTIVE for run_dir in runs)


def _lost_from_queue(run_dir: Path, manager: JobManager) -> bool:
    if manager.queue_position(run_dir) is not None or manager.is_alive(run_dir):
        return False
    # Read again: the manager may have launched or stopped it since the first read.
    return read_status_file(run_dir).get("status") == "queued"


def _eta(train: list[dict], total: int) -> float | None:
    if len(train) < 2 or not total:
        return None
    recent = train[-20:]
    per_step = (recent[-1]["time"] - recent[0]["time"]) / max(1, recent[-1]["step"] - recent[0]["step"])
    return round(max(0.0, (total - recent[-1]["step"]) * per_step), 1)


def new_run_config(workspace, dataset_dir, **params) -> TrainConfig:
    """A validated config for a new run directory in ``workspace`` (nothing written yet)."""
    params = {k: v for k, v in params.items() if v not in (None, "")}
    base = str(params.get("base_model", "")).strip()
    if ID_RE.match(base):  # a previous run of this workspace: continue fine-tuning it
        params["base_model"] = str(find_run(workspace, base))
    run_dir = runs_dir(workspace) / uuid.uuid4().hex
    return TrainConfig(data=str(dataset_dir), output_dir=str(run_dir), **params)


def start_training(cfg: TrainConfig, manager: JobManager) -> str:
    """Writes the run directory's config and queues the child; returns the run id."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / CONFIG_FILE)
    manager.submit(run_dir)
    return run_dir.name


def resume_training(run_dir: Path, manager: JobManager) -> dict:
    """Continues a stopped / failed run from its last checkpoint (the same run directory)."""
    state = run_status(run_dir, manager)["status"]
    if state in ACTIVE:
        raise UserInputError("This run is still active; stop it before resuming.")
    manager.submit(run_dir)
    return {"status": "queued"}


def list_runs(workspace, manager: JobManager | None = None) -> list[dict]:
    """This workspace's runs, newest first, with task, base model, method, status and metrics."""
    import yaml

    rows = []
    for run_dir in runs_dir(workspace).glob(f"*/{CONFIG_FILE}"):
        run_dir = run_dir.parent
        cfg = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
        snap = run_status(run_dir, manager)
        rows.append({"run_id": run_dir.name, "task": cfg.get("task"), "base_model": _short(cfg.get("base_model", "")),
                     "method": cfg.get("method"), "status": snap["status"], "metrics": snap["metrics"],
                     "created": (run_dir / CONFIG_FILE).stat().st_mtime,
                     "has_model": (run_dir / MODEL_DIR).is_dir()})
    return sorted(rows, key=lambda r: r["created"], reverse=True)


def _short(base_model: str) -> str:
    # A continued run's base is a path inside the workspace: show its run id, never the path.
    path = Path(base_model)
    return path.name if path.is_absolute() else base_model


# Seconds per training row and per validation row on 2 CPU cores with the default recipe, measured on
# the bundled samples (classification: EfficientNet-Lite0 at 160 px; text: the composed default with
# its encoder frozen, features computed once).
CPU_COST = {"classification": (0.06, 0.02), "captioning": (0.012, 0.02), "vqa": (0.012, 0.006)}


def estimate_cpu_seconds(summary, cfg: TrainConfig) -> float:
    """A rough duration of ``cfg`` on ``summary``'s dataset on a 2-core CPU (shown before a run starts
    where there is no GPU)."""
    from .config import auto_epochs

    per_train, per_val = CPU_COST.get(summary.task, CPU_COST["classification"])
    epochs = cfg.epochs or auto_epochs(summary.num_train, cfg.batch_size)
    evals = epochs if summary.task == "classification" else min(epochs, 10)
    return epochs * summary.num_train * per_train + evals * summary.num_val * per_val


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (the page must serve first)."""
    import shutil

    return Path("/proc/driver/nvidia/gpus").is_dir() or shutil.which("nvidia-smi") is not None
