"""API endpoints (gradio_client), one workspace per client session."""

from __future__ import annotations

import gradio as gr

from mmdemo import api

from .common import answer, api_workspace, caption, classify, file_path, manager, read_image, user_errors
from .search_tab import match_captions, search, zero_shot


def api_load_dataset(file: dict, task: str = "classification", request: gr.Request = None) -> dict:
    """Ingests an uploaded dataset; returns its summary."""
    summary = api.ingest(api_workspace(request), file_path(file), task)
    keys = ("dataset_id", "task", "num_train", "num_val", "num_test", "classes", "warnings", "counts")
    return {k: summary[k] for k in keys}


def api_start_training(dataset_id: str, base_model: str = "", method: str = "", epochs: int = 0,
                       learning_rate: float = 0.0, batch_size: int = 0, image_size: int = 0,
                       max_steps: int = 0, trackio: str = "", keep_old: str = "", contrastive_loss: str = "",
                       settings: dict | None = None, request: gr.Request = None) -> dict:
    """Starts fine-tuning in a child process; "" / 0 take the defaults. ``warnings`` name settings that will
    run far too long or close to the memory there is. ``trackio``: a trackio project to log the run to;
    ``keep_old``: a continued run's replay / distill / both / off; ``contrastive_loss``: a retrieval run's
    infonce / sigmoid / auto; ``settings``: any other training setting by its config name (e.g.
    {"freeze_early": "off", "label_smoothing": 0}), checked like the others."""
    wsp = api_workspace(request)
    params = dict(base_model=base_model, method=method, epochs=epochs, learning_rate=learning_rate,
                  batch_size=batch_size, image_size=image_size, max_steps=max_steps, trackio=trackio,
                  keep_old=keep_old, contrastive_loss=contrastive_loss)
    run_id = api.start(wsp, dataset_id, manager=manager(), **api.with_settings(params, settings))
    return {"run_id": run_id, "warnings": api.run_warnings(wsp, run_id)}


def api_training_status(run_id: str, request: gr.Request = None) -> dict:
    """Status, progress, loss curve and validation metrics of a run."""
    return api.status(api_workspace(request), run_id, manager=manager())


def api_stop_training(run_id: str, request: gr.Request = None) -> dict:
    """Asks a run to stop at its next step boundary (it keeps a usable checkpoint)."""
    return api.stop(api_workspace(request), run_id, manager=manager())


def api_resume_training(run_id: str, request: gr.Request = None) -> dict:
    """Continues a stopped or failed run from its last checkpoint."""
    return api.resume(api_workspace(request), run_id, manager=manager())


def api_classify(image: dict, checkpoint: str = "", top_k: int = 5, text: str = "", request: gr.Request = None) -> dict:
    """Top-k labels with probabilities for an image (and its text, for an image + text classification run)."""
    return classify(api_workspace(request), read_image(image), checkpoint, top_k, text)


def api_caption(image: dict, checkpoint: str = "", max_new_tokens: int = 30, num_beams: int = 1,
                request: gr.Request = None) -> str:
    """A caption for an image from a captioning run (or a Hub id)."""
    return caption(api_workspace(request), read_image(image), checkpoint, max_new_tokens, num_beams)


def api_answer(image: dict, question: str, checkpoint: str = "", max_new_tokens: int = 10, num_beams: int = 1,
               request: gr.Request = None) -> str:
    """The answer to a question about an image, from a VQA run (or a Hub id)."""
    return answer(api_workspace(request), read_image(image), question, checkpoint, max_new_tokens, num_beams)


def api_push_to_hub(run_id: str, repo_id: str, token: str = "", private: bool = True, request: gr.Request = None) -> dict:
    """Pushes a finished run's model and model card to the Hub; returns {url, files}."""
    return api.push(api_workspace(request), run_id, repo_id, token, private)


def api_export_onnx(run_id: str, quantize: str = "int8,fp16", request: gr.Request = None) -> dict:
    """Exports a classification run (or a captioning / VQA run of the offline composed captioner: encoder.onnx +
    decoder.onnx) to ONNX (fp32, plus int8 / fp16 as asked, comma-separated) and measures each file: {variants:
    [{variant, file, accuracy, delta_points, agreement, size_mb, latency_ms_p50, latency_ms_p95, best, warning}],
    best, warnings, ...} (captioning / VQA: ``accuracy`` holds ``metric``, CIDEr-D or VQA accuracy). Classify then
    takes checkpoint "RUN_ID/onnx/model_int8.onnx"."""
    lab = api.export_onnx(api_workspace(request), run_id, quantize=[q for q in (quantize or "").split(",") if q.strip()])
    lab.pop("files", None)
    return lab


def api_list_runs(request: gr.Request = None) -> list:
    """This session's runs with task, base model, method, status and metrics."""
    return api.list_runs(api_workspace(request), manager=manager())


def api_search(query: str, dataset_id: str, checkpoint: str = "", top_k: int = 5, request: gr.Request = None) -> list:
    """The images of one of your datasets that best match a text: [{file_name, score}], best first; checkpoint ""
    = your newest finished retrieval run."""
    return search(api_workspace(request), query, dataset_id, checkpoint, top_k)


def api_search_captions(image: dict, dataset_id: str, checkpoint: str = "", top_k: int = 5,
                        request: gr.Request = None) -> list:
    """The captions of one of your datasets that best match an image: [{caption, score}], best first."""
    return match_captions(api_workspace(request), read_image(image), dataset_id, checkpoint, top_k)


def api_zero_shot(image: dict, labels: str, checkpoint: str = "", template: str = "a photo of a {}.",
                  request: gr.Request = None) -> dict:
    """{label: probability} for an image and comma-separated labels; checkpoint "" = the offline classifier, else a
    retrieval run id of yours or a CLIP / SigLIP Hub id."""
    return zero_shot(api_workspace(request), read_image(image), labels, checkpoint, template)


def api_baselines(dataset_id: str, request: gr.Request = None) -> dict:
    """A classification dataset's baselines without fine-tuning (k-shot curve, full-data linear probe and
    nearest class mean on the validation split) and the recommended recipe with its predicted time."""
    return api.dataset_baselines(api_workspace(request), dataset_id)


def api_compare_runs(run_ids: list[str], request: gr.Request = None) -> dict:
    """Two or more runs of this session side by side: curves, settings that differ, metric deltas."""
    return api.compare_runs(api_workspace(request), run_ids)


def api_method_plan(dataset_id: str, base_model: str = "", method: str = "", request: gr.Request = None) -> dict:
    """Before launch: {method, trainable_params, total_params, share, layers, text} of a method on a base model."""
    return api.method_plan(api_workspace(request), dataset_id, base_model, method)


def api_start_bakeoff(dataset_id: str, base_model: str = "", steps: int = 0, image_size: int = 0,
                      request: gr.Request = None) -> dict:
    """Runs every applicable method with the same step budget (0 = 60 steps) and image size (0 = the model's);
    returns {bakeoff_id, methods, skipped, steps}."""
    return api.start_bakeoff(api_workspace(request), dataset_id, base_model, steps, image_size, manager=manager())


def api_bakeoff_status(bakeoff_id: str, request: gr.Request = None) -> dict:
    """The bake-off table: {rows: [{method, status, trainable_params, peak_memory_mb, step_time_s, adapter_mb,
    metric, value, pick}], done, pick, steps, base_model}."""
    return api.bakeoff_status(api_workspace(request), bakeoff_id, manager=manager())


def api_distill(teacher: str, student: str = "", baseline: bool = True, images: dict | None = None, epochs: int = 0,
                image_size: int = 0, max_steps: int = 0, distill_temperature: float = 4.0, distill_alpha: float = 0.5,
                request: gr.Request = None) -> dict:
    """Queues a student ("" = efficientnet_lite0) trained on the soft labels of ``teacher`` (a finished
    classification run id of yours) over its dataset, plus an optional zip of unlabelled images; ``baseline``
    queues the student alone first. Returns {run_id, baseline_run_id}."""
    return api.distill(api_workspace(request), teacher, student, baseline=bool(baseline),
                       images=file_path(images) or None, manager=manager(), epochs=epochs, image_size=image_size,
                       max_steps=max_steps, distill_temperature=distill_temperature, distill_alpha=distill_alpha)


def api_distill_report(run_id: str, request: gr.Request = None) -> dict:
    """A distilled run's comparison: {teacher, temperature, alpha, unlabelled_images, rows: [{model, base_model,
    accuracy, latency_ms_p50, params, image_size, agreement_with_teacher}]}; {} for a run without a teacher."""
    return api.distill_report(api_workspace(request), run_id)


def register_api() -> None:
    for fn, name, limit in [(api_load_dataset, "load_dataset", 2), (api_start_training, "start_training", 4),
                            (api_training_status, "training_status", None), (api_stop_training, "stop_training", None),
                            (api_resume_training, "resume_training", 4), (api_classify, "classify", 4),
                            (api_caption, "caption", 4), (api_answer, "answer", 4), (api_push_to_hub, "push_to_hub", 2),
                            (api_export_onnx, "export_onnx", 1),
                            (api_list_runs, "list_runs", None), (api_method_plan, "method_plan", 2),
                            (api_start_bakeoff, "start_bakeoff", 2), (api_bakeoff_status, "bakeoff_status", None)]:
        gr.api(user_errors(fn), api_name=name, concurrency_limit=limit)
    for fn, name in [(api_search, "search"), (api_search_captions, "search_captions"), (api_zero_shot, "zero_shot")]:
        gr.api(user_errors(fn), api_name=name, concurrency_limit=4)
    for fn, name, limit in [(api_baselines, "baselines", 2), (api_compare_runs, "compare_runs", None),
                            (api_distill, "distill", 2), (api_distill_report, "distill_report", 2)]:
        gr.api(user_errors(fn), api_name=name, concurrency_limit=limit)
