"""The export of a run: exactly the files a push uploads, written offline into a folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from ..errors import UserInputError
from .card import build_model_card, plot_loss_curve
from .rundir import CONFIG_FILE, META_FILE, hub_base_model, local_paths, public_base_model, public_config, read_run

BINARY = {".safetensors", ".bin", ".pt", ".pth", ".png", ".jpg", ".onnx", ".msgpack", ".h5"}


def export_run(run_dir, out_dir, *, repo_id: str | None = None, merged: bool = False) -> list[str]:
    """Writes exactly the files a push uploads, offline: ``model/`` (weights, configs, processor or tokenizer;
    the composed captioner's ``vision/``, ``text/`` and projection; LoRA: ``adapter/``), the training config
    without local paths, eval.json, the loss curve, the confusion matrix (classification) and the card README.md.

    Args:
        run_dir: a finished (or stopped) run directory.
        out_dir: a new or empty folder.
        repo_id: the repo named in the card's usage snippets (default: a placeholder).
        merged: LoRA runs: leave out ``adapter/`` (the merged model is always at the top level); refused for
            the methods whose added modules cannot merge (adapter, vpt).

    Returns:
        The written files, relative to ``out_dir``, sorted.
    """
    run_dir, out = Path(run_dir), Path(out_dir)
    model_dir, meta, cfg = read_run(run_dir)
    if merged and meta.get("added_modules"):
        method = meta["added_modules"]["method"]
        raise UserInputError(f"This run was trained with '{method}', whose added modules cannot be merged into the "
                             f"weights (timm and transformers have no place for them): export it without --merged "
                             f"(merged=False); adapter/ then holds them, and the model card says how to load them.")
    if merged and meta.get("prompt_tuning"):
        raise UserInputError("This run was trained with 'prompt_tuning', whose learned prompt vectors cannot be merged "
                             "into the weights: export it without --merged (merged=False); adapter/ then holds them "
                             "(peft's PeftModel.from_pretrained loads them onto text/).")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"'{out.name}' already exists and is not empty; export into a new or empty folder.")
    out.mkdir(parents=True, exist_ok=True)
    try:
        # peft's adapter/README.md is a blank template (and names the base model by its local path).
        ignore = shutil.ignore_patterns("README.md", *(["adapter"] if merged else []))
        shutil.copytree(model_dir, out, ignore=ignore, dirs_exist_ok=True)
        _scrub_json(out / META_FILE, "base_model", public_base_model(meta.get("base_model", "")))
        _scrub_json(out / "adapter/adapter_config.json", "base_model_name_or_path", hub_base_model(cfg, meta))
        (out / CONFIG_FILE).write_text(
            "# The run's training config without its local paths: to train again, give --data and --output-dir\n"
            "# (and --base-model when empty): python -m mmdemo train --config training_config.yaml --data ...\n"
            + yaml.safe_dump(public_config(cfg), sort_keys=False))
        plot_loss_curve(run_dir / "metrics.jsonl", out / "loss_curve.png")
        for name in ("confusion_matrix.png", "eval.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, out / name)
        build_model_card(run_dir, repo_id=repo_id, merged=merged).save(out / "README.md")
        _check_no_local_paths(out, local_paths(run_dir, meta, cfg))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def _scrub_json(path: Path, key: str, value) -> None:
    if path.is_file():
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}, indent=2))


def _check_no_local_paths(out: Path, paths: list[str]) -> None:
    # Every text file: configs, tokenizers, chat templates, the card (weights and pictures hold no paths).
    paths = [str(p) for p in paths if p and len(str(p)) > 3]
    for f in out.rglob("*"):
        if f.is_file() and f.suffix not in BINARY and any(p in f.read_text(errors="ignore") for p in paths):
            raise RuntimeError(f"{f.relative_to(out)} would publish a local path; this is a bug in mmdemo.hub.")
