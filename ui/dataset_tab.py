"""The Dataset tab: upload or pick a sample, see the summary, counts and examples."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from mmdemo import api

from .common import MAX_UPLOAD, SAMPLES, TASKS, browser_workspace, file_path, user_errors


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
    wsp = browser_workspace(browser_id)
    summary = api.ingest(wsp, file_path(file) or (hub_id or "").strip(), task)
    previews = api.dataset_previews(wsp, summary["dataset_id"])
    gallery = [(img, name) for name, imgs in previews.items() for img in imgs]
    return (summary_markdown(summary), counts_frame(summary), gallery,
            gr.update(choices=dataset_choices(wsp), value=summary["dataset_id"]))


def on_sample(browser_id, task):
    return on_load_dataset(browser_id, str(SAMPLES[task]), "", task)


def dataset_choices(wsp: Path) -> list[tuple[str, str]]:
    rows = []
    for s in api.list_datasets(wsp):
        what = f"{len(s.classes)} classes" if s.task == "classification" else s.task
        rows.append((f"{s.dataset_id[:8]} · {what} · {s.num_train + s.num_val + s.num_test} images", s.dataset_id))
    return rows


def build_dataset_tab():
    with gr.Tab("Dataset"):
        gr.Markdown("**Classification**: a zip of class folders (`cats/1.jpg`, `dogs/2.jpg`), optional `train/`, "
                    "`val/`, `test/` split folders, or a `metadata.csv` / `metadata.jsonl` with `file_name` and "
                    "`label`. **Captioning**: images + `metadata.jsonl` / `.csv` with `file_name` and `text` (or "
                    "`caption`). **VQA**: `file_name`, `question`, `answer` (or `answers`, a list).")
        with gr.Row():
            file = gr.File(label=f"Dataset (zip, csv or jsonl; at most {MAX_UPLOAD})",
                           file_types=[".zip", ".csv", ".jsonl"], type="filepath", elem_id="dataset-file")
            with gr.Column():
                task = gr.Radio(TASKS, value="classification", label="Task")
                hub_id = gr.Textbox(label="…or a Hugging Face Hub dataset id", placeholder="owner/name")
                load = gr.Button("Load dataset", variant="primary", interactive=False)
                sample = gr.Button("Use the sample dataset (easy-VQA shapes)", interactive=False)
        summary = gr.Markdown(elem_id="dataset-summary")
        counts = gr.BarPlot(x="class", y="images", color="split", title="Images per class / split", height=260)
        gallery = gr.Gallery(label="Examples", columns=8, height=300)
    return file, task, hub_id, load, sample, summary, counts, gallery
