"""The Train tab's Deploy section: the selected run exported to ONNX (fp32, int8, fp16) and the export lab's
table (accuracy of each file, delta and agreement with PyTorch, size, CPU latency), its warnings and pick."""

from __future__ import annotations

import gradio as gr

from mmdemo import api
from mmdemo.errors import UserInputError

from .common import browser_workspace, user_errors

LAB_COLUMNS = ["variant", "file", "accuracy", "delta_points", "agreement", "size_mb", "latency_ms_p50",
               "latency_ms_p95", "best"]


def lab_table(lab: dict):
    import pandas as pd

    return pd.DataFrame([{c: ("✅" if r[c] else "") if c == "best" else r.get(c) for c in LAB_COLUMNS}
                         for r in lab["variants"]], columns=LAB_COLUMNS)


def lab_notes(lab: dict) -> str:
    try_it = (" Try it on the Classify tab: the checkpoint list now has this run's ONNX variants."
              if lab.get("task", "classification") == "classification" else
              f" The accuracy column holds the task's {lab.get('metric')}; agreement is the share of identical texts.")
    lines = [f"Best here: **{lab['best']}** (fastest within 1 point of PyTorch).{try_it}"] if lab.get("best") else []
    lines += [f"⚠️ {w}" for w in lab["warnings"]]
    return "\n\n".join(lines)


@user_errors
def on_export_onnx(browser_id, run_id, variants):
    if not run_id:
        raise UserInputError("Pick a finished classification, or composed captioning / VQA, run first (the Run list "
                             "above).")
    lab = api.export_onnx(browser_workspace(browser_id), run_id, quantize=list(variants or []))
    return lab_table(lab), lab_notes(lab)


def build_deploy_section(browser_id, run):
    with gr.Accordion("Deploy: ONNX, int8, fp16 (measured)", open=False):
        gr.Markdown("Exports the selected classification run (or a captioning / VQA run of the offline composed "
                    "captioner: encoder + decoder) to ONNX and measures every variant by running that file on the "
                    "run's validation images: accuracy (captioning: CIDEr-D, VQA: VQA accuracy), its change against "
                    "PyTorch, agreement (top-1, or identical generated text), file size and CPU latency at batch 1. "
                    "int8 is calibrated on 100 of the run's training images. Takes a minute or two on a CPU.")
        with gr.Row():
            variants = gr.CheckboxGroup(["int8", "fp16"], value=["int8", "fp16"], label="Also export")
            export = gr.Button("Export and measure", elem_id="export-onnx")
        table = gr.Dataframe(label="Export lab", headers=LAB_COLUMNS, interactive=False, elem_id="export-lab")
        notes = gr.Markdown(elem_id="export-notes")
    export.click(on_export_onnx, [browser_id, run, variants], [table, notes], api_visibility="private",
                 concurrency_limit=1)
    return export, table, notes
