"""The Train tab's distillation section: the selected run teaches a smaller student; the comparison of a
distilled run (accuracy against CPU latency for teacher, student and the student alone)."""

from __future__ import annotations

import gradio as gr

from mmdemo import api, runs
from mmdemo.errors import UserInputError

from .common import BASE_MODELS, browser_workspace, file_path, manager, user_errors

COLUMNS = ["model", "base_model", "accuracy", "latency_ms_p50", "params", "image_size", "agreement_with_teacher"]


@user_errors
def on_distill(browser_id, teacher, student, baseline, images, epochs, image_size):
    """Queues the student (and, when asked, the student alone first) with the selected run as its teacher."""
    if not teacher:
        raise UserInputError("Pick the teacher first: a finished classification run in the Run list above.")
    wsp = browser_workspace(browser_id)
    started = api.distill(wsp, teacher, student or "", baseline=bool(baseline), images=file_path(images) or None,
                          manager=manager(), epochs=epochs or 0, image_size=image_size or 0)
    alone = f" after the student alone ({started['baseline_run_id'][:8]})" if started["baseline_run_id"] else ""
    gr.Info(f"Distillation queued: run {started['run_id'][:8]}{alone}.")
    from .train_tab import run_choices

    return gr.update(choices=run_choices(wsp), value=started["run_id"])


def comparison(browser_id, run_id):
    """The selected run's distillation table and plot; empty for a run that did not distil."""
    import pandas as pd

    if not browser_id or not run_id:
        return gr.skip(), gr.skip()
    try:
        wsp = browser_workspace(browser_id)
        info = api.distill_report(wsp, run_id)
        plot = runs.find_run(wsp, run_id) / "distill.png"
    except UserInputError:
        return gr.skip(), gr.skip()
    rows = pd.DataFrame(info.get("rows") or [], columns=COLUMNS)
    return rows, (str(plot) if info and plot.exists() else None)


def build_distill_section(browser_id, run):
    """The accordion: student, the student-alone option, unlabelled images, the button, the comparison."""
    with gr.Accordion("Distill into a smaller model", open=False):
        gr.Markdown("The run selected above is the **teacher**: a student learns from its soft labels (and the true "
                    "ones) over the same training images, plus any unlabelled images you add. Offline, an "
                    "efficientnet_lite1 / lite2 teacher distils into efficientnet_lite0. The student alone, trained "
                    "with the same settings, shows what the teacher added.")
        with gr.Row():
            student = gr.Dropdown(BASE_MODELS["classification"], value=BASE_MODELS["classification"][0],
                                  label="Student", allow_custom_value=True)
            baseline = gr.Checkbox(True, label="Also train the student alone (for the comparison)")
            epochs = gr.Number(0, label="Epochs (0 = default)", precision=0)
            image_size = gr.Number(0, label="Image size (0 = the student's)", precision=0)
        images = gr.File(label="Unlabelled images (optional zip)", file_types=[".zip"], type="filepath")
        with gr.Row():
            start = gr.Button("Distill into a smaller model", elem_id="start-distill")
            show = gr.Button("Show the comparison of the selected run")
        with gr.Row():
            table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="distill-table")
            plot = gr.Image(label="Accuracy vs CPU latency (batch 1)", type="filepath", height=300)
    start.click(on_distill, [browser_id, run, student, baseline, images, epochs, image_size], run,
                api_visibility="private")
    show.click(comparison, [browser_id, run], [table, plot], api_visibility="private")
    run.change(comparison, [browser_id, run], [table, plot], api_visibility="private", show_progress="hidden")
    return start, table, plot
