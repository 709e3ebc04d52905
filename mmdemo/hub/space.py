"""The Space: what of a checkout it needs, its README front matter (from Space.yaml), and its deployment."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from ..errors import UserInputError
from .push import HubClient, check_write_access, resolve_token, secret
from .rundir import check_repo_id

ROOT = Path(__file__).resolve().parents[2]
SPACE_FILES, SPACE_DIRS = ("app.py", "requirements.txt", "README.md"), {"mmdemo": "*.py", "ui": "*.py", "assets": "*"}


def space_files(root=ROOT) -> list[str]:
    """What a Space needs from a checkout: app.py, the UI's and the engine's sources, assets/,
    requirements.txt and README.md (whose front matter holds the Space's settings); never tests, data, venvs or git."""
    root = Path(root)
    files = [name for name in SPACE_FILES if (root / name).is_file()]
    for folder, pattern in SPACE_DIRS.items():
        files += [p.relative_to(root).as_posix() for p in (root / folder).rglob(pattern) if p.is_file()
                  and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts)]
    if missing := {"app.py", "requirements.txt"} - set(files):
        raise UserInputError(f"Not an mmdemo checkout: {', '.join(sorted(missing))} missing in '{root.name}'.")
    return sorted(files)


def _space_readme(root: Path) -> str:
    # The Hub reads a Space's settings from README.md's front matter: Space.yaml is the source of truth.
    text = (root / "README.md").read_text() if (root / "README.md").is_file() else "# mmdemo\n"
    match = re.match(r"---\r?\n.*?\r?\n---\r?\n", text, flags=re.DOTALL)
    return f"---\n{(root / 'Space.yaml').read_text().strip()}\n---\n" + (text[match.end():] if match else text)


def deploy_space(repo_id: str, token: str = "", *, private: bool | None = None, api=None, root=ROOT) -> dict:
    """Creates or updates a Gradio Space that runs this app, through the same seam as ``push_run``.

    Args:
        repo_id: ``owner/name`` or ``name`` of the Space.
        token: a write token; "" = ``HF_TOKEN``, else the cached login.
        private: visibility of a new Space (None: the Hub's default).
        api: the network seam; default: the real Hub.
        root: the checkout to deploy.

    Returns:
        ``{"url", "repo_id", "files"}``.
    """
    client, root = (api if api is not None else HubClient()), Path(root)
    files = sorted(set(space_files(root)) | {"README.md"})
    check_repo_id(repo_id)
    token = resolve_token(token)
    with secret(token), tempfile.TemporaryDirectory(prefix="mmdemo-space-") as tmp:
        full = check_write_access(repo_id, token, client)
        for name in files:
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            if name != "README.md":
                shutil.copy2(root / name, Path(tmp) / name)
        (Path(tmp) / "README.md").write_text(_space_readme(root))
        url = client.create_repo(full, token, repo_type="space", private=private, space_sdk="gradio")
        client.upload_folder(full, tmp, token, repo_type="space", commit_message="Deploy mmdemo")
    return {"url": url, "repo_id": full, "files": files}
