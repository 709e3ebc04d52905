"""Every ``MMDEMO_*`` environment variable, read here and nowhere else.

Each is read when its function is called, not at import, so a test (or a Space owner changing the
Space's settings) can set it per process.

=============================  =========================================  ==========================================
variable                       default                                    what
=============================  =========================================  ==========================================
``MMDEMO_DATA_DIR``            ``/data/mmdemo`` if ``/data`` is writable,  workspaces: datasets and runs
                               else ``./data``
``MMDEMO_MAX_JOBS``            1                                          training jobs at once; the rest queue
``MMDEMO_MAX_UPLOAD``          ``500mb``                                  largest upload the page accepts
``MMDEMO_MAX_UNZIPPED_MB``     2048                                       zip-bomb cap: bytes unpacked
``MMDEMO_MAX_ZIP_MEMBERS``     50000                                      zip-bomb cap: entries
``MMDEMO_MAX_ZIP_RATIO``       100                                        zip-bomb cap: unpacked / packed size
``MMDEMO_MAX_METADATA_MB``     50                                         largest metadata.csv / .jsonl
``MMDEMO_WORKSPACE_TTL_HOURS`` 72                                         idle workspaces go after this; 0 keeps them
``MMDEMO_CLEANUP_INTERVAL_S``  3600                                       seconds between two workspace cleanups
``MMDEMO_INFERENCE_DEVICE``    the GPU when there is one                  ``cpu`` keeps inference off the GPU
``MMDEMO_PRELOAD``             on                                         ``0``: the app loads its default classifier
                                                                          on first use, not once it serves
``MMDEMO_ALLOW_LOCAL_MODELS``  off                                        ``1``: the app accepts local model folders
``MMDEMO_STOP_GRACE_S``        30                                         seconds a child has to stop on shutdown
``MMDEMO_JOB_MEMORY_LIMIT``    0.8 of RAM (none with a GPU)               memory one training child may use
``MMDEMO_TRAIN_THREADS``       all cores but one (at least 1)             CPU threads of a training child
``MMDEMO_CHILD_NICE``,         set by the app for its children            the child's niceness and RLIMIT_DATA
``MMDEMO_CHILD_RLIMIT_DATA``
=============================  =========================================  ==========================================
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TTL_HOURS = 72
DEFAULT_CLEANUP_INTERVAL_S = 3600
# Upload limits: ingest runs inside the web server, so these guard its disk and memory.
UPLOAD_LIMITS = {"MMDEMO_MAX_UNZIPPED_MB": 2048, "MMDEMO_MAX_ZIP_MEMBERS": 50_000, "MMDEMO_MAX_ZIP_RATIO": 100,
                 "MMDEMO_MAX_METADATA_MB": 50}


def _get(name: str) -> str:
    return os.environ.get(name, "").strip()


def data_dir() -> Path:
    """``MMDEMO_DATA_DIR``, else a Space's persistent storage (``/data``) when writable, else ./data."""
    configured = os.environ.get("MMDEMO_DATA_DIR")
    if configured:
        return Path(configured)
    if os.path.isdir("/data") and os.access("/data", os.W_OK):
        return Path("/data/mmdemo")
    return Path("data").resolve()


def max_jobs() -> int:
    """``MMDEMO_MAX_JOBS``: training children at once (default 1, one GPU job)."""
    return int(os.environ.get("MMDEMO_MAX_JOBS", "1"))


def max_upload() -> str:
    """``MMDEMO_MAX_UPLOAD``: gradio's upload limit, "200kb", "2gb" or a number of bytes (default 500mb)."""
    return os.environ.get("MMDEMO_MAX_UPLOAD", "500mb")


def upload_limit(name: str) -> float:
    """An upload limit (a key of UPLOAD_LIMITS): the environment variable if set, else its default."""
    value = _get(name)
    try:
        return float(value) if value else float(UPLOAD_LIMITS[name])
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def workspace_ttl_hours() -> float:
    """``MMDEMO_WORKSPACE_TTL_HOURS`` (default 72); 0 or less keeps workspaces forever."""
    value = _get("MMDEMO_WORKSPACE_TTL_HOURS")
    return float(value) if value else float(DEFAULT_TTL_HOURS)


def cleanup_interval_s() -> float:
    """``MMDEMO_CLEANUP_INTERVAL_S``: seconds between two workspace cleanups (default an hour)."""
    return float(os.environ.get("MMDEMO_CLEANUP_INTERVAL_S", "") or DEFAULT_CLEANUP_INTERVAL_S)


def inference_on_cpu() -> bool:
    """``MMDEMO_INFERENCE_DEVICE=cpu``: inference stays on the CPU even with a GPU (kept for training)."""
    return _get("MMDEMO_INFERENCE_DEVICE").lower() == "cpu"


def preload() -> bool:
    """``MMDEMO_PRELOAD`` (default on): the app loads the default classifier in the background once it
    serves, so the first classify call does not wait for torch and the model; ``0`` loads on first use."""
    return _get("MMDEMO_PRELOAD").lower() not in ("0", "false", "no", "off")


def job_settings(env=None) -> dict:
    """The job settings from the environment, read in one place.

    MMDEMO_STOP_GRACE_S: seconds a child has to stop after the app's SIGTERM (default 30).
    MMDEMO_JOB_MEMORY_LIMIT: the memory one child may use: a fraction of RAM (``0.5``), megabytes
    (``4096``, ``4096mb``), gigabytes (``8gb``) or ``0`` / ``off`` for none. Default: 0.8 of RAM on the
    CPU; none where a GPU is visible, since CUDA reserves huge address ranges that a data limit may count.
    MMDEMO_TRAIN_THREADS: CPU threads of a child (default: all cores but one, which the server keeps for
    the page and inference; 1 on one or two cores). On 2 busy cores a child with 2 threads took 3-4 steps
    while 20 users classified, with 1 thread 18-19 (bench/RESULTS.md section 7): its threads wait for each
    other whenever the server takes a core.
    """
    env = os.environ if env is None else env
    from .procs import DEFAULT_MEMORY_FRACTION, DEFAULT_STOP_GRACE_S, gpu_visible, parse_memory_limit, total_memory_bytes

    total = total_memory_bytes()
    raw = str(env.get("MMDEMO_JOB_MEMORY_LIMIT", "")).strip().lower()
    limit = parse_memory_limit(raw, total) if raw else (None if gpu_visible() else int(total * DEFAULT_MEMORY_FRACTION))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = env.get("MMDEMO_TRAIN_THREADS", "").strip()
    return {"stop_grace_s": float(env.get("MMDEMO_STOP_GRACE_S", "") or DEFAULT_STOP_GRACE_S),
            "memory_limit": limit,
            "threads": max(1, int(threads)) if threads else max(1, cores - 1)}


def child_limits() -> tuple[str, str]:
    """In a training child: the niceness and the RLIMIT_DATA bytes its parent set for it
    (``MMDEMO_CHILD_NICE``, ``MMDEMO_CHILD_RLIMIT_DATA``; see procs.child_env), as given."""
    return _get("MMDEMO_CHILD_NICE"), _get("MMDEMO_CHILD_RLIMIT_DATA")


def allow_local_models() -> bool:
    """``MMDEMO_ALLOW_LOCAL_MODELS=1``: the app and the API accept local model folders (see mmdemo.refs)."""
    return _get("MMDEMO_ALLOW_LOCAL_MODELS").lower() in ("1", "true", "yes", "on")
