"""Where data lives: one workspace folder per user under a configurable data directory, removed once
it has not been touched for MMDEMO_WORKSPACE_TTL_HOURS (a public Space's disk is shared by everyone)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)
DEFAULT_TTL_HOURS = 72
DEFAULT_CLEANUP_INTERVAL_S = 3600
TRASH_PREFIX = ".trash-"
_cleanup_lock = threading.Lock()
_cleanup_started = False


def read_json(path) -> dict:
    """A JSON object that the engine wrote into a workspace (status, summary, report...), or {} when the
    file is missing, being rewritten, or holds no object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def data_dir() -> Path:
    """``MMDEMO_DATA_DIR``, else a Space's persistent storage (``/data``) when writable, else ./data."""
    configured = os.environ.get("MMDEMO_DATA_DIR")
    if configured:
        return Path(configured)
    if os.path.isdir("/data") and os.access("/data", os.W_OK):
        return Path("/data/mmdemo")
    return Path("data").resolve()


def user_workspace(user_key: str) -> Path:
    """The workspace of one user; the key (a browser id or a client session) is hashed, so no
    user-supplied text ever becomes a path component."""
    digest = hashlib.sha256(str(user_key).encode()).hexdigest()[:32]
    path = data_dir() / "users" / digest
    path.mkdir(parents=True, exist_ok=True)
    return path


def workspace_ttl_hours() -> float:
    """``MMDEMO_WORKSPACE_TTL_HOURS`` (default 72); 0 or less keeps workspaces forever."""
    value = os.environ.get("MMDEMO_WORKSPACE_TTL_HOURS", "").strip()
    return float(value) if value else float(DEFAULT_TTL_HOURS)


def cleanup_workspaces(now: float | None = None, *, root: Path | None = None, manager=None) -> list[Path]:
    """Removes the user workspaces untouched for longer than the TTL that have no queued or running run.

    Args:
        now: the time to judge ages against (default: now).
        root: the data directory (default: data_dir()).
        manager: the app's JobManager, if any: a run it does not know is not really queued.

    Returns:
        The workspace folders removed.
    """
    ttl = workspace_ttl_hours()
    users = Path(root or data_dir()) / "users"
    if ttl <= 0 or not users.is_dir():
        return []
    cutoff = (time.time() if now is None else now) - ttl * 3600
    removed = []
    for wsp in sorted(users.iterdir()):
        if wsp.name.startswith(TRASH_PREFIX):
            shutil.rmtree(wsp, ignore_errors=True)  # left by a cleanup that was interrupted
            continue
        if not wsp.is_dir() or wsp.is_symlink() or _newest_mtime(wsp) > cutoff or _has_active_run(wsp, manager):
            continue
        # One rename takes it out of reach, then the slow delete; a user arriving meanwhile gets a new one.
        trash = users / f"{TRASH_PREFIX}{wsp.name}-{uuid.uuid4().hex[:8]}"
        try:
            wsp.rename(trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(wsp)
    if removed:
        log.info("Removed %d workspace(s) idle for more than %g hours", len(removed), ttl)
    return removed


def _newest_mtime(folder: Path) -> float:
    newest = folder.lstat().st_mtime
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(parent, name)).st_mtime)
            except OSError:
                pass  # removed while we walk: it was there, so the folder is in use
    return newest


def _has_active_run(wsp: Path, manager) -> bool:
    runs = [p.parent for p in (wsp / "runs").glob("*/config.yaml")]
    if not runs:
        return False
    from .jobs import ACTIVE, run_status  # only for old workspaces with runs: jobs imports torch

    return any(run_status(run_dir, manager)["status"] in ACTIVE for run_dir in runs)


def start_cleanup(manager=None, interval_s: float | None = None) -> None:
    """Runs cleanup_workspaces now and then every MMDEMO_CLEANUP_INTERVAL_S seconds (default an hour) in
    a daemon thread; a second call does nothing. The data directory is fixed when it starts."""
    global _cleanup_started
    with _cleanup_lock:
        if _cleanup_started:
            return
        _cleanup_started = True
    root = data_dir()
    interval = interval_s or float(os.environ.get("MMDEMO_CLEANUP_INTERVAL_S", "") or DEFAULT_CLEANUP_INTERVAL_S)

    def clean_forever():
        while True:
            try:
                cleanup_workspaces(root=root, manager=manager)
            except Exception:  # noqa: BLE001 - a failed sweep must not end the thread; the next one retries
                log.exception("Workspace cleanup failed")
            time.sleep(interval)

    threading.Thread(target=clean_forever, name="mmdemo-cleanup", daemon=True).start()
