"""The mmdemo web UI: Gradio Blocks over the mmdemo engine, one module per tab (no torch imported here).

``build_demo()`` assembles the tabs, wires their events and registers the API endpoints; ``app.py``
serves it.
"""

from __future__ import annotations

import uuid

import gradio as gr

from mmdemo.api import DEFAULT_CHECKPOINT
from mmdemo.taskspec import TASK_SPECS

from .api import register_api
from .compare_tab import build_compare_tab
from .common import TASKS, browser_workspace, user_errors
from .dataset_tab import build_dataset_tab, dataset_choices, on_load_dataset, on_sample
from .predict_tabs import (IMAGE_TEXT, build_classify_tab, build_text_tab, on_answer, on_caption, on_classify,
                           on_pick_checkpoint, on_pick_vqa_checkpoint)
from .search_tab import build_search_tab, build_zero_shot_section
from .train_tab import build_train_tab, on_pick_dataset, on_resume, on_start, on_stop, on_tick, run_choices


def on_load_browser(browser_id: str):
    """Gives a new browser its random id (kept in localStorage across reloads), then enables the
    buttons: a click before the id exists would have no workspace."""
    return browser_id or uuid.uuid4().hex


@user_errors
def on_refresh_choices(browser_id):
    if not browser_id:
        return (gr.skip(),) * (2 + len(checkpoint_choices_keys()))
    wsp = browser_workspace(browser_id)
    return (gr.update(choices=dataset_choices(wsp)), gr.update(choices=run_choices(wsp)),
            *(gr.update(choices=c) for c in checkpoint_choices(wsp).values()))


def list_task(task: str) -> str:
    """The task whose key names the checkpoint list of ``task``'s predict tab (its tab's first task)."""
    return next(t for t in TASKS if TASK_SPECS[t].tab == TASK_SPECS[task].tab)


def checkpoint_choices_keys() -> list[str]:
    """The tasks keying the predict tabs' checkpoint lists, in the order of checkpoint_choices."""
    return list(dict.fromkeys(map(list_task, TASKS)))


def checkpoint_choices(wsp) -> dict[str, list]:
    """The choices of the Classify, Caption and Ask checkpoint lists: this workspace's runs with a model,
    keyed by each tab's first task (the Classify list also holds the image + text classification runs, their
    label saying so; choosing one shows the Classify tab's Text box)."""
    done = {task: [] for task in dict.fromkeys(map(list_task, TASKS))}
    for task in TASKS:
        mark = " · image + text" if task == IMAGE_TEXT else ""
        done[list_task(task)] += [(label + mark, run_id) for label, run_id in run_choices(wsp, task, finished=True)]
    done["classification"] = [(DEFAULT_CHECKPOINT, "")] + done["classification"] + onnx_choices(wsp)
    return done


def onnx_choices(wsp) -> list:
    """The ONNX variants exported from this workspace's classification runs (the Train tab's Deploy section)."""
    from mmdemo.deploy import onnx_choices as exported
    from mmdemo.runs import find_run

    return [c for label, run_id in run_choices(wsp, "classification", finished=True)
            for c in exported(find_run(wsp, run_id), label.split(" · ")[0])]


@user_errors
def on_run_reported(browser_id, run_id, reported):
    """A run finished (its report was just shown): the predict tab of its task selects it, so the first
    try there uses the model just trained, not the default."""
    import yaml

    from mmdemo.runs import find_run

    if not browser_id or not run_id or not reported.startswith(run_id):
        return (gr.skip(),) * len(checkpoint_choices_keys())
    wsp = browser_workspace(browser_id)
    task = yaml.safe_load((find_run(wsp, run_id) / "config.yaml").read_text()).get("task")
    choices = checkpoint_choices(wsp)
    return tuple(gr.update(choices=c, value=run_id) if t == list_task(task) and run_id in dict(c).values() else gr.skip()
                 for t, c in choices.items())


@user_errors
def on_restore_run(browser_id):
    """After a reload (or in a second tab) the newest run is selected again, so a live run keeps
    showing its progress: the run directory, not the page, holds the state."""
    runs = run_choices(browser_workspace(browser_id)) if browser_id else []
    return gr.update(value=runs[0][1]) if runs else gr.skip()


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="mmdemo: fine-tune vision models") as demo:
        gr.Markdown("# mmdemo\nUpload labelled images, fine-tune a model, and try it, all in the browser.")
        browser_id = gr.BrowserState("", storage_key="mmdemo-browser-id")
        file, task, hub_id, load, sample, summary, counts, gallery = build_dataset_tab()
        (dataset, fields, start, stop, resume, run, progress, loss_plot, val_plot, report, confusion, mistakes,
         gpu_notice) = build_train_tab(browser_id)
        checkpoint, image, classify_text, labels, classify_button = build_classify_tab(
            lambda tab_image: build_zero_shot_section(browser_id, tab_image))
        cap_ckpt, cap_image, _, cap_out, cap_max, cap_beams, cap_button, _ = build_text_tab("Caption", "captioning", False)
        vqa_ckpt, vqa_image, question, vqa_out, vqa_max, vqa_beams, vqa_button, vqa_info = build_text_tab(
            "Ask (VQA)", "vqa", True)
        search_ckpt = build_search_tab(browser_id)
        build_compare_tab(browser_id)
        private = {"api_visibility": "private"}
        choices = [dataset, run, checkpoint, cap_ckpt, vqa_ckpt, search_ckpt]

        demo.load(on_load_browser, browser_id, browser_id, **private).then(
            lambda: [gr.update(interactive=True)] * 3, None, [load, sample, start], **private).then(
            on_refresh_choices, browser_id, choices, **private).then(on_restore_run, browser_id, run, **private)
        load.click(on_load_dataset, [browser_id, file, hub_id, task], [summary, counts, gallery, dataset], **private)
        sample.click(on_sample, [browser_id, task], [summary, counts, gallery, dataset], **private)
        dataset.change(on_pick_dataset, [browser_id, dataset],
                       [fields["base_model"], fields["method"], gpu_notice, fields["contrastive_loss"]], **private)
        start.click(on_start, [browser_id, dataset], run, inputs_kwargs=fields, **private)
        stop.click(on_stop, [browser_id, run], None, **private)
        resume.click(on_resume, [browser_id, run], None, **private)
        reported = gr.State("")
        gr.Timer(1.0).tick(on_tick, [browser_id, run, reported],
                           [progress, loss_plot, val_plot, report, confusion, mistakes, reported],
                           concurrency_limit=None, show_progress="hidden", **private)
        reported.change(on_run_reported, [browser_id, run, reported], [checkpoint, cap_ckpt, vqa_ckpt, search_ckpt],
                        **private)
        gr.Timer(3.0).tick(on_refresh_choices, browser_id, choices, concurrency_limit=None, show_progress="hidden",
                           **private)
        checkpoint.change(on_pick_checkpoint, [browser_id, checkpoint], classify_text, **private)
        vqa_ckpt.change(on_pick_vqa_checkpoint, [browser_id, vqa_ckpt], [vqa_info, vqa_max, vqa_beams], **private)
        classify_button.click(on_classify, [browser_id, image, checkpoint, classify_text], labels, **private)
        cap_button.click(on_caption, [browser_id, cap_image, cap_ckpt, cap_max, cap_beams], cap_out, **private)
        vqa_button.click(on_answer, [browser_id, vqa_image, question, vqa_ckpt, vqa_max, vqa_beams], vqa_out, **private)
        register_api()
    return demo
