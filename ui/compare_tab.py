"""The Compare tab: two or more runs side by side (curves overlaid, settings that differ, metric deltas)."""

from __future__ import annotations

import gradio as gr

from mmdemo import api

from .common import browser_workspace, user_errors
from .train_tab import run_choices


@user_errors
def on_compare_choices(browser_id):
    if not browser_id:
        return gr.skip()
    return gr.update(choices=run_choices(browser_workspace(browser_id)))


def compare_frames(view: dict):
    """The view of mmdemo.compare as the tab's plots and tables."""
    import pandas as pd

    loss = pd.DataFrame(view["loss"], columns=["run", "step", "loss"]).astype({"step": float, "loss": float})
    val = pd.DataFrame([{"epoch": float(v["epoch"]), "value": float(v["value"]), "series": f"{v['run']} · {v['metric']}"}
                        for v in view["val"]], columns=["epoch", "value", "series"])
    config = pd.DataFrame(view["config"]) if view["config"] else pd.DataFrame({"setting": ["(all settings equal)"]})
    return loss, val, config, pd.DataFrame(view["metrics"])


@user_errors
def on_compare(browser_id, run_ids):
    return compare_frames(api.compare_runs(browser_workspace(browser_id), list(run_ids or [])))


def build_compare_tab(browser_id):
    with gr.Tab("Compare") as tab:
        gr.Markdown("Pick two or more of your runs: their curves overlaid, the settings that differ, and the final "
                    "metrics (per class too) with each run's difference to the first one picked.")
        with gr.Row():
            picks = gr.Dropdown(label="Runs", choices=[], multiselect=True, elem_id="compare-runs", scale=4)
            refresh = gr.Button("Refresh list", scale=1)
            compare = gr.Button("Compare", variant="primary", elem_id="compare-button", scale=1)
        with gr.Row():
            loss = gr.LinePlot(x="step", y="loss", color="run", title="Training loss", height=260)
            val = gr.LinePlot(x="epoch", y="value", color="series", title="Validation (per epoch)", height=260)
        config = gr.Dataframe(label="Settings that differ", interactive=False, elem_id="compare-config")
        metrics = gr.Dataframe(label="Final metrics; Δ = the run minus the first run", interactive=False,
                               elem_id="compare-metrics")
    private = {"api_visibility": "private"}
    tab.select(on_compare_choices, browser_id, picks, **private)
    refresh.click(on_compare_choices, browser_id, picks, **private)
    compare.click(on_compare, [browser_id, picks], [loss, val, config, metrics], **private)
    return picks, compare, loss, val, config, metrics
