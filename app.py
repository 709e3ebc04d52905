"""mmdemo web app: Gradio Blocks over the mmdemo engine (no torch in this module).

Run ``python app.py``; it honours GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
"""

from __future__ import annotations

import functools
import html
import os
import threading
import uuid
from pathlib import Path

import gradio as gr

from mmdemo import workspace as ws
from mmdemo.errors import UserInputError

ASSETS = Path(__file__).parent / "assets"
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


def user_errors(fn):
    """Engine UserInputErrors become gr.Error, shown to the user (and to API clients) verbatim."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserInputError as e:
            raise gr.Error(str(e)) from None

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
    """A run id of this user -> its run directory; a Hub id as is; "" -> None (the default).
    Never a path: user text must not reach the filesystem."""
    from mmdemo.jobs import ID_RE, find_run

    checkpoint = (checkpoint or "").strip()
    if checkpoint == DEFAULT_CHECKPOINT or not checkpoint:
        return None
    if ID_RE.match(checkpoint.split(" ")[0]):
        return str(find_run(workspace, checkpoint.split(" ")[0]))
    if checkpoint.startswith((".", "/", "~")) or "\\" in checkpoint or ".." in checkpoint:
        raise UserInputError("A checkpoint is a run id of yours, a Hub model id, or empty for the default.")
    return checkpoint


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

    return classify(image, resolve_checkpoint(workspace, checkpoint), int(top_k or 5))


@on_gpu
def do_caption(workspace: Path, image, checkpoint: str, max_new_tokens: int = 30, num_beams: int = 1) -> str:
    from mmdemo.inference import caption

    return caption(image, resolve_checkpoint(workspace, checkpoint), int(max_new_tokens or 30), int(num_beams or 1))


@on_gpu
def do_answer(workspace: Path, image, question: str, checkpoint: str, max_new_tokens: int = 10,
              num_beams: int = 1) -> str:
    from mmdemo.inference import answer

    return answer(image, question, resolve_checkpoint(workspace, checkpoint), int(max_new_tokens or 10),
                  int(num_beams or 1))


# ---------------------------------------------------------------------------------------------
# API endpoints (gradio_client), one workspace per client session


def api_load_dataset(file: dict, task: str = "classification", request: gr.Request = None) -> dict:
    """Ingests an uploaded dataset; returns its summary."""
    summary = do_load_dataset(api_workspace(request), file_path(file), task)
    keys = ("dataset_id", "task", "num_train", "num_val", "num_test", "classes", "warnings", "counts")
    return {k: summary[k] for k in keys}


def api_start_training(dataset_id: str, base_model: str = "", method: str = "", epochs: int = 0,
                       learning_rate: float = 0.0, batch_size: int = 0, image_size: int = 0,
                       max_steps: int = 0, request: gr.Request = None) -> dict:
    """Starts fine-tuning in a child process; "" / 0 take the defaults."""
    run_id = do_start_training(api_workspace(request), dataset_id, base_model=base_model, method=method or None,
                               epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                               image_size=image_size, max_steps=max_steps)
    return {"run_id": run_id}


def api_training_status(run_id: str, request: gr.Request = None) -> dict:
    """Status, progress, loss curve and validation metrics of a run."""
    return do_status(api_workspace(request), run_id)


def api_stop_training(run_id: str, request: gr.Request = None) -> dict:
    """Asks a run to stop at its next step boundary (it keeps a usable checkpoint)."""
    return do_stop(api_workspace(request), run_id)


def api_resume_training(run_id: str, request: gr.Request = None) -> dict:
    """Continues a stopped or failed run from its last checkpoint."""
    from mmdemo.jobs import find_run, resume_training

    return resume_training(find_run(api_workspace(request), run_id), manager())


def read_image(file):
    """An uploaded image file -> a loaded PIL image, or a UserInputError naming the file."""
    from PIL import Image

    path = file_path(file)
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError):
        raise UserInputError(f"Could not read the image '{Path(path).name}': send a JPEG, PNG or WebP file.") from None


def api_classify(image: dict, checkpoint: str = "", top_k: int = 5, request: gr.Request = None) -> dict:
    """Top-k labels with probabilities for an image."""
    return do_classify(api_workspace(request), read_image(image), checkpoint, top_k)


def api_caption(image: dict, checkpoint: str = "", max_new_tokens: int = 30, num_beams: int = 1,
                request: gr.Request = None) -> str:
    """A caption for an image from a captioning run (or a Hub id)."""
    return do_caption(api_workspace(request), read_image(image), checkpoint, max_new_tokens, num_beams)


def api_answer(image: dict, question: str, checkpoint: str = "", max_new_tokens: int = 10, num_beams: int = 1,
               request: gr.Request = None) -> str:
    """The answer to a question about an image, from a VQA run (or a Hub id)."""
    return do_answer(api_workspace(request), read_image(image), question, checkpoint, max_new_tokens, num_beams)


def do_push(workspace: Path, run_id: str, repo_id: str, token: str, private: bool) -> dict:
    from mmdemo.hub import push_run_api
    from mmdemo.jobs import find_run

    return push_run_api(find_run(workspace, run_id), (repo_id or "").strip(), token or "", bool(private))


def api_push_to_hub(run_id: str, repo_id: str, token: str = "", private: bool = True, request: gr.Request = None) -> dict:
    """Pushes a finished run's model and model card to the Hub; returns {url, files}."""
    return do_push(api_workspace(request), run_id, repo_id, token, private)


def api_list_runs(request: gr.Request = None) -> list:
    """This session's runs with task, base model, method, status and metrics."""
    from mmdemo.jobs import list_runs

    return list_runs(api_workspace(request), manager())


def register_api() -> None:
    for fn, name, limit in [(api_load_dataset, "load_dataset", 2), (api_start_training, "start_training", 4),
                            (api_training_status, "training_status", None), (api_stop_training, "stop_training", None),
                            (api_resume_training, "resume_training", 4), (api_classify, "classify", 4),
                            (api_caption, "caption", 4), (api_answer, "answer", 4), (api_push_to_hub, "push_to_hub", 2),
                            (api_list_runs, "list_runs", None)]:
        gr.api(user_errors(fn), api_name=name, concurrency_limit=limit)


# ---------------------------------------------------------------------------------------------
# UI


def on_load_browser(browser_id: str):
    """Gives a new browser its random id (kept in localStorage across reloads), then enables the
    buttons: a click before the id exists would have no workspace."""
    return browser_id or uuid.uuid4().hex


def summary_markdown(summary: dict) -> str:
    what = f"**{len(summary['classes'])} classes**" if summary["task"] == "classification" else f"**{summary['task']}**"
    lines = [f"{what} · train {summary['num_train']} · validation {summary['num_val']} · test {summary['num_test']}"]
    lines += [f"- ⚠️ {w}" for w in summary["warnings"]]
    return "\n".join(lines)


def counts_frame(summary: dict):
    import pandas as pd

    rows = [{"class": c, "split": split, "images": int(n)} for split, per in summary["counts"].items()
            for c, n in per.items()]
    return pd.DataFrame(rows, columns=["class", "split", "images"]).astype({"images": int})


@user_errors
def on_load_dataset(browser_id, file, hub_id, task):
    from mmdemo.data import find_dataset, preview_images

    wsp = browser_workspace(browser_id)
    summary = do_load_dataset(wsp, file_path(file) or (hub_id or "").strip(), task)
    previews = preview_images(find_dataset(wsp, summary["dataset_id"]))
    gallery = [(img, name) for name, imgs in previews.items() for img in imgs]
    return (summary_markdown(summary), counts_frame(summary), gallery,
            gr.update(choices=dataset_choices(wsp), value=summary["dataset_id"]))


def on_sample(browser_id, task):
    return on_load_dataset(browser_id, str(SAMPLES[task]), "", task)


def dataset_choices(wsp: Path) -> list[tuple[str, str]]:
    from mmdemo.data import load_summary

    rows = []
    for path in sorted((wsp / "datasets").glob("*/summary.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        s = load_summary(path.parent)
        what = f"{len(s.classes)} classes" if s.task == "classification" else s.task
        rows.append((f"{s.dataset_id[:8]} · {what} · {s.num_train + s.num_val + s.num_test} images", s.dataset_id))
    return rows


def run_choices(wsp: Path, task: str | None = None, finished: bool = False) -> list[tuple[str, str]]:
    from mmdemo.jobs import list_runs

    return [(f"{r['run_id'][:8]} · {r['base_model']} · {r['method']} · {r['status']}", r["run_id"])
            for r in list_runs(wsp, manager())
            if (task is None or r["task"] == task) and (not finished or r["has_model"])]


@user_errors
def on_pick_dataset(browser_id, dataset_id):
    """The dataset's task decides the base models and methods on offer; without a GPU the user also
    learns how long the default recipe takes on the CPU."""
    from mmdemo.config import TrainConfig
    from mmdemo.data import find_dataset, load_summary
    from mmdemo.jobs import estimate_cpu_seconds, has_gpu

    if not browser_id or not dataset_id:
        return gr.skip(), gr.skip(), gr.skip()
    summary = load_summary(find_dataset(browser_workspace(browser_id), dataset_id))
    task = summary.task
    notice = ""
    if not has_gpu():
        minutes = estimate_cpu_seconds(summary, TrainConfig(data=summary.path, output_dir="-", task=task)) / 60
        notice = (f"⚠️ No GPU here: training runs on the CPU. The default recipe on this dataset takes about "
                  f"{max(1, round(minutes))} min on 2 cores; larger models, images or datasets take much longer. "
                  "For long jobs use GPU hardware (on a Hugging Face Space: Settings → Hardware, a dedicated GPU; "
                  "ZeroGPU only serves inference).")
    return (gr.update(choices=BASE_MODELS[task], value=BASE_MODELS[task][0]),
            gr.update(choices=METHODS[task], value=METHODS[task][0]), notice)


@user_errors
def on_start(browser_id, dataset_id, base_model, method, epochs, lr, batch, image_size, weight_decay, warmup,
             augment, patience, seed):
    wsp = browser_workspace(browser_id)
    if not dataset_id:
        raise UserInputError("Pick a dataset first: load one on the Dataset tab.")
    run_id = do_start_training(wsp, dataset_id, base_model=base_model, method=method, epochs=int(epochs or 0),
                               learning_rate=float(lr or 0), batch_size=int(batch or 0), image_size=int(image_size or 0),
                               weight_decay=float(weight_decay), warmup_ratio=float(warmup), augment=bool(augment),
                               early_stopping_patience=int(patience or 0), seed=int(seed or 0))
    return gr.update(choices=run_choices(wsp), value=run_id)


@user_errors
def on_stop(browser_id, run_id):
    if run_id:
        do_stop(browser_workspace(browser_id), run_id)


@user_errors
def on_resume(browser_id, run_id):
    from mmdemo.jobs import find_run, resume_training

    if run_id:
        resume_training(find_run(browser_workspace(browser_id), run_id), manager())


def progress_html(status: dict) -> str:
    step, total = status["step"], status["total_steps"] or 0
    eta = f" · ETA {status['eta_s']:.0f} s" if status.get("eta_s") is not None and status["status"] == "running" else ""
    msg = f"<div>{html.escape(status['message'])}</div>" if status.get("message") else ""
    return (f"<div><b>{status['status']}</b> · step {step} / {total} · epoch {status['epoch']}{eta}</div>"
            f"<progress id='train-progress' value='{step}' max='{max(total, 1)}' style='width:100%'></progress>{msg}")


def on_tick(browser_id, run_id, reported):
    """Timer tick: the selected run's status, plots and (once, when finished) its report."""
    import pandas as pd

    skip4 = (gr.skip(),) * 4
    if not browser_id or not run_id:
        return "<div>No run selected.</div>", gr.skip(), *skip4, reported
    wsp = browser_workspace(browser_id)
    try:
        status = do_status(wsp, run_id)
    except UserInputError as e:
        return f"<div>{html.escape(str(e))}</div>", gr.skip(), *skip4, reported
    # Fixed numeric dtypes: the plot fixes its axis types from the first data it receives.
    loss = pd.DataFrame(status["train_loss"], columns=["step", "loss"]).astype(float)
    metric = status.get("main_metric", "accuracy")
    val = pd.DataFrame([{"epoch": e, "value": v, "metric": m} for e, vl, main in status["val"]
                        for m, v in (("val_loss", vl), (metric, main))], columns=["epoch", "value", "metric"])
    val = val.astype({"epoch": float, "value": float}) if len(val) else gr.skip()
    finished = status["status"] in ("completed", "stopped")
    # The report (which reads images) is built once per finished run, not on every tick.
    key = f"{run_id}:{status['step']}:{status['status']}"
    if finished and reported != key:
        return (progress_html(status), loss, val, *run_report(wsp, run_id), key)
    return progress_html(status), loss, val, *skip4[:3], reported


def run_report(wsp: Path, run_id: str):
    import json

    import pandas as pd

    from mmdemo.jobs import find_run, report_examples

    run_dir = find_run(wsp, run_id)
    path = run_dir / "eval.json"
    if not path.exists():
        return gr.skip(), gr.skip(), gr.skip()
    result = json.loads(path.read_text())
    if result.get("task", "classification") == "classification":
        table = pd.DataFrame([{"class": "all", "precision": None, "recall": None, "f1": None,
                               "support": result["num_val"], "accuracy": result["accuracy"]}]
                             + [{"class": c, **m, "accuracy": None} for c, m in result["per_class"].items()])
    else:
        keys = [k for k in ("val_loss", "vqa_accuracy", "exact_match", "bleu4", "rouge_l", "cider") if k in result]
        table = pd.DataFrame([{"metric": k, "value": result[k]} for k in keys])
    cm = run_dir / "confusion_matrix.png"
    return table, (str(cm) if cm.exists() else None), report_examples(run_dir)


@user_errors
def on_refresh_choices(browser_id):
    if not browser_id:
        return (gr.skip(),) * 5
    wsp = browser_workspace(browser_id)
    done = {task: run_choices(wsp, task, finished=True) for task in TASKS}
    return (gr.update(choices=dataset_choices(wsp)), gr.update(choices=run_choices(wsp)),
            gr.update(choices=[(DEFAULT_CHECKPOINT, "")] + done["classification"]),
            gr.update(choices=done["captioning"]), gr.update(choices=done["vqa"]))


@user_errors
def on_classify(browser_id, image, checkpoint):
    if image is None:
        raise UserInputError("Drop an image first (or click an example).")
    return do_classify(browser_workspace(browser_id), image, checkpoint or "")


@user_errors
def on_caption(browser_id, image, checkpoint, max_new_tokens, beams):
    if image is None:
        raise UserInputError("Drop an image first (or click an example).")
    return do_caption(browser_workspace(browser_id), image, checkpoint or "", max_new_tokens, beams)


@user_errors
def on_answer(browser_id, image, question, checkpoint, max_new_tokens, beams):
    if image is None:
        raise UserInputError("Drop an image first (or click an example).")
    return do_answer(browser_workspace(browser_id), image, question, checkpoint or "", max_new_tokens, beams)


def build_dataset_tab():
    with gr.Tab("Dataset"):
        gr.Markdown("**Classification**: a zip of class folders (`cats/1.jpg`, `dogs/2.jpg`), optional `train/`, "
                    "`val/`, `test/` split folders, or a `metadata.csv` / `metadata.jsonl` with `file_name` and "
                    "`label`. **Captioning**: images + `metadata.jsonl` / `.csv` with `file_name` and `text` (or "
                    "`caption`). **VQA**: `file_name`, `question`, `answer` (or `answers`, a list).")
        with gr.Row():
            file = gr.File(label=f"Dataset (zip, csv or jsonl; at most {MAX_UPLOAD})",
                           file_types=[".zip", ".csv", ".jsonl"], type="filepath")
            with gr.Column():
                task = gr.Radio(TASKS, value="classification", label="Task")
                hub_id = gr.Textbox(label="…or a Hugging Face Hub dataset id", placeholder="owner/name")
                load = gr.Button("Load dataset", variant="primary", interactive=False)
                sample = gr.Button("Use the sample dataset (easy-VQA shapes)", interactive=False)
        summary = gr.Markdown(elem_id="dataset-summary")
        counts = gr.BarPlot(x="class", y="images", color="split", title="Images per class / split", height=260)
        gallery = gr.Gallery(label="Examples", columns=8, height=300)
    return file, task, hub_id, load, sample, summary, counts, gallery


def build_train_tab(browser_id):
    with gr.Tab("Train"):
        with gr.Row():
            dataset = gr.Dropdown(label="Dataset", choices=[], elem_id="dataset-choice")
            base_model = gr.Dropdown(label="Base model", choices=BASE_MODELS["classification"], value="efficientnet_lite0",
                                     allow_custom_value=True,
                                     info="the first choice works offline; other timm / transformers ids need the Hub; "
                                          "a run id continues that run")
            method = gr.Radio(METHODS["classification"], value="full", label="Method")
        with gr.Row():
            epochs = gr.Number(0, label="Epochs (0 = default)", precision=0)
            lr = gr.Number(0, label="Learning rate (0 = default)")
            batch = gr.Number(0, label="Batch size (0 = default)", precision=0)
            image_size = gr.Number(0, label="Image size (0 = the model's)", precision=0)
        with gr.Accordion("More settings", open=False):
            with gr.Row():
                weight_decay = gr.Number(0.01, label="Weight decay")
                warmup = gr.Number(0.1, label="Warm-up ratio")
                augment = gr.Checkbox(True, label="Augmentation (classification)")
                patience = gr.Number(0, label="Early-stopping patience (0 = off)", precision=0)
                seed = gr.Number(0, label="Seed", precision=0)
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="start-training", interactive=False)
            stop = gr.Button("Stop", variant="stop")
            resume = gr.Button("Resume")
            run = gr.Dropdown(label="Run", choices=[], elem_id="run-choice", scale=3)
        gpu_notice = gr.Markdown(elem_id="gpu-notice")
        progress = gr.HTML("<div>No run selected.</div>", elem_id="train-status")
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=260, elem_id="loss-plot",
                                    x_title="step")
            val_plot = gr.LinePlot(x="epoch", y="value", color="metric", title="Validation (per epoch)", height=260,
                                   elem_id="val-plot")
        with gr.Row():
            report = gr.Dataframe(label="Validation metrics", interactive=False,
                                  headers=["class", "precision", "recall", "f1", "support", "accuracy"])
            confusion = gr.Image(label="Confusion matrix", type="filepath", height=320)
        mistakes = gr.Gallery(label="Validation examples: misclassified, or reference → predicted text", columns=8,
                              height=260)
        build_push_section(browser_id, run)
    settings = [dataset, base_model, method, epochs, lr, batch, image_size, weight_decay, warmup, augment, patience, seed]
    return settings, start, stop, resume, run, progress, loss_plot, val_plot, report, confusion, mistakes, gpu_notice


@user_errors
def on_push(browser_id, run_id, repo_id, token, private):
    if not run_id:
        raise UserInputError("Pick a finished run first (the Run list above).")
    result = do_push(browser_workspace(browser_id), run_id, repo_id, token, private)
    files = ", ".join(result["files"][:12]) + (" …" if len(result["files"]) > 12 else "")
    return f"Pushed to [{result['url']}]({result['url']}): {files}"


def build_push_section(browser_id, run):
    with gr.Accordion("Push to the Hugging Face Hub", open=False):
        gr.Markdown("Uploads the selected run's model (safetensors, config, preprocessing, label maps, LoRA adapter) "
                    "and a model card with its metrics. The token is used for this push only and never stored.")
        with gr.Row():
            repo_id = gr.Textbox(label="Repository id", placeholder="your-name/my-classifier")
            token = gr.Textbox(label="Write token (empty: HF_TOKEN or your cached login)", type="password")
            private = gr.Checkbox(True, label="Private")
        push = gr.Button("Push")
        result = gr.Markdown()
    push.click(on_push, [browser_id, run, repo_id, token, private], result, api_visibility="private")
    return push, result


def build_classify_tab():
    with gr.Tab("Classify"):
        checkpoint = gr.Dropdown(label="Checkpoint", choices=[(DEFAULT_CHECKPOINT, "")], value="", elem_id="checkpoint-choice")
        with gr.Row():
            image = gr.Image(type="pil", label="Image", height=320)
            labels = gr.Label(num_top_classes=5, label="Top 5", elem_id="classify-labels")
        button = gr.Button("Classify", variant="primary", elem_id="classify-button")
        gr.Examples(EXAMPLES, inputs=image)
    return checkpoint, image, labels, button


def build_text_tab(name: str, task: str, with_question: bool):
    with gr.Tab(name):
        checkpoint = gr.Dropdown(label=f"Checkpoint (a {task} run of yours, or a Hub model id)", choices=[],
                                 allow_custom_value=True, elem_id=f"{task}-checkpoint")
        with gr.Row():
            image = gr.Image(type="pil", label="Image", height=300)
            with gr.Column():
                question = gr.Textbox(label="Question", placeholder="what color is the shape?",
                                      elem_id="vqa-question") if with_question else None
                output = gr.Textbox(label="Answer" if with_question else "Caption", elem_id=f"{task}-output")
                with gr.Row():
                    max_new = gr.Slider(1, 60, value=10 if with_question else 30, step=1, label="Max new tokens")
                    beams = gr.Slider(1, 5, value=1, step=1, label="Beams (1 = greedy)")
                button = gr.Button("Ask" if with_question else "Caption", variant="primary", elem_id=f"{task}-button")
        gr.Examples(SHAPE_EXAMPLES + [e for e in EXAMPLES if e not in SHAPE_EXAMPLES], inputs=image)
    return checkpoint, image, question, output, max_new, beams, button


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="mmdemo: fine-tune vision models") as demo:
        gr.Markdown("# mmdemo\nUpload labelled images, fine-tune a model, and try it, all in the browser.")
        browser_id = gr.BrowserState("", storage_key="mmdemo-browser-id")
        file, task, hub_id, load, sample, summary, counts, gallery = build_dataset_tab()
        (settings, start, stop, resume, run, progress, loss_plot, val_plot, report, confusion, mistakes,
         gpu_notice) = build_train_tab(browser_id)
        checkpoint, image, labels, classify_button = build_classify_tab()
        cap_ckpt, cap_image, _, cap_out, cap_max, cap_beams, cap_button = build_text_tab("Caption", "captioning", False)
        vqa_ckpt, vqa_image, question, vqa_out, vqa_max, vqa_beams, vqa_button = build_text_tab("Ask (VQA)", "vqa", True)
        dataset = settings[0]
        private = {"api_visibility": "private"}
        choices = [dataset, run, checkpoint, cap_ckpt, vqa_ckpt]

        demo.load(on_load_browser, browser_id, browser_id, **private).then(
            lambda: [gr.update(interactive=True)] * 3, None, [load, sample, start], **private).then(
            on_refresh_choices, browser_id, choices, **private)
        load.click(on_load_dataset, [browser_id, file, hub_id, task], [summary, counts, gallery, dataset], **private)
        sample.click(on_sample, [browser_id, task], [summary, counts, gallery, dataset], **private)
        dataset.change(on_pick_dataset, [browser_id, dataset], [settings[1], settings[2], gpu_notice], **private)
        start.click(on_start, [browser_id, *settings], run, **private)
        stop.click(on_stop, [browser_id, run], None, **private)
        resume.click(on_resume, [browser_id, run], None, **private)
        reported = gr.State("")
        gr.Timer(1.0).tick(on_tick, [browser_id, run, reported],
                           [progress, loss_plot, val_plot, report, confusion, mistakes, reported],
                           concurrency_limit=None, show_progress="hidden", **private)
        gr.Timer(3.0).tick(on_refresh_choices, browser_id, choices, concurrency_limit=None, show_progress="hidden",
                           **private)
        classify_button.click(on_classify, [browser_id, image, checkpoint], labels, **private)
        cap_button.click(on_caption, [browser_id, cap_image, cap_ckpt, cap_max, cap_beams], cap_out, **private)
        vqa_button.click(on_answer, [browser_id, vqa_image, question, vqa_ckpt, vqa_max, vqa_beams], vqa_out, **private)
        register_api()
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=4).launch(max_file_size=MAX_UPLOAD)
