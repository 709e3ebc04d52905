"""The Search tab (text -> images of a dataset, image -> its captions) and the Classify tab's zero-shot mode."""

from __future__ import annotations

import gradio as gr

from mmdemo import api
from mmdemo.errors import UserInputError

from .common import EXAMPLES, browser_workspace, on_gpu, user_errors

NEWEST_RUN = "newest retrieval run of yours"
OFFLINE_ZERO_SHOT = "offline: ImageNet classifier + MiniLM label embeddings (no training)"
DEFAULT_TEMPLATE = "a photo of a {}."

search, match_captions, zero_shot = on_gpu(api.search), on_gpu(api.match_captions), on_gpu(api.zero_shot)


def search_datasets(wsp) -> list[tuple[str, str]]:
    """This workspace's datasets (captioned ones first: they also answer image -> captions)."""
    found = api.list_datasets(wsp)
    found.sort(key=lambda s: s.task not in ("retrieval", "captioning"))
    return [(f"{s.dataset_id[:8]} · {s.task} · {s.num_train + s.num_val + s.num_test} rows", s.dataset_id) for s in found]


@user_errors
def on_search(browser_id, query, dataset_id, checkpoint, top_k):
    from mmdemo.data import find_dataset
    from mmdemo.imagesearch import images_by_name

    if not dataset_id:
        raise UserInputError("Pick a dataset to search first (load one on the Dataset tab).")
    wsp = browser_workspace(browser_id)
    hits = search(wsp, query, dataset_id, checkpoint or "", int(top_k or 5))
    images = images_by_name(find_dataset(wsp, dataset_id), [h["file_name"] for h in hits])
    return [(images[h["file_name"]], f"{h['file_name']} · {h['score']:.3f}") for h in hits]


@user_errors
def on_match_captions(browser_id, image, dataset_id, checkpoint, top_k):
    import pandas as pd

    if image is None:
        raise UserInputError("Drop an image first (or click an example).")
    if not dataset_id:
        raise UserInputError("Pick a captioned dataset first (load one on the Dataset tab).")
    hits = match_captions(browser_workspace(browser_id), image, dataset_id, checkpoint or "", int(top_k or 5))
    return pd.DataFrame(hits, columns=["caption", "score"])


@user_errors
def on_refresh_search(browser_id):
    if not browser_id:
        return gr.skip()
    return gr.update(choices=search_datasets(browser_workspace(browser_id)))


@user_errors
def on_zero_shot(browser_id, image, labels, template, checkpoint):
    from mmdemo.zeroshot import parse_labels, prompts_of

    if image is None:
        raise UserInputError("Drop an image first (or click an example).")
    prompts = prompts_of(parse_labels(labels or ""), template or DEFAULT_TEMPLATE)
    shown = "Prompts: " + " · ".join(f"`{p}`" for p in prompts)
    return zero_shot(browser_workspace(browser_id), image, labels, checkpoint or "", template or DEFAULT_TEMPLATE), shown


def build_zero_shot_section(browser_id, image) -> dict:
    """The Classify tab's zero-shot mode: free-text labels for the tab's image, no training needed."""
    with gr.Accordion("Zero-shot: your own labels, no training", open=False, elem_id="zero-shot"):
        with gr.Row():
            labels = gr.Textbox(label="Labels (comma-separated)", placeholder="cat, dog, coffee, rocket",
                                elem_id="zero-shot-labels")
            template = gr.Textbox(DEFAULT_TEMPLATE, label="Prompt template ({} = the label)", elem_id="zero-shot-template")
            checkpoint = gr.Dropdown(label="Model", choices=[(OFFLINE_ZERO_SHOT, "")], value="", allow_custom_value=True,
                                     elem_id="zero-shot-checkpoint",
                                     info="the offline default, a retrieval run of yours, or a CLIP / SigLIP Hub id")
        button = gr.Button("Classify with these labels", elem_id="zero-shot-button")
        prompts = gr.Markdown(elem_id="zero-shot-prompts")
        output = gr.Label(num_top_classes=5, label="Zero-shot", elem_id="zero-shot-output")
    private = {"api_visibility": "private"}
    button.click(on_zero_shot, [browser_id, image, labels, template, checkpoint], [output, prompts], **private)
    labels.focus(on_refresh_zero_shot, browser_id, checkpoint, **private)
    return {"labels": labels, "template": template, "checkpoint": checkpoint, "button": button, "output": output}


@user_errors
def on_refresh_zero_shot(browser_id):
    from .train_tab import run_choices

    if not browser_id:
        return gr.skip()
    runs = run_choices(browser_workspace(browser_id), "retrieval", finished=True)
    return gr.update(choices=[(OFFLINE_ZERO_SHOT, "")] + runs)


def build_search_tab(browser_id):
    """Returns the checkpoint list (refreshed with the other run lists)."""
    with gr.Tab("Search") as tab:
        with gr.Row():
            dataset = gr.Dropdown(label="Dataset to search", choices=[], elem_id="search-dataset")
            checkpoint = gr.Dropdown(label="Checkpoint (a retrieval run of yours, or a CLIP / SigLIP Hub id)",
                                     choices=[], value=None, allow_custom_value=True, elem_id="search-checkpoint",
                                     info=f"empty: the {NEWEST_RUN}")
            top_k = gr.Slider(1, 24, value=5, step=1, label="Results")
        with gr.Row():
            query = gr.Textbox(label="Find images", placeholder="a red circle", elem_id="search-query", scale=4)
            button = gr.Button("Search", variant="primary", elem_id="search-button", scale=1)
        gallery = gr.Gallery(label="Best matches (file · cosine similarity)", columns=6, height=260,
                             elem_id="search-gallery")
        with gr.Row():
            image = gr.Image(type="pil", label="…or drop an image to find its captions", height=220,
                             elem_id="search-image")
            with gr.Column():
                caption_button = gr.Button("Find captions", elem_id="search-captions-button")
                captions = gr.Dataframe(headers=["caption", "score"], label="Best captions", elem_id="search-captions")
        gr.Examples(EXAMPLES, inputs=image)
    private = {"api_visibility": "private"}
    button.click(on_search, [browser_id, query, dataset, checkpoint, top_k], gallery, **private)
    query.submit(on_search, [browser_id, query, dataset, checkpoint, top_k], gallery, **private)
    caption_button.click(on_match_captions, [browser_id, image, dataset, checkpoint, top_k], captions, **private)
    tab.select(on_refresh_search, browser_id, dataset, **private)
    return checkpoint
