"""Model references: which text may name a model or a checkpoint, and what the engine gets for it.

On the app and the API a field that names a model (``base_model``, ``checkpoint``) accepts only a run
id of the caller's own workspace, a registry name (``efficientnet_lite0``, ``efficientnet_lite0+minilm``),
a timm model name or a Hugging Face Hub id. A server path never: one user's run is another user's secret,
and the answer to a path must not tell whether it exists. Local folders come from the CLI, or on the app
only where the operator sets MMDEMO_ALLOW_LOCAL_MODELS=1.

What this returns to the engine is a name or an absolute path, and the engine's builders take a name for
a local folder only when it is absolute (``local_dir``): a Hub id such as ``owner/name`` never reads a
folder relative to the server's working directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import DEFAULT_MODELS
from .errors import UserInputError

ALLOW_LOCAL_ENV = "MMDEMO_ALLOW_LOCAL_MODELS"
REGISTRY_NAMES = tuple(sorted(set(DEFAULT_MODELS.values())))  # the offline defaults
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")  # the run ids jobs.new_run_config hands out
# The Hub's repo-id rule (huggingface_hub.utils.validate_repo_id): an optional namespace and a name of
# ASCII letters, digits, '-', '_' and '.', no '--' or '..'; timm's "hf-hub:" prefix is allowed before it.
HUB_ID_RE = re.compile(r"^(hf-hub:)?[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?(/[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?$")
MODEL_META = "mmdemo.json"  # models.META_FILE (models imports torch)


def local_models_allowed() -> bool:
    """Whether the app and the API accept local model folders (MMDEMO_ALLOW_LOCAL_MODELS=1)."""
    from .settings import allow_local_models

    return allow_local_models()


def is_hub_id(text: str) -> bool:
    """A Hub model id or a timm / registry name: never a path (no leading '/', '.', '~', one '/' at most)."""
    return (len(text) <= 96 + len("hf-hub:") and "--" not in text and ".." not in text
            and bool(HUB_ID_RE.match(text)))


def local_dir(name) -> Path | None:
    """The folder ``name`` names, if it is an absolute path to a folder; None for anything else (a Hub id,
    a registry name, a relative path). The builders and the predictor use this one rule."""
    text = str(name or "").strip()
    path = Path(text)
    return path if text and path.is_absolute() and path.is_dir() else None


def resolve_model_ref(text, workspace=None, *, field: str = "base_model", allow_local: bool = False) -> str:
    """The engine's reference for a model named by a user; "" stays "" (the default model).

    Args:
        text: what the user typed or picked: a run id (a picker's "id · label" too), a registry name, a timm
            name, a Hub id, or (``allow_local``) a folder.
        workspace: the caller's workspace, where run ids are looked up (None: no run ids).
        field: the field's name, for the messages.
        allow_local: accept existing local folders (the CLI; on the app only with MMDEMO_ALLOW_LOCAL_MODELS=1).

    Returns:
        A run's absolute directory, a folder's absolute path, or the name as given.

    Raises:
        UserInputError: an unknown run id, a run with no model yet, or anything else; the message for a
            path is the same whether or not it exists on this machine (unless ``allow_local``).
    """
    text = str(text or "").strip()
    if not text:
        return ""
    first = text.split(" ")[0]
    if RUN_ID_RE.match(first):
        return str(_own_run(workspace, first))
    if allow_local:
        path = Path(text).expanduser()
        if path.exists():
            return str(path.resolve())
    if text in REGISTRY_NAMES or is_hub_id(text):
        return text
    if "+" in text:  # IMAGE+TEXT encoders of an image + text classifier: each part by the same rule
        image, _, rest = text.partition("+")
        if image.strip() and rest.strip() and "+" not in rest:
            return "+".join(resolve_model_ref(part, None, field=field, allow_local=allow_local)
                            for part in (image, rest))
    if allow_local:
        raise UserInputError(f"{field} '{text}' was not found: there is no such folder, and it is not a model name "
                             f"(e.g. efficientnet_lite0) or a Hugging Face Hub id (owner/name). Check the path.")
    raise UserInputError(f"{field} must be a run id of yours, a model name (e.g. efficientnet_lite0, resnet18) or a "
                         f"Hugging Face Hub id (owner/name); folders on the server are not accepted.")


def _own_run(workspace, run_id: str) -> Path:
    from .runs import find_run

    if workspace is None:
        raise UserInputError(f"Unknown run id '{run_id}': give the run's folder instead.")
    run_dir = find_run(workspace, run_id).resolve()
    if not (run_dir / "model" / MODEL_META).is_file():
        raise UserInputError(f"Run {run_id[:8]} has no trained model yet: wait until it finishes (a stopped run "
                             f"keeps the model it has reached).")
    return run_dir
