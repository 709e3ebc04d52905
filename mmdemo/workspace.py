"""Where data lives: one workspace folder per user under a configurable data directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
