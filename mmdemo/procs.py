"""Training child processes as the operating system sees them (standard library only: the app and
the child's first lines use it before torch loads).

A run directory's status.json records the child's pid and its start time (field 22 of
/proc/PID/stat, in clock ticks since boot); a process is that run's child only while the pid, the
start time and the command line ``-m mmdemo train --config RUN/config.yaml`` all still match, so a
pid the kernel recycled after an app crash is never mistaken for a live run.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import time
from collections import deque
from pathlib import Path

# The child writes a checkpoint and exits within this many seconds of a SIGTERM before it is killed.
DEFAULT_STOP_GRACE_S = 30.0
# Of the machine's RAM, the share one training child may hold: the rest keeps the server (and the OS)
# alive when a run asks for too much.
DEFAULT_MEMORY_FRACTION = 0.8
CHILD_NICE = 10
# Set by the parent for the child: the bytes of RLIMIT_DATA to apply before torch loads.
CHILD_LIMIT_ENV, CHILD_NICE_ENV = "MMDEMO_CHILD_RLIMIT_DATA", "MMDEMO_CHILD_NICE"


def parse_memory_limit(text: str, total: int) -> int | None:
    """``0.5`` -> half of ``total``; ``4096`` / ``4096mb`` -> MiB; ``8gb`` -> GiB; ``0`` / ``off`` -> None."""
    text = text.strip().lower().replace(" ", "")
    if text in ("", "0", "off", "none"):
        return None
    units = {"gb": 2**30, "g": 2**30, "mb": 2**20, "m": 2**20}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * scale)
    value = float(text)
    return int(value * total) if value < 1 else int(value * 2**20)


def total_memory_bytes() -> int:
    return _meminfo("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_bytes() -> int:
    """MemAvailable: what the kernel can give without swapping (free + reclaimable caches)."""
    return _meminfo("MemAvailable") or total_memory_bytes()


def _meminfo(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch."""
    import shutil

    return Path("/proc/driver/nvidia/gpus").is_dir() or shutil.which("nvidia-smi") is not None


def gpu_memory() -> list[dict]:
    """Each visible NVIDIA GPU's name, free and total bytes, from nvidia-smi (no torch, no CUDA context
    in the server); [] where there is none or nvidia-smi does not answer."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.free,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        try:
            name, free, total = (part.strip() for part in line.rsplit(",", 2))
            gpus.append({"name": name, "free": int(float(free)) * 2**20, "total": int(float(total)) * 2**20})
        except ValueError:
            continue
    # CUDA_VISIBLE_DEVICES narrows what a child sees (a list of indices; UUIDs are taken as they come).
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(v.strip().isdigit() for v in visible.split(",") if v.strip()):
        gpus = [gpus[int(v)] for v in visible.split(",") if v.strip() and int(v) < len(gpus)]
    return gpus


def process_start_time(pid) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), or None when no such process."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, TypeError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else None


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split(" ", 1)[0]


def same_process(pid, start_time) -> bool:
    """True while ``pid`` is alive (not a zombie) and, where ``start_time`` was recorded, is the process
    that recorded it (a recycled pid has another start time)."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0 or _state(pid) in ("", "Z", "X"):
        return False
    return start_time is None or process_start_time(pid) == int(start_time)


def is_training_child(pid, start_time, config_path) -> bool:
    """True while ``pid`` is alive (not a zombie), started at ``start_time`` (skipped when None: a run
    started headless records none) and runs ``-m mmdemo train --config config_path``: strict enough to
    adopt and signal it."""
    if not same_process(pid, start_time):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return _runs_train(argv, Path(config_path))


# The ports handed out lately: a launch started a moment ago may not have bound its port yet.
_RECENT_PORTS: deque[int] = deque(maxlen=64)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (bound to port 0, read, released) and none of the last ones this
    process handed out: the rendezvous port of one multi-process launch, so that two runs never share one."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _RECENT_PORTS:
            break
    _RECENT_PORTS.append(port)
    return port


def _runs_train(argv: list[str], config_path: Path) -> bool:
    # "-m mmdemo train" may follow a launcher's own "-m" (python -m torch.distributed.run ... -m mmdemo train).
    module = next((i for i, arg in enumerate(argv) if arg in ("-m", "--module") and argv[i + 1:i + 3] == ["mmdemo", "train"]),
                  None)
    if module is None or "--config" not in argv[module:]:
        return False
    config = argv.index("--config", module)
    if config + 1 >= len(argv):
        return False
    return _same_file(argv[config + 1], config_path)


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def live_children(root: Path) -> dict[Path, tuple[int, int | None]]:
    """The runs under the data directory ``root`` whose status says running and whose child still runs
    them: run dir -> (pid, start time). Reads status files only (no torch), so the app can ask cheaply."""
    from .runs import read_json

    found = {}
    for status_file in Path(root).glob("users/*/runs/*/status.json"):
        status = read_json(status_file)
        pid, start = status.get("pid"), status.get("pid_start")
        if status.get("status") == "running" and is_training_child(pid, start, status_file.parent / "config.yaml"):
            found[status_file.parent] = (int(pid), start)
    return found


def child_env(base: dict, cfg: dict | None = None) -> dict:
    """The environment of a training child: its thread count and the memory limit it applies to itself."""
    from .settings import job_settings

    cfg = cfg or job_settings(base)
    threads = str(cfg["threads"])
    env = {**base, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, CHILD_NICE_ENV: str(CHILD_NICE)}
    env.pop(CHILD_LIMIT_ENV, None)
    if cfg["memory_limit"]:
        env[CHILD_LIMIT_ENV] = str(cfg["memory_limit"])
    return env


def lower_autogroup(nice: int, path: str = "/proc/self/autogroup") -> bool:
    """The same niceness for this process's scheduler autogroup, where Linux has them: the child starts a
    session of its own, and with autogrouping (``/proc/sys/kernel/sched_autogroup_enabled``) the CPU is
    shared between sessions first, so a thread's niceness alone would not yield to the server. Raising an
    autogroup's niceness needs no privilege; returns whether it was set."""
    try:
        with open(path, "w") as f:
            f.write(f"{nice}")
        return True
    except OSError:
        return False


def apply_child_limits() -> int | None:
    """In the child, before torch loads (and so before any thread starts, since niceness is per
    thread and inherited): the lower CPU priority, and RLIMIT_DATA from the parent's setting (heap and
    anonymous memory, what tensors are made of; unlike RLIMIT_AS it leaves mapped libraries alone). An
    allocation past it fails inside this process, which then reports the out-of-memory advice, instead
    of the kernel's OOM killer choosing among all processes. Returns the limit applied, if any."""
    from .settings import child_limits

    nice, raw = child_limits()
    if nice.isdigit():
        try:
            os.nice(max(0, int(nice) - os.nice(0)))
        except OSError:
            pass
        lower_autogroup(int(nice))
    if not raw.isdigit():
        return None
    limit = int(raw)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit


def end_processes(children: list[tuple], grace: float) -> list[tuple]:
    """SIGTERM to each ``(pid, start_time, config_path)`` (the child checkpoints and exits), then after
    ``grace`` seconds SIGKILL to the process group (its data-loader workers too) of those still alive.
    Returns the children that had to be killed."""
    alive = [c for c in children if is_training_child(*c)]
    for pid, *_ in alive:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [c for c in alive if is_training_child(*c)]
    for pid, *_ in alive:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            _signal(pid, signal.SIGKILL)
    return alive


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass
