"""The Train tab: settings, start / stop / resume, live progress and plots, the report, push to the Hub."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from mmdemo import api, runs
from mmdemo.config import CONTRASTIVE_LOSSES, KEEP_OLD, LR_SCHEDULES
from mmdemo.recipe import RECIPES, SWITCHES
from mmdemo.errors import UserInputError

from .advice import advised_method, build_advice_section, build_baseline_comparison
from .bakeoff import build_bakeoff_section
from .deploy import build_deploy_section
from .common import BASE_MODELS, METHODS, browser_workspace, manager, user_errors
from .distill import build_distill_section


def run_choices(wsp: Path, task: str | None = None, finished: bool = False) -> list[tuple[str, str]]:
    return [(f"{r['run_id'][:8]} · {r['base_model']} · {r['method']} · {r['status']}", r["run_id"])
            for r in api.list_runs(wsp, manager=manager())
            if (task is None or r["task"] == task) and (not finished or r["has_model"])]


@user_errors
def on_pick_dataset(browser_id, dataset_id):
    """The dataset's task decides the base models and methods on offer and which task-specific settings
    show (the contrastive loss: retrieval only); without a GPU the user also learns how long the default
    recipe takes on the CPU."""
    if not browser_id or not dataset_id:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    plan = api.training_plan(browser_workspace(browser_id), dataset_id)
    task = plan["task"]
    advised = advised_method(browser_workspace(browser_id), dataset_id) if task == "classification" else None
    notice = ""
    if plan["cpu_seconds"] is not None:
        minutes = plan["cpu_seconds"] / 60
        notice = (f"⚠️ No GPU here: training runs on the CPU. The default recipe on this dataset takes about "
                  f"{max(1, round(minutes))} min on 2 cores; larger models, images or datasets take much longer. "
                  "For long jobs use GPU hardware (on a Hugging Face Space: Settings → Hardware, a dedicated GPU; "
                  "ZeroGPU only serves inference).")
    return (gr.update(choices=BASE_MODELS[task], value=BASE_MODELS[task][0]),
            gr.update(choices=METHODS[task], value=advised or plan["method"]), notice,
            gr.update(visible=task == "retrieval"))


@user_errors
def on_start(browser_id, dataset_id, **params):
    """``params``: the Train tab's settings by TrainConfig field name (build_train_tab's dict)."""
    wsp = browser_workspace(browser_id)
    if not dataset_id:
        raise UserInputError("Pick a dataset first: load one on the Dataset tab.")
    run_id = api.start(wsp, dataset_id, manager=manager(), **params)
    for warning in api.run_warnings(wsp, run_id):
        gr.Warning(warning)
    return gr.update(choices=run_choices(wsp), value=run_id)


@user_errors
def on_stop(browser_id, run_id):
    if run_id:
        api.stop(browser_workspace(browser_id), run_id, manager=manager())


@user_errors
def on_resume(browser_id, run_id):
    if run_id:
        api.resume(browser_workspace(browser_id), run_id, manager=manager())


def progress_html(status: dict) -> str:
    from mmdemo.progress import format_duration

    step, total = status["step"], status["total_steps"] or 0
    eta = format_duration(status.get("eta_s")) if status["status"] == "running" else ""
    eta = f" · ETA {eta}" if eta else ""
    msg = f"<div>{html.escape(status['message'])}</div>" if status.get("message") else ""
    if status.get("fit_warning"):  # the GPU dry run found the batch too big: it trains in micro-batches
        msg += f"<div style='color:#d00'>🔴 {html.escape(status['fit_warning'])}</div>"
    elif status.get("fit_message"):
        msg += f"<div>{html.escape(status['fit_message'])}</div>"
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
        status = api.status(wsp, run_id, manager=manager())
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
    import pandas as pd

    run_dir = runs.find_run(wsp, run_id)
    result = runs.read_eval(run_dir)
    if not result:
        return gr.skip(), gr.skip(), gr.skip()
    cm = run_dir / runs.CONFUSION_PLOT
    return pd.DataFrame(runs.report_rows(result)), (str(cm) if cm.exists() else None), runs.report_examples(run_dir)


def build_train_tab(browser_id):
    """The tab's components; ``fields`` maps TrainConfig field names to the widgets that set them (the
    start handler receives their values under those names)."""
    with gr.Tab("Train"):
        with gr.Row():
            dataset = gr.Dropdown(label="Dataset", choices=[], elem_id="dataset-choice")
            base_model = gr.Dropdown(label="Base model", choices=BASE_MODELS["classification"],
                                     value=BASE_MODELS["classification"][0], allow_custom_value=True,
                                     info="efficientnet_lite0 / _lite1 / _lite2 work offline; other timm / transformers "
                                          "ids need the Hub; a run id continues that run")
            fields = {"base_model": base_model,
                      "method": gr.Radio(METHODS["classification"], value=METHODS["classification"][0],
                                         label="Method")}
            fields["contrastive_loss"] = gr.Radio(list(CONTRASTIVE_LOSSES), value="auto", label="Contrastive loss",
                                                  info="retrieval: infonce (CLIP), sigmoid (SigLIP); auto: sigmoid for "
                                                       "SigLIP models, infonce otherwise", visible=False,
                                                  elem_id="contrastive-loss")
        with gr.Row():
            fields["epochs"] = gr.Number(0, label="Epochs (0 = default)", precision=0)
            fields["learning_rate"] = gr.Number(0, label="Learning rate (0 = default)")
            fields["batch_size"] = gr.Number(0, label="Batch size (0 = default)", precision=0)
            fields["image_size"] = gr.Number(0, label="Image size (0 = from the data)", precision=0)
        with gr.Accordion("More settings", open=False):
            with gr.Row():
                fields["weight_decay"] = gr.Number(0.01, label="Weight decay")
                fields["warmup_ratio"] = gr.Number(0.1, label="Warm-up ratio")
                fields["augment"] = gr.Checkbox(True, label="Augmentation (classification)",
                                                info="random crops and flips; shifts for glyphs too small to crop")
                fields["early_stopping_patience"] = gr.Number(0, label="Early-stopping patience (0 = off)", precision=0)
                fields["seed"] = gr.Number(0, label="Seed", precision=0)
                fields["trackio"] = gr.Textbox("", label="trackio project (empty = off)",
                                               info="also log the run's metrics to trackio's local store")
                fields["hflip"] = gr.Radio(["auto", "on", "off"], value="auto", label="Horizontal flips",
                                           info="auto: off for glyph-like images (digits, text) and tiny upscaled ones")
            with gr.Row():  # the classification recipe's switches (mmdemo/recipe.py); auto = what the data says
                fields["recipe"] = gr.Radio(list(RECIPES), value="auto", label="Recipe",
                                            info="lp-ft: fit the new head on frozen features first; auto: plain")
                fields["freeze_early"] = gr.Radio(list(SWITCHES), value="auto", label="Freeze early layers",
                                                  info="full fine-tune: keep a CNN's stem and stride-2/4 stages as "
                                                       "pretrained (auto: on, off for glyph-like images)")
                fields["probe_guard"] = gr.Radio(list(SWITCHES), value="auto", label="Linear-probe guard",
                                                 info="end on the pretrained features' linear probe where it scores "
                                                      "as high as the fine-tune on validation (auto: full, up to 5,000 "
                                                      "images, not glyph-like ones)")
                fields["keep_best"] = gr.Radio(list(SWITCHES), value="auto", label="Keep the best evaluation",
                                               info="auto: on from 500 validation images")
                fields["lr_schedule"] = gr.Radio(list(LR_SCHEDULES), value="auto", label="Learning-rate schedule",
                                                 info="auto: one-cycle for a full classification fine-tune, cosine "
                                                      "otherwise")
                fields["label_smoothing"] = gr.Number(0.1, label="Label smoothing (classification)")
            with gr.Row():
                fields["keep_old"] = gr.Radio(list(KEEP_OLD), value=KEEP_OLD[0], label="Keep what it knew",
                                              info="when the base model is a previous run: replay its memory of "
                                                   "training images, distill its outputs, both, or off "
                                                   "(captioning / VQA: both = replay; no distill)")
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="start-training", interactive=False)
            stop = gr.Button("Stop", variant="stop")
            resume = gr.Button("Resume")
            run = gr.Dropdown(label="Run", choices=[], elem_id="run-choice", scale=3)
        gpu_notice = gr.Markdown(elem_id="gpu-notice")
        build_advice_section(browser_id, dataset, fields["method"])
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
        build_baseline_comparison(browser_id, run, report)
        # contain: a small image shown whole (cover crops a 64 px shape to its background)
        mistakes = gr.Gallery(label="Validation examples: misclassified (true → predicted), reference → predicted "
                                    "text, or a text query's best images", columns=8, height=260, object_fit="contain", elem_id="report-examples")
        build_bakeoff_section(browser_id, dataset, fields)
        build_distill_section(browser_id, run)
        build_deploy_section(browser_id, run)
        build_push_section(browser_id, run)
    return dataset, fields, start, stop, resume, run, progress, loss_plot, val_plot, report, confusion, mistakes, gpu_notice


@user_errors
def on_push(browser_id, run_id, repo_id, token, private):
    if not run_id:
        raise UserInputError("Pick a finished run first (the Run list above).")
    result = api.push(browser_workspace(browser_id), run_id, repo_id, token, private)
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
