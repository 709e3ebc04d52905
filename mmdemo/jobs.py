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

from . import procs, settings
from .config import TrainConfig
from .errors import UserInputError
from .runs import (ACTIVE, CONFIG_FILE, LOG_FILE, MODEL_DIR, STOP_FILE, find_run, read_metrics, read_status_file,
                   resume_advice, runs_dir, write_status)


class JobManager:
    """Starts training children, at most ``max_concurrent`` at a time (one GPU job by default);
    the rest wait in a FIFO queue that a background thread drains.

    At start it adopts the children that a previous app process left running under ``root`` (the
    data directory): they count against the limit, show as running and can be stopped. ``shutdown``
    stops every child at its next step boundary (a checkpoint) when the app exits."""

    def __init__(self, max_concurrent: int | None = None, root: Path | None = None):
        self.max_concurrent = max_concurrent or settings.max_jobs()
        self._procs: dict[Path, subprocess.Popen] = {}
        self._adopted: dict[Path, tuple[int, int | None]] = {}  # run dir -> (pid, start time)
        self._queue: list[Path] = []
        self._lock = threading.Lock()
        self._closing = False
        self._adopted.update(procs.live_children(Path(root) if root else settings.data_dir()))
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
        if proc is not None:
            return proc.poll() is None
        adopted = self._adopted.get(Path(run_dir))
        return adopted is not None and procs.is_training_child(*adopted, Path(run_dir) / CONFIG_FILE)

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
            for run_dir in list(self._adopted):
                if not self.is_alive(run_dir):
                    del self._adopted[run_dir]
                    _mark_crashed(run_dir, None)
            while (self._queue and not self._closing
                   and len(self._procs) + len(self._adopted) < self.max_concurrent):
                run_dir = self._queue.pop(0)
                self._procs[run_dir] = _launch(run_dir)

    def shutdown(self, grace: float | None = None) -> None:
        """Stops every child at its next step boundary (SIGTERM: it writes a checkpoint and exits),
        kills those still alive after ``grace`` seconds (MMDEMO_STOP_GRACE_S, default 30), and leaves
        each run stopped and resumable; queued runs stay unstarted, resumable too. Launches nothing more."""
        grace = settings.job_settings()["stop_grace_s"] if grace is None else grace
        with self._lock:
            self._closing = True
            queued, self._queue = self._queue, []
            # The process this manager started (a launcher of several processes forwards the signal).
            children = {run_dir: (proc.pid, procs.process_start_time(proc.pid))
                        for run_dir, proc in self._procs.items()}
            children.update(self._adopted)
        for run_dir in queued:
            write_status(run_dir, "stopped", message="Not started: the app shut down first. Press Resume to start it.")
        killed = procs.end_processes([(*c, run_dir / CONFIG_FILE) for run_dir, c in children.items()], grace)
        with self._lock:
            for proc in self._procs.values():
                proc.wait()  # reaped: no zombie, and its return code known
            for run_dir in children:
                if read_status_file(run_dir).get("status") in ACTIVE:
                    why = (f"it did not stop within {grace:g} s and was ended" if (*children[run_dir],
                           run_dir / CONFIG_FILE) in killed else "it ended before its status was written")
                    write_status(run_dir, "stopped",
                                 message=f"Interrupted: the app shut down and {why}. {resume_advice(run_dir)}")


def _launch(run_dir: Path) -> subprocess.Popen:
    # The same command a user runs headless; its output goes to train.log for post-mortems. It sets
    # its own lower priority, thread count and memory limit from the environment (procs.child_env).
    log = open(run_dir / LOG_FILE, "ab")
    env = procs.child_env({**os.environ, "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen(train_command(run_dir / CONFIG_FILE), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    log.close()
    # The start time tells this child from a process that gets its pid after it is gone.
    write_status(run_dir, "running", message="Starting: loading the data and the model.", pid=proc.pid,
                 pid_start=procs.process_start_time(proc.pid))
    return proc


def train_command(config_path: Path, gpus: int | None = None) -> list[str]:
    """The child's command: ``python -m mmdemo train --config RUN/config.yaml`` for one process; for
    several (config ``num_processes``, 0 = one per visible GPU) the same module under ``accelerate launch
    --multi_gpu`` (DDP) on GPUs, or under ``torchrun`` on the CPU (where accelerate launch starts one),
    each launch with a rendezvous port of its own (free now), so that two runs at once never clash on one."""
    import yaml

    train = ["-m", "mmdemo", "train", "--config", str(config_path)]
    try:
        wanted = int((yaml.safe_load(Path(config_path).read_text()) or {}).get("num_processes") or 0)
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        wanted = 0  # the child itself reports a config it cannot read
    gpus = len(procs.gpu_memory()) if gpus is None else gpus
    n = wanted or max(1, gpus)
    if n == 1:
        return [sys.executable, *train]
    port = str(procs.free_port())
    if gpus:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                "--main_process_port", port, "--module", *train[1:]]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
            "--master_addr", "127.0.0.1", "--master_port", port, *train]


def child_alive(run_dir: Path, status: dict) -> bool:
    """Whether the process that status.json names still runs this run. A recorded start time tells that
    process apart from any that reuses its pid (the app's child, or a script that trains in its own
    process); without one, the command line must be this run's train command."""
    pid, start = status.get("pid"), status.get("pid_start")
    if start is not None:
        return procs.same_process(pid, start)
    return procs.is_training_child(pid, None, Path(run_dir) / CONFIG_FILE)


def _mark_crashed(run_dir: Path, returncode: int | None) -> None:
    status = read_status_file(run_dir)
    if status.get("status") in ACTIVE:
        if returncode is None:  # an adopted child: not ours to wait for
            how = "The training process ended without writing its status"
        elif returncode == -9:
            how = ("The training process exited unexpectedly: it was killed (SIGKILL), most often by the system "
                   "running out of memory; if so, start a new run with a smaller batch size or image size")
        else:
            how = f"The training process exited unexpectedly (exit code {returncode})"
        write_status(run_dir, "failed", message=f"{how}. {resume_advice(run_dir)} {_log_tail(run_dir)}".strip())


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
    if state == "running" and not live and not child_alive(run_dir, status):
        # The app restarted (or the child died unseen): the directory says running, nothing runs.
        state = "failed"
        status["message"] = "Interrupted: the app restarted while this run was training. Press Resume to continue."
    elif state == "queued" and manager is not None and _lost_from_queue(run_dir, manager):
        state = "failed"  # queued in a previous app process: no queue holds it now
        status["message"] = "Interrupted: the app restarted before this run started. Press Resume to start it."
    elif state == "running" and (run_dir / STOP_FILE).exists():
        state = "stopping"
        status["message"] = "Stopping: saving a checkpoint and the model so far."
    main_metric = status.get("main_metric", "accuracy")
    train, evals, since_start = _live_records(read_metrics(run_dir))
    if since_start and since_start[0]["time"] < status.get("queued", 0):
        since_start = []  # queued again (a resume) and not started yet: the records are the last process's
    step = train[-1]["step"] if train else 0
    total = status.get("total_steps") or 0
    metrics = status.get("metrics") or {}
    if state in ACTIVE:  # the headline of this run so far, never the numbers of the one it resumes
        now = [r for r in since_start if r["type"] == "eval"]
        metrics = {k: v for k, v in now[-1].items() if k not in ("type", "time", "epoch", "step")} if now else {}
    snapshot = {
        "run_id": run_dir.name, "status": state, "step": step, "total_steps": total,
        "epoch": train[-1]["epoch"] if train else 0,
        "eta_s": _eta([r for r in since_start if r["type"] in ("start", "train")], total),
        "train_loss": [[r["step"], r["loss"]] for r in train],
        "val": [[r["epoch"], r["val_loss"], r.get(main_metric)] for r in evals],
        "val_metrics": [{k: v for k, v in r.items() if k not in ("type", "time")} for r in evals],
        "main_metric": main_metric,
        "metrics": metrics, "message": status.get("message", ""),
        # The child's dry run on its GPU (mmdemo/fit.py): peak against free memory, micro-batch, ETA.
        "fit_message": status.get("fit_message", ""), "fit_warning": status.get("fit_warning", ""),
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


def _live_records(records: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, eval, since the last start) records of the run as it stands: a resume from checkpoint N
    replays the steps after N, so at each start the records past its step are superseded."""
    train, evals, since_start = [], [], []
    for r in records:
        if r["type"] == "start":
            at = r.get("step", 0)
            train = [t for t in train if t["step"] <= at]
            evals = [e for e in evals if e.get("step", 0) <= at]
            since_start = []
        elif r["type"] == "train":
            train.append(r)
        elif r["type"] == "eval":
            evals.append(r)
        since_start.append(r)
    return train, evals, since_start


def _eta(train: list[dict], total: int) -> float | None:
    """Seconds left, from the pace of the current process's records (its start record and train lines)."""
    from .progress import eta_seconds

    return eta_seconds([(r["time"], r["step"]) for r in train], total)


def new_run_config(workspace, dataset_dir, **params) -> TrainConfig:
    """A validated config for a new run directory in ``workspace`` (nothing written yet)."""
    from .refs import local_models_allowed, resolve_model_ref

    params = {k: v for k, v in params.items() if v is not None and not (isinstance(v, str) and not v.strip())}
    for name in ("base_model", "teacher"):  # a run id of this workspace (base_model: continued); never another user's
        if name in params:
            params[name] = resolve_model_ref(params[name], workspace, field=name, allow_local=local_models_allowed())
    if params.get("distill_baseline"):  # a run of this workspace, perhaps still queued (distill starts both)
        baseline = str(params["distill_baseline"]).split(" ")[0]
        params["distill_baseline"] = (str(find_run(workspace, baseline).resolve()) if not local_models_allowed()
                                      or not Path(baseline).is_absolute() else baseline)
    if params.get("teacher"):
        from .distill import check_distill_params

        check_distill_params(workspace, dataset_dir, params)
    run_dir = runs_dir(workspace) / uuid.uuid4().hex
    return TrainConfig(data=str(dataset_dir), output_dir=str(run_dir), **params)


def start_training(cfg: TrainConfig, manager: JobManager) -> str:
    """Writes the run directory's config and queues the child; returns the run id.

    Refuses (UserInputError) a run whose estimated peak memory exceeds what it can get; a run close
    to it starts with ``memory_warning`` in its status.json (see memory_warning)."""
    warning = check_run_memory(cfg)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / CONFIG_FILE)
    write_status(run_dir, "queued", memory_warning=warning)
    manager.submit(run_dir)
    return run_dir.name


def check_run_memory(cfg: TrainConfig) -> str:
    """memory.check_memory for ``cfg`` on its ingested dataset: "" when it fits well, else a warning."""
    from .data import load_summary
    from .memory import check_memory

    try:
        summary = load_summary(cfg.data)
    except (UserInputError, OSError, ValueError):
        return ""  # not an ingested dataset: the child reports what is wrong with it
    return check_memory(cfg, summary.num_train + summary.num_val)


def memory_warning(run_dir: Path) -> str:
    """The warning start_training gave for a run that may run out of memory ("" for none)."""
    return read_status_file(run_dir).get("memory_warning") or ""


def resume_training(run_dir: Path, manager: JobManager) -> dict:
    """Continues a stopped / failed run from its last checkpoint (the same run directory)."""
    state = run_status(run_dir, manager)["status"]
    if state == "stopping":
        raise UserInputError("This run is still stopping: wait for it to save its checkpoint (a few seconds), "
                             "then resume it.")
    if state in ACTIVE:
        raise UserInputError("This run is still active; stop it before resuming.")
    if state == "completed":
        raise UserInputError("This run already completed; start a new run, or continue from it by choosing it "
                             "as the base model.")
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
# its encoder frozen, features computed once). Image + text classification (frozen encoders: the fusion
# head only) and retrieval (frozen towers: the projections only; locked image: MiniLM's top layers too) were
# measured by bench/task_cost.py on a shared machine, the child started as the app starts it (one thread), as
# its CPU seconds per phase (an upper bound of an idle 2-core machine's wall time). A (task, method) key holds
# a method other than the task's default.
# Classification: 0.027 to 0.033 s per training row at 128 px on the four sets of bench/recipes.py (Dec 6: early
# layers frozen, one thread beside one or two others; the whole run's CPU less 0.02 s per validation row), about
# 1.5 times that at 160 px: 0.04 between the two.
CPU_COST = {"classification": (0.04, 0.02), "captioning": (0.012, 0.02), "vqa": (0.012, 0.006),
            "image_text_classification": (0.0007, 0.0008), "retrieval": (0.0005, 0.0003),
            ("retrieval", "locked_image"): (0.027, 0.024),  # measured with two threads (Dec 3, 07:29)
            ("vqa", "answer_head"): (0.0007, 0.0003)}
# Seconds per row (training + validation) spent once before the first step: the child's start, the model
# and the frozen encoders' outputs computed over every row (bench/task_cost.py's setup phase).
ONCE_COST = {"image_text_classification": 0.032, "retrieval": 0.040, ("retrieval", "locked_image"): 0.056,
             ("vqa", "answer_head"): 0.002}
# Tasks that evaluate after every epoch; the others about 10 times per run (the tasks' max_evals).
EVAL_EVERY_EPOCH = {"classification", "image_text_classification"}


def estimate_cpu_seconds(summary, cfg: TrainConfig) -> float:
    """A rough duration of ``cfg`` on ``summary``'s dataset on a 2-core CPU (shown before a run starts
    where there is no GPU)."""
    from .config import auto_epochs

    key = (summary.task, cfg.method)
    per_train, per_val = CPU_COST.get(key) or CPU_COST.get(summary.task, CPU_COST["classification"])
    epochs = cfg.epochs or auto_epochs(summary.num_train, cfg.batch_size, cfg.method)
    evals = epochs if summary.task in EVAL_EVERY_EPOCH else min(epochs, 10)
    once = ONCE_COST.get(key, ONCE_COST.get(summary.task, 0.0)) * (summary.num_train + summary.num_val)
    return once + epochs * summary.num_train * per_train + evals * summary.num_val * per_val


MANY_EPOCHS = 1000
LONG_CPU_SECONDS = 86400


def start_warnings(summary, cfg: TrainConfig, gpu: bool | None = None) -> list[str]:
    """What is absurd about ``cfg`` before it starts (it still may): far too many epochs, or days of
    training on this machine's CPU."""
    from .progress import format_duration

    warnings = []
    if cfg.epochs > MANY_EPOCHS and not cfg.max_steps:
        warnings.append(f"epochs={cfg.epochs} is far more than fine-tuning needs (a few to a few dozen): "
                        "stop the run and start one with fewer epochs, or set max_steps.")
    if not (has_gpu() if gpu is None else gpu):
        seconds = estimate_cpu_seconds(summary, cfg)
        if cfg.max_steps:
            steps = (cfg.epochs or 1) * max(1, summary.num_train // max(1, cfg.batch_size))
            seconds *= min(1.0, cfg.max_steps / steps)
        if seconds > LONG_CPU_SECONDS:
            warnings.append(f"On this machine's CPU this run takes about {format_duration(seconds)}: use fewer "
                            "epochs, a smaller model or GPU hardware.")
    return warnings


def run_warnings(run_dir: Path) -> list[str]:
    """``start_warnings`` for a run directory's config and dataset, and its memory warning if any."""
    from .data import load_summary

    cfg = TrainConfig.load(Path(run_dir) / CONFIG_FILE)
    memory = memory_warning(run_dir)
    return start_warnings(load_summary(cfg.data), cfg) + ([memory] if memory else [])


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (the page must serve first)."""
    return procs.gpu_visible()
