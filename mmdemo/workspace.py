"""Where data lives: one workspace folder per user under a configurable data directory, removed once
it has not been touched for MMDEMO_WORKSPACE_TTL_HOURS (a public Space's disk is shared by everyone)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from .runs import CONFIG_FILE, runs_dir
from .settings import cleanup_interval_s, data_dir, workspace_ttl_hours

log = logging.getLogger(__name__)
TRASH_PREFIX = ".trash-"
_cleanup_lock = threading.Lock()
_cleanup_started = False


def user_workspace(user_key: str) -> Path:
    """The workspace of one user; the key (a browser id or a client session) is hashed, so no
    user-supplied text ever becomes a path component."""
    digest = hashlib.sha256(str(user_key).encode()).hexdigest()[:32]
    path = data_dir() / "users" / digest
    path.mkdir(parents=True, exist_ok=True)
    return path


def cleanup_workspaces(now: float | None = None, *, root: Path | None = None,
                       is_busy: Callable[[Path], bool] | None = None) -> list[Path]:
    """Removes the user workspaces untouched for longer than the TTL that have no queued or running run.

    Args:
        now: the time to judge ages against (default: now).
        root: the data directory (default: data_dir()).
        is_busy: ``is_busy(workspace) -> bool``, True while the workspace has a queued or running run
            (the app passes one built from its job manager, see ``jobs.has_active_run``). Without it,
            no workspace that holds a run is removed.

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
        if not wsp.is_dir() or wsp.is_symlink() or _newest_mtime(wsp) > cutoff or _busy(wsp, is_busy):
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


def _busy(wsp: Path, is_busy) -> bool:
    if not any(runs_dir(wsp).glob(f"*/{CONFIG_FILE}")):
        return False
    return True if is_busy is None else is_busy(wsp)


def start_cleanup(is_busy: Callable[[Path], bool] | None = None, interval_s: float | None = None) -> None:
    """Runs cleanup_workspaces now and then every MMDEMO_CLEANUP_INTERVAL_S seconds (default an hour) in
    a daemon thread; a second call does nothing. The data directory is fixed when it starts. ``is_busy``: as
    for cleanup_workspaces."""
    global _cleanup_started
    with _cleanup_lock:
        if _cleanup_started:
            return
        _cleanup_started = True
    root = data_dir()
    interval = interval_s or cleanup_interval_s()

    def clean_forever():
        while True:
            try:
                cleanup_workspaces(root=root, is_busy=is_busy)
            except Exception:  # noqa: BLE001 - a failed sweep must not end the thread; the next one retries
                log.exception("Workspace cleanup failed")
            time.sleep(interval)

    threading.Thread(target=clean_forever, name="mmdemo-cleanup", daemon=True).start()
