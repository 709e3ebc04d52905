"""Sharing on the Hugging Face Hub: a run's model card, export and push; the Space deployment.

The network is one small seam, ``HubClient`` (whoami, create_repo, upload_folder): tests pass a
recording fake with the same three methods, everything else runs for real. A token only ever goes
to that seam: it is never written to disk, logged, returned, or put in a card or a message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from .config import DEFAULT_MODELS
from .errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_TAGS = {"classification": "image-classification"}
CONFIG_FILE = "training_config.yaml"
META_FILE = "mmdemo.json"  # models.META_FILE, repeated so that importing this module stays light (no torch)
ALIASES = set(DEFAULT_MODELS.values())  # offline registry names: never Hub ids
TOKENS_URL = "https://huggingface.co/settings/tokens"
NO_TOKEN = (f"No Hugging Face token: paste a token with write access (create one at {TOKENS_URL}), set "
            "HF_TOKEN, or run `hf auth login`.")
UNREACHABLE = ("Hub unreachable: could not connect to the Hugging Face Hub (offline mode or no network). Check "
               "your connection and that HF_HUB_OFFLINE is not set, or `python -m mmdemo export` the run to upload "
               "it later.")
SPACE_FILES, SPACE_DIRS = ("app.py", "requirements.txt", "README.md"), {"mmdemo": "*.py", "assets": "*"}


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
def _secret(token: str):
    """Last guard: no message that leaves this module carries the token."""
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


def _check_repo_id(repo_id: str) -> str:
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


def check_write_access(repo_id: str, token: str, client: HubClient) -> str:
    """Checks the repo id's syntax, then that ``token`` may write to its namespace as whoami reports it
    (token role, or a fine-grained token's ``repo.write``); the repo itself is created or reused later.

    Returns:
        The full repo id ``owner/name`` (a bare name goes to the token's user).
    """
    repo_id = _check_repo_id(repo_id)
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


# --- export and model card ----------------------------------------------------------------------


def export_run(run_dir, out_dir, *, repo_id: str | None = None, merged: bool = False) -> list[str]:
    """Writes exactly the files a push uploads, offline: ``model/`` (LoRA: with ``adapter/``), the training
    config without local paths, eval.json, the loss curve, the confusion matrix and the card README.md.

    Args:
        run_dir: a finished (or stopped) run directory.
        out_dir: a new or empty folder.
        repo_id: the repo named in the card's usage snippets (default: a placeholder).
        merged: LoRA runs: leave out ``adapter/`` (the merged model is always at the top level).

    Returns:
        The written files, relative to ``out_dir``, sorted.
    """
    run_dir, out = Path(run_dir), Path(out_dir)
    model_dir, meta, cfg = _read_run(run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"'{out.name}' already exists and is not empty; export into a new or empty folder.")
    out.mkdir(parents=True, exist_ok=True)
    try:
        # peft's adapter/README.md is a blank template (and names the base model by its local path).
        ignore = shutil.ignore_patterns("README.md", *(["adapter"] if merged else []))
        shutil.copytree(model_dir, out, ignore=ignore, dirs_exist_ok=True)
        _scrub_json(out / META_FILE, "base_model", _public_base_model(meta.get("base_model", "")))
        _scrub_json(out / "adapter/adapter_config.json", "base_model_name_or_path", _hub_base_model(cfg, meta))
        (out / CONFIG_FILE).write_text(
            "# The run's training config without its local paths: to train again, give --data and --output-dir\n"
            "# (and --base-model when empty): python -m mmdemo train --config training_config.yaml --data ...\n"
            + yaml.safe_dump(_public_config(cfg), sort_keys=False))
        plot_loss_curve(run_dir / "metrics.jsonl", out / "loss_curve.png")
        for name in ("confusion_matrix.png", "eval.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, out / name)
        build_model_card(run_dir, repo_id=repo_id, merged=merged).save(out / "README.md")
        _check_no_local_paths(out, [str(run_dir.resolve())] + [cfg[k] for k in ("data", "output_dir", "base_model")
                                                               if _is_local(cfg.get(k))])
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def build_model_card(run_dir, repo_id: str | None = None, merged: bool = False):
    """The model card of a run: Hub metadata (library_name, pipeline_tag, base_model and datasets only when
    Hub ids, license, tags, model-index from eval.json) and a text with the metrics table, usage, the
    training config, the loss curve and the confusion matrix.

    Args:
        run_dir: the run directory.
        repo_id: the repo named in the usage snippets (default: a placeholder).
        merged: LoRA runs: the card describes a push without ``adapter/``.

    Returns:
        A ``huggingface_hub.ModelCard``.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    run_dir = Path(run_dir)
    model_dir, meta, cfg = _read_run(run_dir)
    report = _read_json(run_dir / "eval.json")
    family, task = meta.get("family", "timm"), meta.get("task", "classification")
    base, dataset = _hub_base_model(cfg, meta), _hub_dataset(cfg)
    name = (repo_id or "").split("/")[-1] or f"mmdemo-{run_dir.name}"
    results = []
    if "accuracy" in report:
        where = {"task_type": PIPELINE_TAGS[task], "task_name": "Image Classification", "dataset_split": "validation",
                 "dataset_type": dataset or "imagefolder", "dataset_name": dataset or "local image folder"}
        results.append(EvalResult(metric_type="accuracy", metric_value=report["accuracy"], **where))
        if f1 := [c["f1"] for c in report.get("per_class", {}).values()]:
            results.append(EvalResult(metric_type="f1", metric_name="macro F1",
                                      metric_value=round(sum(f1) / len(f1), 4), **where))
    adapter = (model_dir / "adapter").is_dir() and not merged
    tags = ["image-classification", "mmdemo", family, cfg.get("method", "full")] + (["peft", "lora"] if adapter else [])
    data = ModelCardData(library_name=family, pipeline_tag=PIPELINE_TAGS[task], base_model=base,
                         datasets=[dataset] if dataset else None, license=_license(model_dir, family), tags=tags,
                         metrics=["accuracy"] if results else None, model_name=name, eval_results=results or None)
    lines = [f"# {name}", "", _card_intro(meta, cfg, base), "", *_card_metrics(report)]
    if (run_dir / "confusion_matrix.png").is_file():
        lines += ["![confusion matrix](confusion_matrix.png)", ""]
    lines += _card_usage(repo_id or f"your-name/{name}", family, adapter, model_dir, len(meta.get("id2label", {})))
    lines += ["## Training", ""]
    if (run_dir / "metrics.jsonl").is_file():
        lines += ["![loss curve](loss_curve.png)", ""]
    lines += [f"The configuration (`{CONFIG_FILE}`, local paths removed):", "", "```yaml",
              yaml.safe_dump(_public_config(cfg), sort_keys=False).strip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines))


def _card_intro(meta: dict, cfg: dict, base: str | None) -> str:
    labels = [meta["id2label"][str(i)] for i in range(len(meta.get("id2label", {})))]
    public = _public_base_model(cfg.get("base_model") or meta.get("base_model", ""))
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{public or 'a local model'}`"
    return (f"An image classifier fine-tuned from {origin} with mmdemo (method `{cfg.get('method', 'full')}`) on "
            f"{len(labels)} classes: {', '.join(f'`{label}`' for label in labels)}.")


def _card_metrics(report: dict) -> list[str]:
    if "accuracy" not in report:
        return ["## Evaluation", "", "This run has no final evaluation (eval.json).", ""]
    summary = (f"On {report.get('num_val', '?')} validation images: accuracy **{report['accuracy']:.4f}**, "
               f"validation loss {report.get('val_loss', float('nan')):.4f}.")
    lines = ["## Evaluation", "", summary, "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    return lines + [f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
                    for c, m in report.get("per_class", {}).items()] + [""]


def _card_usage(repo_id: str, family: str, adapter: bool, model_dir: Path, num_labels: int) -> list[str]:
    lines = ["## Use it", "", "```python", "from transformers import pipeline", "",
             f'pipe = pipeline("image-classification", model="{repo_id}")', 'print(pipe("image.jpg"))', "```", ""]
    if family == "timm":
        lines += ["```python", "import timm", "", f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True)',
                  "```", ""]
    if adapter:
        arch = _read_json(model_dir / "config.json").get("architecture", "BASE_MODEL")
        base = (f'timm.create_model("{arch}", num_classes={num_labels})' if family == "timm"
                else "the base model with the same classes")
        note = ("`adapter/` holds the LoRA adapter (peft); the top-level weights are that adapter merged into the "
                "base model, so they load without peft.")
        lines += [note, "", "```python", "from peft import PeftModel", "",
                  f"base = {base}", f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="adapter")',
                  "```", ""]
    return lines


def plot_loss_curve(metrics_path, out_path) -> bool:
    """Draws the training loss (logged steps) and the validation loss (epochs) of a metrics.jsonl.

    Returns:
        False when there was nothing to draw (then no picture is written).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, val, path = {}, {}, Path(metrics_path)
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if r.get("type") == "train" and "loss" in r:
            train[r["step"]] = r["loss"]  # a resumed run repeats steps: the last value wins
        elif r.get("type") == "eval" and "val_loss" in r:
            val[r["step"]] = r["val_loss"]
    if not train and not val:
        return False
    fig = Figure(figsize=(6, 3.5))  # no pyplot: no global backend state, safe in the server's threads
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for series, label, style in ((train, "training loss", ".-"), (val, "validation loss", "o-")):
        if series:
            ax.plot(sorted(series), [series[s] for s in sorted(series)], style, label=label, markersize=4)
    ax.set(xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    return True


def _read_run(run_dir: Path) -> tuple[Path, dict, dict]:
    model_dir = run_dir / "model"
    if not (model_dir / META_FILE).is_file():
        raise UserInputError(f"'{run_dir.name}' holds no trained model (model/{META_FILE}); train it first, or "
                             "pick a finished run.")
    status = _read_json(run_dir / "status.json").get("status")
    if status in ("queued", "running"):
        raise UserInputError(f"Run '{run_dir.name}' is still {status}; wait for it to finish (or stop it) first.")
    meta = _read_json(model_dir / META_FILE)
    if meta.get("task", "classification") not in PIPELINE_TAGS:
        raise UserInputError(f"Sharing supports {', '.join(PIPELINE_TAGS)} runs for now (this one: {meta['task']}).")
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    return model_dir, meta, cfg if isinstance(cfg, dict) else {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _is_local(name) -> bool:
    name = str(name or "")
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or (bool(name) and Path(name).exists()))


def _is_repo_id(name: str) -> bool:
    try:
        return "/" in name and _check_repo_id(name) == name
    except UserInputError:
        return False


def _public_base_model(name: str) -> str:
    return "" if _is_local(name) else str(name or "")


def _hub_base_model(cfg: dict, meta: dict) -> str | None:
    """The base model's Hub id when its pretrained weights came from the Hub, else None."""
    name = str(cfg.get("base_model") or meta.get("base_model") or "")
    if not cfg.get("pretrained", True) or name in ALIASES or _is_local(name):
        return None
    if name.startswith("hf-hub:"):
        name = name.removeprefix("hf-hub:").split("@")[0]
    elif "/" not in name and meta.get("family") == "timm":
        try:  # a timm name: the Hub repo of its default pretrained tag (timm's local registry)
            from timm.models import get_pretrained_cfg

            name = getattr(get_pretrained_cfg(name), "hf_hub_id", None) or ""
        except Exception:  # noqa: BLE001 - not in the registry: no Hub id
            return None
    return name if _is_repo_id(name) else None


def _hub_dataset(cfg: dict) -> str | None:
    data = str(cfg.get("data") or "")
    return data if not _is_local(data) and _is_repo_id(data) else None


def _public_config(cfg: dict) -> dict:
    return {**cfg, "data": _hub_dataset(cfg) or "", "output_dir": "",
            "base_model": _public_base_model(cfg.get("base_model", ""))}


def _license(model_dir: Path, family: str) -> str:
    # timm configs carry their weights' licence; otherwise the base model's own card decides: "other".
    timm_cfg = _read_json(model_dir / "config.json").get("pretrained_cfg", {}) if family == "timm" else {}
    return timm_cfg.get("license") or "other"


def _scrub_json(path: Path, key: str, value) -> None:
    if path.is_file():
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}, indent=2))


def _check_no_local_paths(out: Path, paths: list[str]) -> None:
    paths = [str(p) for p in paths if p and len(str(p)) > 3]
    for f in out.rglob("*"):
        if f.suffix in (".json", ".yaml", ".md") and any(p in f.read_text(errors="ignore") for p in paths):
            raise RuntimeError(f"{f.name} would publish a local path; this is a bug in mmdemo.hub.")


# --- push and Space -----------------------------------------------------------------------------


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
    _read_run(Path(run_dir))  # local problems first, before any network call
    _check_repo_id(repo_id)
    token = resolve_token(token)
    with _secret(token), tempfile.TemporaryDirectory(prefix="mmdemo-push-") as tmp:
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


def space_files(root=ROOT) -> list[str]:
    """What a Space needs from a checkout: app.py, the engine's sources, assets/, requirements.txt and
    README.md (whose front matter holds the Space's settings); never tests, data, venvs or git."""
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
    _check_repo_id(repo_id)
    token = resolve_token(token)
    with _secret(token), tempfile.TemporaryDirectory(prefix="mmdemo-space-") as tmp:
        full = check_write_access(repo_id, token, client)
        for name in files:
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            if name != "README.md":
                shutil.copy2(root / name, Path(tmp) / name)
        (Path(tmp) / "README.md").write_text(_space_readme(root))
        url = client.create_repo(full, token, repo_type="space", private=private, space_sdk="gradio")
        client.upload_folder(full, tmp, token, repo_type="space", commit_message="Deploy mmdemo")
    return {"url": url, "repo_id": full, "files": files}


# --- CLI (wired into mmdemo/__main__.py) --------------------------------------------------------


def add_cli_commands(subparsers) -> None:
    """Adds ``push``, ``export`` and ``space deploy`` to the CLI's sub-command parsers."""
    token_help = "a write token (default: HF_TOKEN, then the cached `hf auth login`)"
    p = subparsers.add_parser("push", help="upload a run's model, card and config to the Hugging Face Hub")
    p.add_argument("run_dir")
    p.add_argument("repo_id", help="owner/name, or name for your user")
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True, help="(the default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="make a new repo public")
    p.add_argument("--token", default="", help=token_help)
    p.add_argument("--merged", action="store_true", help="LoRA runs: the merged model only, no adapter/")
    e = subparsers.add_parser("export", help="write the files `push` would upload into a folder, offline")
    e.add_argument("run_dir")
    e.add_argument("out_dir")
    e.add_argument("--merged", action="store_true", help="LoRA runs: the merged model only, no adapter/")
    s = subparsers.add_parser("space", help="deploy this app as a Hugging Face Space")
    d = s.add_subparsers(dest="space_command", required=True).add_parser(
        "deploy", help="create or update a Gradio Space running this app (settings: Space.yaml)")
    d.add_argument("repo_id", help="owner/name, or name for your user")
    d.add_argument("--token", default="", help=token_help)
    d.add_argument("--private", action="store_true", default=None, help="a new Space is private")


def run_cli(args, api=None) -> int | None:
    """Runs ``push`` / ``export`` / ``space deploy``: one JSON line on stdout and exit code 0, or the error on
    stderr and 2. Returns None when ``args.command`` is none of these."""
    command = getattr(args, "command", None)
    if command not in ("push", "export", "space"):
        return None
    try:
        if command == "push":
            out = push_run(args.run_dir, args.repo_id, args.token, private=args.private, merged=args.merged, api=api)
        elif command == "export":
            out = {"out_dir": args.out_dir, "files": export_run(args.run_dir, args.out_dir, merged=args.merged)}
        else:
            out = deploy_space(args.repo_id, args.token, private=args.private, api=api)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0
