"""What every tab and the API share: settings, the job manager, workspaces, and the engine calls."""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

import gradio as gr

from mmdemo import workspace as ws
from mmdemo.errors import UserInputError

ASSETS = Path(__file__).parent.parent / "assets"
SAMPLES = {"classification": ASSETS / "sample_shapes.zip", "captioning": ASSETS / "sample_captions.zip",
           "vqa": ASSETS / "sample_vqa.zip"}
EXAMPLES = sorted(str(p) for p in (ASSETS / "examples").glob("*") if p.suffix.lower() in (".jpg", ".png"))
SHAPE_EXAMPLES = [e for e in EXAMPLES if Path(e).suffix == ".png"]
TASKS = ["classification", "captioning", "vqa"]
BASE_MODELS = {"classification": ["efficientnet_lite0", "resnet18", "google/vit-base-patch16-224-in21k"],
               "captioning": ["efficientnet_lite0+minilm", "Salesforce/blip-image-captioning-base", "microsoft/git-base"],
               "vqa": ["efficientnet_lite0+minilm", "Salesforce/blip-vqa-base", "HuggingFaceTB/SmolVLM-256M-Instruct"]}
METHODS = {"classification": ["full", "head", "lora", "bitfit"], "captioning": ["frozen_vision", "full", "lora"],
           "vqa": ["frozen_vision", "full", "lora"]}
DEFAULT_CHECKPOINT = "ImageNet classifier (efficientnet_lite0, offline)"
# gradio refuses bigger uploads (its own message names the limit); "200kb", "2gb" or a number of bytes
MAX_UPLOAD = os.environ.get("MMDEMO_MAX_UPLOAD", "500mb")


_manager_lock = threading.Lock()
log = logging.getLogger("mmdemo.app")


def manager():
    """One job manager per server process, created on first use (it starts a watcher thread); the lock
    keeps two first requests from creating two queues."""
    global _manager
    with _manager_lock:
        if _manager is None:
            from mmdemo.jobs import JobManager

            _manager = JobManager()
            ws.start_cleanup(_manager)  # hourly: idle workspaces past MMDEMO_WORKSPACE_TTL_HOURS go, never with a live run
        return _manager


_manager = None


def shutdown_jobs() -> None:
    """Stops this server's training children and those it adopted (JobManager.shutdown); without a job
    manager yet, only if a child from an earlier app process still runs (no torch import otherwise)."""
    from mmdemo.procs import live_children

    with _manager_lock:
        current = _manager
    if current is None and not live_children(ws.data_dir()):
        return
    (current or manager()).shutdown()


def user_errors(fn):
    """Engine UserInputErrors become gr.Error, shown to the user (and to API clients) verbatim; any other
    exception becomes a gr.Error that names only its type (no traceback, no server path), and its
    traceback goes to the log for the operator. Every UI handler and API endpoint goes through this."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserInputError as e:
            raise gr.Error(str(e)) from None
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - the caller gets a message, the operator the traceback
            log.exception("Unexpected error in %s", fn.__name__)
            raise gr.Error(f"Something went wrong on the server ({type(e).__name__}); it has been logged for "
                           "the operator. Try again, or with other input.") from None

    return wrapper


def api_workspace(request: gr.Request) -> Path:
    """An API client's workspace: each gradio_client session is a user of its own."""
    return ws.user_workspace("session:" + (request.session_hash or "anonymous"))


def browser_workspace(browser_id: str) -> Path:
    if not browser_id:
        raise gr.Error("This page has no browser id yet; reload the page.")
    return ws.user_workspace("browser:" + browser_id)


def file_path(file) -> str:
    """gr.api passes a FileData dict, UI events a path string."""
    if isinstance(file, dict):
        return file.get("path") or ""
    return str(file or "")


def read_image(file):
    """An uploaded image file -> a loaded PIL image, or a UserInputError naming the file (or its size limit)."""
    from mmdemo.data import open_image

    return open_image(file_path(file))


# ---------------------------------------------------------------------------------------------
# Engine calls shared by the UI and the API


def do_load_dataset(workspace: Path, source: str, task: str) -> dict:
    from mmdemo.data import ingest_dataset

    if not source:
        raise UserInputError("Upload a dataset file (zip, csv or jsonl) or enter a Hub dataset id.")
    return ingest_dataset(source, workspace, task=task or "classification").to_dict()


def do_start_training(workspace: Path, dataset_id: str, **params) -> str:
    from mmdemo.data import find_dataset, load_summary
    from mmdemo.jobs import new_run_config, start_training

    dataset_dir = find_dataset(workspace, dataset_id)
    # The dataset knows its task; an empty base model then means that task's default model.
    cfg = new_run_config(workspace, dataset_dir, task=load_summary(dataset_dir).task, **params)
    return start_training(cfg, manager())


def do_status(workspace: Path, run_id: str) -> dict:
    from mmdemo.jobs import find_run, run_status

    return run_status(find_run(workspace, run_id), manager())


def do_stop(workspace: Path, run_id: str) -> dict:
    from mmdemo.jobs import find_run

    run_dir = find_run(workspace, run_id)
    manager().stop(run_dir)
    return {"status": do_status(workspace, run_id)["status"]}


def resolve_checkpoint(workspace: Path, checkpoint: str) -> str | None:
    """A run id of this user -> its run directory; a model name or Hub id as is; "" -> None (the default).
    Never a path (unless MMDEMO_ALLOW_LOCAL_MODELS=1): see mmdemo.refs."""
    from mmdemo.refs import local_models_allowed, resolve_model_ref

    if isinstance(checkpoint, str) and checkpoint.strip() == DEFAULT_CHECKPOINT:
        return None
    return resolve_model_ref(checkpoint, workspace, field="checkpoint", allow_local=local_models_allowed()) or None


def on_gpu(fn):
    """On ZeroGPU hardware inference runs under ``spaces.GPU`` (which borrows a GPU per call); a no-op
    where the ``spaces`` package is absent or there is no ZeroGPU."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


@on_gpu
def do_classify(workspace: Path, image, checkpoint: str, top_k: int = 5) -> dict:
    from mmdemo.inference import classify

    return classify(image, resolve_checkpoint(workspace, checkpoint), top_k)


@on_gpu
def do_caption(workspace: Path, image, checkpoint: str, max_new_tokens: int = 30, num_beams: int = 1) -> str:
    from mmdemo.inference import caption

    return caption(image, resolve_checkpoint(workspace, checkpoint), max_new_tokens, num_beams)


@on_gpu
def do_answer(workspace: Path, image, question: str, checkpoint: str, max_new_tokens: int = 10,
              num_beams: int = 1) -> str:
    from mmdemo.inference import answer

    return answer(image, question, resolve_checkpoint(workspace, checkpoint), max_new_tokens, num_beams)


def do_push(workspace: Path, run_id: str, repo_id: str, token: str, private: bool) -> dict:
    from mmdemo.hub import push_run_api
    from mmdemo.jobs import find_run

    return push_run_api(find_run(workspace, run_id), (repo_id or "").strip(), token or "", bool(private))
