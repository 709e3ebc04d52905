"""The Train tab's method section: the trainable-parameter count of a choice before launch, and the PEFT
bake-off (every applicable method, one budget, one table)."""

from __future__ import annotations

import gradio as gr

from mmdemo import api
from mmdemo.bakeoff import DEFAULT_STEPS
from mmdemo.errors import UserInputError

from .common import browser_workspace, manager, user_errors

COLUMNS = ["method", "pick", "status", "trainable_params", "peak_memory_mb", "step_time_s", "adapter_mb", "metric",
           "value"]


@user_errors
def on_count(browser_id, dataset_id, base_model, method):
    if not dataset_id:
        raise UserInputError("Pick a dataset first: load one on the Dataset tab.")
    return api.method_plan(browser_workspace(browser_id), dataset_id, base_model or "", method or "")["text"]


def on_method_change(browser_id, dataset_id, base_model, method):
    """The count for the new choice, shown in place (a choice that cannot be built says why there, no pop-up)."""
    if not browser_id or not dataset_id or not method:
        return ""
    try:
        return api.method_plan(browser_workspace(browser_id), dataset_id, base_model or "", method)["text"]
    except UserInputError as e:
        return f"⚠️ {e}"


@user_errors
def on_start_bakeoff(browser_id, dataset_id, base_model, steps, image_size):
    if not dataset_id:
        raise UserInputError("Pick a dataset first: load one on the Dataset tab.")
    started = api.start_bakeoff(browser_workspace(browser_id), dataset_id, base_model or "", steps or 0,
                                image_size or 0, manager=manager())
    gr.Info(f"Bake-off queued: {len(started['methods'])} runs of {started['steps']} steps "
            f"({', '.join(started['methods'])}).")
    return started["bakeoff_id"]


def table(status: dict):
    import pandas as pd

    rows = [{**r, "pick": "✓ cheapest within 1 point" if r.get("pick") else ""} for r in status["rows"]]
    return pd.DataFrame(rows, columns=COLUMNS)


def on_bakeoff_tick(browser_id, bakeoff_id, shown):
    """Refreshes the table while the bake-off runs; once it is done, one last time."""
    if not browser_id or not bakeoff_id or shown == f"{bakeoff_id}:done":
        return gr.skip(), shown
    try:
        status = api.bakeoff_status(browser_workspace(browser_id), bakeoff_id, manager=manager())
    except UserInputError:
        return gr.skip(), shown
    return table(status), f"{bakeoff_id}:done" if status["done"] else shown


def build_bakeoff_section(browser_id, dataset, fields):
    """The count button (next to the method choice's effect) and the bake-off accordion."""
    with gr.Row():
        count = gr.Button("Count trainable parameters", size="sm", scale=0)
        plan = gr.Markdown(elem_id="method-plan")
    count.click(on_count, [browser_id, dataset, fields["base_model"], fields["method"]], plan, api_visibility="private")
    fields["method"].change(on_method_change, [browser_id, dataset, fields["base_model"], fields["method"]], plan,
                            api_visibility="private", show_progress="hidden")
    with gr.Accordion("PEFT bake-off: every method, one budget", open=False):
        gr.Markdown("Trains every method that applies to the base model on this dataset, each for the same number "
                    "of steps (batch 16, the image size above, its own learning rate), one after the other, and compares them. The pick "
                    "is the method with the fewest trainable parameters within 1 point of the best metric.")
        with gr.Row():
            steps = gr.Number(DEFAULT_STEPS, label="Steps per method", precision=0)
            start = gr.Button("Run the bake-off", elem_id="start-bakeoff")
        result = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="bakeoff-table")
    bakeoff_id, shown = gr.State(""), gr.State("")
    start.click(on_start_bakeoff, [browser_id, dataset, fields["base_model"], steps, fields["image_size"]], bakeoff_id,
                api_visibility="private")
    gr.Timer(3.0).tick(on_bakeoff_tick, [browser_id, bakeoff_id, shown], [result, shown], concurrency_limit=None,
                       show_progress="hidden", api_visibility="private")
    return start, result
