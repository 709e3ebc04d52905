"""The Train tab: settings, start / stop / resume, live progress and plots, the report, push to the Hub."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from mmdemo.errors import UserInputError

from .common import (BASE_MODELS, METHODS, browser_workspace, do_push, do_start_training, do_status, do_stop, manager,
                     user_errors)


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
    from mmdemo.jobs import find_run, run_warnings

    for warning in run_warnings(find_run(wsp, run_id)):
        gr.Warning(warning)
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
    from mmdemo.progress import format_duration

    step, total = status["step"], status["total_steps"] or 0
    eta = format_duration(status.get("eta_s")) if status["status"] == "running" else ""
    eta = f" · ETA {eta}" if eta else ""
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
        # contain: a small image shown whole (cover crops a 64 px shape to its background)
        mistakes = gr.Gallery(label="Validation examples: misclassified (true → predicted), or reference → predicted "
                                    "text", columns=8, height=260, object_fit="contain", elem_id="report-examples")
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
