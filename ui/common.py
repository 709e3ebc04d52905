"""What every tab and the API share: settings shown, the job manager, workspaces from requests, files.

The engine calls are ``mmdemo.api``; the tabs pass it this server's job manager (``manager()``).
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

import gradio as gr

from mmdemo import api, config, settings
from mmdemo import workspace as ws
from mmdemo.errors import UserInputError
from mmdemo.jobs import has_active_run

ASSETS = Path(__file__).parent.parent / "assets"
SAMPLES = {"classification": ASSETS / "sample_shapes.zip", "captioning": ASSETS / "sample_captions.zip",
           "vqa": ASSETS / "sample_vqa.zip", "image_text_classification": ASSETS / "sample_image_text.zip",
           "retrieval": ASSETS / "sample_retrieval.zip"}
EXAMPLES = sorted(str(p) for p in (ASSETS / "examples").glob("*") if p.suffix.lower() in (".jpg", ".png"))
SHAPE_EXAMPLES = [e for e in EXAMPLES if Path(e).suffix == ".png"]
TASKS = list(config.TASKS)
BASE_MODELS = {task: list(models) for task, models in config.BASE_MODELS.items()}
METHODS = {task: list(methods) for task, methods in config.TASK_METHODS.items()}
# gradio refuses bigger uploads (its own message names the limit); "200kb", "2gb" or a number of bytes
MAX_UPLOAD = settings.max_upload()


_manager_lock = threading.Lock()
log = logging.getLogger("mmdemo.app")


def manager():
    """The server's job manager (the engine's process-wide one); on first use the workspace cleanup
    starts too, and never removes a workspace with a run this manager holds or a live child runs."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = api.job_manager()
            # hourly: idle workspaces past MMDEMO_WORKSPACE_TTL_HOURS go, never with a live run
            ws.start_cleanup(functools.partial(has_active_run, manager=_manager))
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


def on_gpu(fn):
    """On ZeroGPU hardware inference runs under ``spaces.GPU`` (which borrows a GPU per call); a no-op
    where the ``spaces`` package is absent or there is no ZeroGPU."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def preload() -> None:
    """The default classifier loaded and run once, in the background (see ui.lifecycle.serve); not on
    ZeroGPU, where a GPU is lent per call. A failure is logged: the first call then loads it."""
    import importlib.util

    if importlib.util.find_spec("spaces") is not None:
        return
    try:
        api.preload_classifier()
    except Exception:  # noqa: BLE001 - a warm-up must never take the server down
        log.exception("Preloading the default classifier failed")


# mmdemo.api's inference calls as the tabs and endpoints make them
classify, caption, answer = on_gpu(api.classify), on_gpu(api.caption), on_gpu(api.answer)
