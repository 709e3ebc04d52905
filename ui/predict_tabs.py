"""The Classify, Caption and Ask (VQA) tabs."""

from __future__ import annotations

import gradio as gr

from mmdemo import runs
from mmdemo.api import DEFAULT_CHECKPOINT
from mmdemo.errors import UserInputError

from .common import EXAMPLES, SHAPE_EXAMPLES, answer, browser_workspace, caption, classify, user_errors

IMAGE_TEXT = "image_text_classification"  # the task whose runs read a text with the image


@user_errors
def on_classify(browser_id, image, checkpoint, text=""):
    if image is None:
        raise UserInputError("Drop an image first (or click an example).")
    return classify(browser_workspace(browser_id), image, checkpoint or "", 5, text or "")


def needs_text(wsp, checkpoint: str) -> bool:
    """Whether ``checkpoint`` (a run id of the Classify list, an exported ONNX variant ``RUN_ID/onnx/FILE``, or ""
    for the default) is an image + text run."""
    from mmdemo.deploy import onnx_checkpoint

    # The default (an ImageNet classifier) and the ONNX exports (image classification only) read no text.
    if not checkpoint or onnx_checkpoint(wsp, checkpoint) is not None:
        return False
    return runs.read_config(runs.find_run(wsp, checkpoint)).get("task") == IMAGE_TEXT


@user_errors
def on_pick_checkpoint(browser_id, checkpoint):
    """The Text box shows only for a checkpoint that reads a text with the image."""
    if not browser_id:
        return gr.skip()
    return gr.update(visible=needs_text(browser_workspace(browser_id), checkpoint or ""))


def closed_answers_of(wsp, checkpoint: str) -> list[str] | None:
    """The answers a closed-answer VQA run (method answer_head) picks from; None for any other checkpoint (a run
    that generates its answers, a Hub id, the default)."""
    try:
        run_dir = runs.find_run(wsp, checkpoint) if checkpoint else None
    except UserInputError:  # a Hub id (or a typo, which Ask then names)
        return None
    meta = runs.read_json(run_dir / runs.MODEL_DIR / runs.META_FILE) if run_dir else {}
    return runs.meta_labels(meta) if meta.get("family") == "answer-head" else None


@user_errors
def on_pick_vqa_checkpoint(browser_id, checkpoint):
    """A closed-answer run: the answers it knows shown, the generation settings (which do not apply) hidden."""
    if not browser_id:
        return gr.skip(), gr.skip(), gr.skip()
    answers = closed_answers_of(browser_workspace(browser_id), checkpoint or "")
    if answers is None:
        return gr.update(value="", visible=False), gr.update(visible=True), gr.update(visible=True)
    shown = ", ".join(answers[:30]) + (f" and {len(answers) - 30} more" if len(answers) > 30 else "")
    info = (f"This run picks one of the {len(answers)} answers of its training questions (closed answers): "
            f"{shown}.")
    return gr.update(value=info, visible=True), gr.update(visible=False), gr.update(visible=False)


@user_errors
def on_caption(browser_id, image, checkpoint, max_new_tokens, beams):
    if image is None:
        raise UserInputError("Drop an image first (or click an example).")
    return caption(browser_workspace(browser_id), image, checkpoint or "", max_new_tokens, beams)


@user_errors
def on_answer(browser_id, image, question, checkpoint, max_new_tokens, beams):
    if image is None:
        raise UserInputError("Drop an image first (or click an example).")
    return answer(browser_workspace(browser_id), image, question, checkpoint or "", max_new_tokens, beams)


def build_classify_tab(extra=None):
    with gr.Tab("Classify"):
        checkpoint = gr.Dropdown(label="Checkpoint", choices=[(DEFAULT_CHECKPOINT, "")], value="", elem_id="checkpoint-choice")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", height=320, elem_id="classify-image")
                # Shown when the checkpoint is an image + text run (on_pick_checkpoint).
                text = gr.Textbox(label="Text (read with the image by this image + text run)",
                                  placeholder="what color is the shape?", elem_id="classify-text", visible=False)
            labels = gr.Label(num_top_classes=5, label="Top 5", elem_id="classify-labels")
        button = gr.Button("Classify", variant="primary", elem_id="classify-button")
        gr.Examples(EXAMPLES, inputs=image)
        if extra is not None:  # more sections on the tab's image (the zero-shot mode)
            extra(image)
    return checkpoint, image, text, labels, button


def build_text_tab(name: str, task: str, with_question: bool):
    with gr.Tab(name):
        checkpoint = gr.Dropdown(label=f"Checkpoint (a {task} run of yours, or a Hub model id)", choices=[],
                                 allow_custom_value=True, elem_id=f"{task}-checkpoint")
        with gr.Row():
            image = gr.Image(type="pil", label="Image", height=300)
            with gr.Column():
                question = gr.Textbox(label="Question", placeholder="what color is the shape?",
                                      elem_id="vqa-question") if with_question else None
                output = gr.Textbox(label="Answer" if with_question else "Caption", elem_id=f"{task}-output")
                # Shown for a closed-answer run (on_pick_vqa_checkpoint): the answers it picks from.
                info = gr.Markdown("", visible=False, elem_id=f"{task}-answers") if with_question else None
                with gr.Row():
                    max_new = gr.Slider(1, 60, value=10 if with_question else 30, step=1, label="Max new tokens")
                    beams = gr.Slider(1, 5, value=1, step=1, label="Beams (1 = greedy)")
                button = gr.Button("Ask" if with_question else "Caption", variant="primary", elem_id=f"{task}-button")
        gr.Examples(SHAPE_EXAMPLES + [e for e in EXAMPLES if e not in SHAPE_EXAMPLES], inputs=image)
    return checkpoint, image, question, output, max_new, beams, button, info
