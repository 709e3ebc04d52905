"""The network seam, the token and its write access, and the push of a run to a model repo.

A token only ever goes to ``HubClient``: it is never written to disk, logged, returned, or put in a card
or a message (``secret`` masks it in any error that would carry it).
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserInputError
from .export import export_run
from .rundir import check_repo_id, read_run

TOKENS_URL = "https://huggingface.co/settings/tokens"
NO_TOKEN = (f"No Hugging Face token: paste a token with write access (create one at {TOKENS_URL}), set "
            "HF_TOKEN, or run `hf auth login`.")
UNREACHABLE = ("Hub unreachable: could not connect to the Hugging Face Hub (offline mode or no network). Check "
               "your connection and that HF_HUB_OFFLINE is not set, or `python -m mmdemo export` the run to upload "
               "it later.")


class HubClient:
    """The only network seam: the HfApi calls sharing needs, Hub failures turned into ``UserInputError``s
    that name the fix. ``api``: an ``huggingface_hub.HfApi`` (default: a new one)."""

    def __init__(self, api=None):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self.api = api

    def whoami(self, token: str) -> dict:
        with _hub_errors("check the token", token):
            return self.api.whoami(token=token)

    def create_repo(self, repo_id: str, token: str, *, repo_type: str = "model", private: bool | None = None,
                    space_sdk: str | None = None) -> str:
        extra = {"space_sdk": space_sdk} if repo_type == "space" else {}
        with _hub_errors(f"create or update {repo_id}", token):
            return str(self.api.create_repo(repo_id, token=token, repo_type=repo_type, private=private,
                                            exist_ok=True, **extra))

    def upload_folder(self, repo_id: str, folder, token: str, *, repo_type: str = "model",
                      commit_message: str = "") -> None:
        with _hub_errors(f"upload to {repo_id}", token):
            self.api.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token, repo_type=repo_type,
                                   commit_message=commit_message)


@contextmanager
def _hub_errors(action: str, token: str):
    from huggingface_hub.errors import HfHubHTTPError

    transport = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled is a ConnectionError
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x speaks httpx2
        if hasattr(sys.modules.get(module), "TransportError"):
            transport.append(sys.modules[module].TransportError)
    try:
        yield
    except HfHubHTTPError as e:
        raise UserInputError(_http_message(e, action).replace(token or "\0", "***")) from None
    except tuple(transport):
        raise UserInputError(UNREACHABLE) from None


def _http_message(e, action: str) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None) or 0
    known = {401: f"The Hugging Face token was rejected (invalid or expired). Create a new one at {TOKENS_URL}.",
             403: (f"Your token may not {action}: it needs write access to that namespace (a 'write' token, or a "
                   f"fine-grained one with 'repo.write' there). Check it at {TOKENS_URL}."),
             429: "The Hub is rate-limiting requests; wait a minute and try again."}
    if status in known or status >= 500:
        return known.get(status) or f"The Hub had a server error (HTTP {status}) trying to {action}; try again later."
    detail = (getattr(e, "server_message", None) or "").strip()[:300]
    return f"The Hub refused to {action} (HTTP {status}){': ' + detail if detail else ''}."


@contextmanager
def secret(token: str):
    """Last guard: no message that leaves this package carries the token."""
    try:
        yield
    except UserInputError as e:
        if token and token in str(e):
            raise UserInputError(str(e).replace(token, "***")) from None
        raise


# --- token and access ---------------------------------------------------------------------------


def resolve_token(token: str | None = "") -> str:
    """The token to use: the argument, else ``HF_TOKEN``, else the cached login (``hf auth login``).

    Raises:
        UserInputError: there is none.
    """
    from huggingface_hub import get_token

    token = (token or "").strip() or os.environ.get("HF_TOKEN", "").strip()
    if not token:
        try:
            token = (get_token() or "").strip()
        except Exception:  # noqa: BLE001 - a broken login file or OIDC setup counts as no login
            token = ""
    if not token:
        raise UserInputError(NO_TOKEN)
    return token


def check_write_access(repo_id: str, token: str, client: HubClient) -> str:
    """Checks the repo id's syntax, then that ``token`` may write to its namespace as whoami reports it
    (token role, or a fine-grained token's ``repo.write``); the repo itself is created or reused later.

    Returns:
        The full repo id ``owner/name`` (a bare name goes to the token's user).
    """
    repo_id = check_repo_id(repo_id)
    info = client.whoami(token)
    user = info.get("name") or ""
    full = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    namespace = full.split("/")[0]
    if namespace != user and namespace not in {org.get("name") for org in info.get("orgs") or []}:
        raise UserInputError(f"Your token belongs to '{user}', which is neither '{namespace}' nor a member of it; "
                             f"use '{user}/{full.split('/')[1]}' or one of your organisations.")
    if not _token_can_write(info, namespace, full):
        raise UserInputError(f"This token is read-only for '{namespace}'. Create one with write access (or a "
                             f"fine-grained one with 'repo.write' on '{namespace}') at {TOKENS_URL}.")
    return full


def _token_can_write(info: dict, namespace: str, full: str) -> bool:
    token_info = (info.get("auth") or {}).get("accessToken")
    if not token_info:
        return True  # OAuth and app tokens: the Hub decides at upload time (a 403 becomes a clear error)
    role = token_info.get("role")
    if role != "fineGrained":
        return role in ("write", "admin")
    fine = token_info.get("fineGrained") or {}
    scopes = [s for s in fine.get("scoped") or [] if (s.get("entity") or {}).get("name") in (namespace, full)]
    return any("repo.write" in (s.get("permissions") or []) for s in [{"permissions": fine.get("global")}, *scopes])


# --- push ---------------------------------------------------------------------------------------


def push_run(run_dir, repo_id: str, token: str = "", *, private: bool = True, merged: bool = False,
             api=None) -> dict:
    """Pushes a run to a Hub model repo (created when missing): what ``export_run`` writes.

    Args:
        run_dir: a finished (or stopped) run directory.
        repo_id: ``owner/name``, or ``name`` for the token's user.
        token: a write token; "" = ``HF_TOKEN``, else the cached login.
        private: a new repo is private (an existing repo keeps its visibility).
        merged: LoRA runs: leave out ``adapter/``.
        api: the network seam (a ``HubClient`` or a fake with its methods); default: the real Hub.

    Returns:
        ``{"url", "repo_id", "files"}``.
    """
    client = api if api is not None else HubClient()
    read_run(Path(run_dir))  # local problems first, before any network call
    check_repo_id(repo_id)
    token = resolve_token(token)
    with secret(token), tempfile.TemporaryDirectory(prefix="mmdemo-push-") as tmp:
        full = check_write_access(repo_id, token, client)
        files = export_run(run_dir, Path(tmp) / "export", repo_id=full, merged=merged)
        url = client.create_repo(full, token, repo_type="model", private=private)
        client.upload_folder(full, Path(tmp) / "export", token, repo_type="model",
                             commit_message=f"Upload run {Path(run_dir).name} from mmdemo")
    return {"url": url, "repo_id": full, "files": files}


def push_run_api(run_dir, repo_id: str, token: str = "", private: bool = True, api=None) -> dict:
    """The app's ``/push_to_hub``: ``push_run``, except that on a Space (``SPACE_ID`` set) the caller's own
    token is required, so that visitors never push with the Space owner's ``HF_TOKEN``.

    Returns:
        ``{"url", "files"}``.
    """
    if os.environ.get("SPACE_ID") and not (token or "").strip():
        raise UserInputError(f"Paste your own Hugging Face write token ({TOKENS_URL}); this shared app never "
                             "pushes with its own.")
    result = push_run(run_dir, repo_id, token, private=private, api=api)
    return {"url": result["url"], "files": result["files"]}
