"""What a run directory says, made fit to publish: its model, metadata and config, with local paths told
apart from Hub ids (only Hub ids may appear in a card or an export)."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import DEFAULT_MODELS, TASKS
from ..errors import UserInputError
from ..lite import LITE_MODELS
from ..runs import ACTIVE, META_FILE, MODEL_DIR, read_config, read_json, read_status_file

CONFIG_FILE = "training_config.yaml"  # the run's config.yaml as published, without local paths
ALIASES = set(DEFAULT_MODELS.values()) | set(LITE_MODELS)  # offline registry names: never Hub ids
# Settings that name other runs or uploads of this machine (distillation): never published.
LOCAL_SETTINGS = ("teacher", "distill_baseline", "distill_images")


def read_run(run_dir: Path) -> tuple[Path, dict, dict]:
    """``(model_dir, mmdemo.json, config.yaml)`` of a finished or stopped run.

    Raises:
        UserInputError: no trained model, a run still going, or a task that cannot be shared.
    """
    model_dir = run_dir / MODEL_DIR
    if not (model_dir / META_FILE).is_file():
        raise UserInputError(f"'{run_dir.name}' holds no trained model (model/{META_FILE}); train it first, or "
                             "pick a finished run.")
    status = read_status_file(run_dir).get("status")
    if status in ACTIVE:
        raise UserInputError(f"Run '{run_dir.name}' is still {status}; wait for it to finish (or stop it) first.")
    meta = read_json(model_dir / META_FILE)
    if meta.get("task", "classification") not in TASKS:
        raise UserInputError(f"Sharing supports {', '.join(TASKS)} runs (this one: {meta['task']}).")
    return model_dir, meta, read_config(run_dir)


def check_repo_id(repo_id: str) -> str:
    """The stripped repo id.

    Raises:
        UserInputError: not a valid ``owner/name`` or ``name``.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = (repo_id or "").strip()
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        repo_id = ""
    if not repo_id:
        raise UserInputError("Enter a valid repo id: 'owner/name' or 'name' (your user namespace), with letters, "
                             "digits, '-', '_' or '.', e.g. 'my-name/shapes-classifier'.")
    return repo_id


def is_local(name) -> bool:
    name = str(name or "")
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or (bool(name) and Path(name).exists()))


def is_repo_id(name: str) -> bool:
    try:
        return "/" in name and check_repo_id(name) == name
    except UserInputError:
        return False


def public_base_model(name: str) -> str:
    return "" if is_local(name) else str(name or "")


def hub_base_model(cfg: dict, meta: dict) -> str | None:
    """The base model's Hub id when its pretrained weights came from the Hub, else None."""
    name = str(cfg.get("base_model") or meta.get("base_model") or "")
    if not cfg.get("pretrained", True) or name in ALIASES or is_local(name):
        return None
    if name.startswith("hf-hub:"):
        name = name.removeprefix("hf-hub:").split("@")[0]
    elif "/" not in name and meta.get("family") == "timm":
        try:  # a timm name: the Hub repo of its default pretrained tag (timm's local registry)
            from timm.models import get_pretrained_cfg

            name = getattr(get_pretrained_cfg(name), "hf_hub_id", None) or ""
        except Exception:  # noqa: BLE001 - not in the registry: no Hub id
            return None
    return name if is_repo_id(name) else None


def hub_dataset(cfg: dict) -> str | None:
    """The Hub dataset the run trained on: ``data`` itself when a Hub id, else the id that the ingested
    dataset's summary.json records (a dataset loaded from the Hub); None for uploads."""
    data = str(cfg.get("data") or "")
    if is_local(data):
        data = str(read_json(Path(data).expanduser() / "summary.json").get("source") or "")
    return data if data and not is_local(data) and is_repo_id(data) else None


def public_config(cfg: dict) -> dict:
    return {**cfg, "data": hub_dataset(cfg) or "", "output_dir": "",
            "base_model": public_base_model(cfg.get("base_model", "")),
            **{k: "" if is_local(cfg[k]) else cfg[k] for k in LOCAL_SETTINGS if k in cfg}}


def local_paths(run_dir: Path, meta: dict, cfg: dict) -> list[str]:
    """The run's own local paths, absolute (a relative name such as "data" may well appear in a card)."""
    names = [run_dir, meta.get("base_model")] + [cfg.get(k) for k in ("data", "output_dir", "base_model", *LOCAL_SETTINGS)]
    return sorted({str(Path(str(n)).expanduser().resolve()) for n in names if is_local(n)})
