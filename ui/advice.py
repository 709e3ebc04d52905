"""The Train tab's advice before training (baselines of the frozen base model, the recommended recipe)
and, once a run has finished, its result next to those baselines."""

from __future__ import annotations

import gradio as gr

from mmdemo import api

from .common import browser_workspace, user_errors

BASELINE_HEADERS = ["baseline", "images per class", "accuracy", "± std", "draws"]


def _shots(shots) -> str:
    return "all" if shots is None else "none (zero-shot)" if shots == 0 else str(shots)


def advice_markdown(report: dict) -> str:
    rec = report["recommendation"]
    full = [f"{r['baseline']} {r['accuracy']:.1%}" for r in report["rows"] if r["shots"] in (None, 0)]
    sample = " (a stratified sample)" if report["sampled"] else ""
    return (f"**Recommended: {rec['label']}** (method `{rec['method']}`, now selected below). {rec['text']}\n\n"
            f"Without fine-tuning, on {report['num_val']} validation images{sample}: {' · '.join(full)}. "
            f"Frozen `{report['backbone']}` features at {report['image_size']} px, computed in "
            f"{report['feature_seconds']:.1f} s{' (cached)' if report['features_cached'] else ''}.\n\n"
            f"<small>Predicted time: {rec['estimate']}.</small>")


def baseline_frames(report: dict):
    import pandas as pd

    table = pd.DataFrame([[r["baseline"], _shots(r["shots"]), r["accuracy"], r["std"], r["draws"]]
                          for r in report["rows"]], columns=BASELINE_HEADERS)
    curve = pd.DataFrame([{"images per class": float(r["shots"]), "accuracy": float(r["accuracy"]),
                           "baseline": r["baseline"]} for r in report["rows"] if r["shots"]],
                         columns=["images per class", "accuracy", "baseline"])
    return table, curve


@user_errors
def on_advise(browser_id, dataset_id):
    """A classification dataset was picked: its baselines, the recommendation, and the Method set to it."""
    from mmdemo.data import find_dataset, load_summary

    if not browser_id or not dataset_id:
        return (gr.skip(),) * 4
    wsp = browser_workspace(browser_id)
    if load_summary(find_dataset(wsp, dataset_id)).task != "classification":
        return "Baselines before training are shown for classification datasets.", None, None, gr.skip()
    report = api.dataset_baselines(wsp, dataset_id)
    table, curve = baseline_frames(report)
    return advice_markdown(report), table, curve, gr.update(value=report["recommendation"]["method"])


def advised_method(wsp, dataset_id: str) -> str | None:
    """The method recommended for a dataset whose baselines were already computed (None otherwise)."""
    from mmdemo.baselines import recommended_method, saved_report
    from mmdemo.data import find_dataset

    report = saved_report(find_dataset(wsp, dataset_id))
    return recommended_method(report["probe_accuracy"]) if report.get("probe_accuracy") is not None else None


def build_advice_section(browser_id, dataset, method):
    """Filled when a dataset is picked (a few seconds the first time: features are computed once)."""
    with gr.Accordion("Before training: what the base model gets without fine-tuning", open=True):
        text = gr.Markdown("Pick a classification dataset to see its baselines and the recommended recipe.",
                           elem_id="advice-text")
        with gr.Row():
            table = gr.Dataframe(headers=BASELINE_HEADERS, interactive=False, label="Baselines (validation accuracy)",
                                 elem_id="baseline-table")
            curve = gr.LinePlot(x="images per class", y="accuracy", color="baseline", title="k-shot curve",
                                height=240, elem_id="baseline-curve")
    dataset.change(on_advise, [browser_id, dataset], [text, table, curve, method], api_visibility="private",
                   show_progress="minimal")
    return text, table, curve


@user_errors
def on_report_baselines(browser_id, run_id):
    """A finished run's report was shown: did training beat the base model?"""
    from mmdemo.baselines import training_vs_baselines
    from mmdemo.runs import find_run

    if not browser_id or not run_id:
        return gr.skip(), gr.skip()
    view = training_vs_baselines(find_run(browser_workspace(browser_id), run_id))
    if view is None:
        return "", gr.update(visible=False)
    import pandas as pd

    return f"**{view['verdict']}**", gr.update(value=pd.DataFrame(view["rows"]), visible=True)


def build_baseline_comparison(browser_id, run, report):
    verdict = gr.Markdown(elem_id="baseline-verdict")
    table = gr.Dataframe(headers=["model", "accuracy"], interactive=False, visible=False,
                         label="Fine-tuned vs the base model (validation accuracy)")
    report.change(on_report_baselines, [browser_id, run], [verdict, table], api_visibility="private")
    return verdict, table
