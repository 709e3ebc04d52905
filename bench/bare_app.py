"""A bare Gradio app with the same endpoint names and signatures as mmdemo's /classify and
/training_status but trivial handlers: the baseline bench/load.py measures the real app against, on the
same machine under the same training load. Served like app.py (GRADIO_SERVER_NAME / _PORT)."""

from __future__ import annotations

import gradio as gr

LABELS = {"tabby": 0.5, "tiger cat": 0.2, "Egyptian cat": 0.1, "lynx": 0.1, "tiger": 0.1}


def classify(image: dict, checkpoint: str = "", top_k: int = 5) -> dict:
    return dict(list(LABELS.items())[:int(top_k)])


def training_status(run_id: str) -> dict:
    return {"run_id": run_id, "status": "running", "step": 1, "total_steps": 10, "train_loss": [], "val": []}


with gr.Blocks() as demo:
    gr.Markdown("bare")
    # The same concurrency limits as mmdemo's endpoints (ui/api.py), so only the handlers differ.
    gr.api(classify, api_name="classify", concurrency_limit=4)
    gr.api(training_status, api_name="training_status", concurrency_limit=None)

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=4).launch()
