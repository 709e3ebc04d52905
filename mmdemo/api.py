"""The engine's public surface: one call per thing the UI, the API endpoints or a script does.

Every call takes a workspace folder (the datasets and runs of one user) and plain values, and raises
``UserInputError`` with a message fit to show. Importing this module loads no torch: inference and
training load it when they run. The calls that queue training share one process-wide job manager
(``job_manager()``) unless they are given another.

    from mmdemo import api
    ds = api.ingest("ws", "assets/sample_shapes.zip")["dataset_id"]
    run = api.start("ws", ds, epochs=1)
    api.status("ws", run)["status"]
"""

from __future__ import annotations

import threading
from pathlib import Path

from . import jobs
from .config import form_params
from .errors import UserInputError
from .runs import find_run

DEFAULT_CHECKPOINT = "ImageNet classifier (efficientnet_lite0, offline)"  # the label that means "no checkpoint"

_manager: jobs.JobManager | None = None
_manager_lock = threading.Lock()


def job_manager() -> jobs.JobManager:
    """The process's job manager, created on first use (it starts a watcher thread); the lock keeps two
    first calls from creating two queues."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = jobs.JobManager()
        return _manager


def ingest(workspace: Path, source: str, task: str = "classification") -> dict:
    """Checks and saves a dataset (zip, folder, csv / jsonl, Hub id) in the workspace; returns its summary."""
    from .data import ingest_dataset

    if not source:
        raise UserInputError("No dataset given: choose a zip, csv or jsonl file, or give a Hub dataset id.")
    return ingest_dataset(source, workspace, task=task or "classification").to_dict()


def list_datasets(workspace: Path) -> list:
    """The workspace's ingested datasets (DatasetSummary), newest first."""
    from .data import load_summary

    paths = sorted((Path(workspace) / "datasets").glob("*/summary.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [load_summary(path.parent) for path in paths]


def dataset_previews(workspace: Path, dataset_id: str) -> dict:
    """A few example images per class (or per split) of an ingested dataset."""
    from .data import find_dataset, preview_images

    return preview_images(find_dataset(workspace, dataset_id))


def training_plan(workspace: Path, dataset_id: str) -> dict:
    """What a run on this dataset gets by default: ``{"task", "method", "cpu_seconds"}``, the method the defaults
    pick for this data (VQA: the closed-answer classifier where the answers form a closed list) and the seconds a
    rough duration of the default recipe on a 2-core CPU, or None where a GPU is visible."""
    from .config import TrainConfig
    from .data import find_dataset, load_summary

    summary = load_summary(find_dataset(workspace, dataset_id))
    cfg = TrainConfig(data=summary.path, output_dir="-", task=summary.task)
    seconds = None if jobs.has_gpu() else jobs.estimate_cpu_seconds(summary, cfg)
    return {"task": summary.task, "method": cfg.method, "cpu_seconds": seconds}


def dataset_baselines(workspace: Path, dataset_id: str) -> dict:
    """What a classification dataset gets without fine-tuning, and the recipe to start with: the frozen
    offline backbone's k-shot curve (nearest class mean, linear probe) and full-data baselines on the
    validation split, the recommended method and its predicted time (see mmdemo.baselines)."""
    from .baselines import baseline_report
    from .data import find_dataset

    return baseline_report(find_dataset(workspace, dataset_id))


def compare_runs(workspace: Path, run_ids: list[str]) -> dict:
    """Two or more runs of this workspace side by side: curves, differing settings, metric deltas."""
    from .compare import compare_runs as compare

    if isinstance(run_ids, str):
        run_ids = [r for r in run_ids.replace(",", " ").split() if r]
    return compare([find_run(workspace, run_id) for run_id in run_ids or []])


def start(workspace: Path, dataset_id: str, *, manager: jobs.JobManager | None = None, **params) -> str:
    """Queues a training run on an ingested dataset; ``params`` are TrainConfig fields ("" / None / 0: the
    defaults). Returns the run id."""
    from .data import find_dataset, load_summary

    dataset_dir = find_dataset(workspace, dataset_id)
    # The dataset knows its task; an empty base model then means that task's default model.
    cfg = jobs.new_run_config(workspace, dataset_dir, task=load_summary(dataset_dir).task, **form_params(params))
    return jobs.start_training(cfg, manager or job_manager())


# Fields the app sets itself: a caller's settings never name them.
APP_FIELDS = ("data", "output_dir", "task", "num_processes", "extra")


def with_settings(params: dict, settings) -> dict:
    """``params`` plus a caller's ``settings`` (TrainConfig fields by name; a setting given both ways must agree):
    unknown names, the fields the app sets and a value that is not a mapping are refused by name."""
    if settings in (None, ""):
        return params
    if not isinstance(settings, dict):
        raise UserInputError(f"settings must be a mapping of setting name to value, e.g. {{\"freeze_early\": \"off\"}} "
                             f"(got {type(settings).__name__})")
    fixed = sorted(set(settings) & set(APP_FIELDS))
    if fixed:
        raise UserInputError(f"settings cannot set {', '.join(fixed)}: the app sets them (the dataset gives the task).")
    clash = sorted(k for k, v in settings.items() if params.get(k) not in (None, "", 0) and params[k] != v)
    if clash:
        raise UserInputError(f"{', '.join(clash)} given twice with different values (as a parameter and in settings); "
                             "give each once.")
    return {**params, **settings}


def distill(workspace: Path, teacher: str, student: str = "", *, dataset_id: str = "", baseline=True, images=None,
            manager: jobs.JobManager | None = None, **params) -> dict:
    """Queues a student trained on the soft labels of ``teacher`` (a finished classification run of this
    workspace) over that run's dataset (or ``dataset_id``, same classes); ``images``: a zip of unlabelled
    images the teacher labels too; ``baseline``: True queues the student alone first, a run id names one.
    ``params`` are TrainConfig fields. Returns ``{"run_id", "baseline_run_id"}``."""
    import uuid

    from .data import find_dataset
    from .distill import prepare_images
    from .refs import resolve_model_ref
    from .runs import read_config

    manager = manager or job_manager()
    teacher_dir = Path(resolve_model_ref(teacher, workspace, field="teacher"))
    if not teacher_dir.is_absolute():
        raise UserInputError("teacher must be a finished classification run of yours (its run id).")
    dataset_id = dataset_id or Path(read_config(teacher_dir).get("data", "")).name
    dataset_dir = find_dataset(workspace, dataset_id)
    params = dict(form_params(params), base_model=student or "efficientnet_lite0")
    # Everything the distilled run needs is checked before the student alone is queued, its memory (the
    # teacher's included) too.
    jobs.check_run_memory(jobs.new_run_config(workspace, dataset_dir, task="classification", teacher=teacher_dir.name,
                                              **params))
    if images:
        params["distill_images"] = prepare_images(images, Path(workspace) / "unlabelled" / uuid.uuid4().hex)
    baseline_id = None
    if baseline is True:
        baseline_id = start(workspace, dataset_id, manager=manager, **params_without(params, "distill_images"))
        params["distill_baseline"] = baseline_id
    elif baseline:
        params["distill_baseline"] = str(baseline)
    cfg = jobs.new_run_config(workspace, dataset_dir, task="classification", teacher=teacher_dir.name, **params)
    return {"run_id": jobs.start_training(cfg, manager), "baseline_run_id": baseline_id}


def params_without(params: dict, *names: str) -> dict:
    return {k: v for k, v in params.items() if k not in names}


def distill_report(workspace: Path, run_id: str) -> dict:
    """A distilled run's comparison (teacher, student, student alone): ``{teacher, temperature, alpha, rows}``,
    a baseline that finished after the run measured now; {} for a run without a teacher."""
    from .distill import refresh_report

    return refresh_report(find_run(workspace, run_id))


def status(workspace: Path, run_id: str, *, manager: jobs.JobManager | None = None) -> dict:
    """A run's status snapshot: state, progress, loss curve, validation metrics, message."""
    return jobs.run_status(find_run(workspace, run_id), manager or job_manager())


def stop(workspace: Path, run_id: str, *, manager: jobs.JobManager | None = None) -> dict:
    """Asks a run to stop at its next step boundary (it keeps a usable checkpoint)."""
    manager = manager or job_manager()
    manager.stop(find_run(workspace, run_id))
    return {"status": status(workspace, run_id, manager=manager)["status"]}


def run_warnings(workspace: Path, run_id: str) -> list[str]:
    """What to tell the user about a run just started: far too many epochs, days on the CPU, memory close
    to what there is."""
    return jobs.run_warnings(find_run(workspace, run_id))


def resume(workspace: Path, run_id: str, *, manager: jobs.JobManager | None = None) -> dict:
    """Continues a stopped or failed run from its last checkpoint."""
    return jobs.resume_training(find_run(workspace, run_id), manager or job_manager())


def list_runs(workspace: Path, *, manager: jobs.JobManager | None = None) -> list[dict]:
    """The workspace's runs, newest first, with task, base model, method, status and metrics."""
    return jobs.list_runs(workspace, manager or job_manager())


def resolve_checkpoint(workspace: Path, checkpoint: str) -> str | None:
    """A run id of this user -> its run directory; a model name or Hub id as is; "" or the default's label ->
    None (the default). Never a path (unless MMDEMO_ALLOW_LOCAL_MODELS=1): see mmdemo.refs."""
    from .refs import local_models_allowed, resolve_model_ref

    if isinstance(checkpoint, str) and checkpoint.strip() == DEFAULT_CHECKPOINT:
        return None
    return resolve_model_ref(checkpoint, workspace, field="checkpoint", allow_local=local_models_allowed()) or None


def classify(workspace: Path, image, checkpoint: str = "", top_k: int = 5, text: str = "") -> dict:
    """Top-k labels with probabilities for a PIL image ("" checkpoint: the offline ImageNet classifier);
    ``text`` goes with the image for an image + text classification run (which needs it)."""
    from .deploy import classify_onnx, onnx_checkpoint

    exported = onnx_checkpoint(workspace, checkpoint)  # RUN_ID/onnx/model_int8.onnx: the run's ONNX export
    if exported is not None:
        return classify_onnx(image, exported, top_k)
    from .inference import classify as classify_image

    return classify_image(image, resolve_checkpoint(workspace, checkpoint), top_k, text)


def preload_classifier() -> None:
    """Loads and runs the offline default classifier once (mmdemo.inference.preload): a server calls it
    in the background once it serves."""
    from .inference import preload

    preload()


def caption(workspace: Path, image, checkpoint: str = "", max_new_tokens: int = 30, num_beams: int = 1) -> str:
    """A caption for a PIL image from a captioning run of this workspace (or a Hub id)."""
    from .inference import caption as caption_image

    return caption_image(image, resolve_checkpoint(workspace, checkpoint), max_new_tokens, num_beams)


def answer(workspace: Path, image, question: str, checkpoint: str = "", max_new_tokens: int = 10,
           num_beams: int = 1) -> str:
    """The answer to a question about a PIL image, from a VQA run of this workspace (or a Hub id)."""
    from .inference import answer as answer_question

    return answer_question(image, question, resolve_checkpoint(workspace, checkpoint), max_new_tokens, num_beams)


def push(workspace: Path, run_id: str, repo_id: str, token: str = "", private: bool = True) -> dict:
    """Pushes a finished run's model and card to the Hub; returns ``{"url", "files"}``."""
    from .hub import push_run_api

    return push_run_api(find_run(workspace, run_id), (repo_id or "").strip(), token or "", bool(private))


def export(workspace: Path, run_id: str, out_dir: Path, *, repo_id: str | None = None) -> list[str]:
    """Writes what a push would upload into ``out_dir``, offline; returns the files written."""
    from .hub import export_run

    return export_run(find_run(workspace, run_id), out_dir, repo_id=repo_id)


def export_onnx(workspace: Path, run_id: str, quantize=("int8", "fp16"), **options) -> dict:
    """Exports a classification run (or a captioning / VQA run of the composed captioner) to ONNX into RUN/onnx/
    (replacing an earlier export) and measures each variant (see mmdemo.deploy.export_onnx_run); returns
    export.json's content. The Classify tab then runs a classifier's as ``RUN_ID/onnx/model.onnx``,
    ``.../model_int8.onnx``, ``.../model_fp16.onnx``."""
    import shutil

    from .deploy import RUN_ONNX_DIR, check_request, export_onnx_run

    quantize = check_request("onnx", quantize)
    run_dir = find_run(workspace, run_id)
    out = run_dir / RUN_ONNX_DIR
    shutil.rmtree(out, ignore_errors=True)
    return export_onnx_run(run_dir, out, quantize=quantize, **options)


def _retrieval_checkpoint(workspace: Path, checkpoint: str) -> str:
    """A retrieval checkpoint as the engine takes it; "" = this workspace's newest finished retrieval run."""
    resolved = resolve_checkpoint(workspace, checkpoint)
    if resolved:
        return resolved
    runs = [r for r in list_runs(workspace) if r.get("task") == "retrieval" and r.get("status") in ("completed", "stopped")]
    if not runs:
        raise UserInputError("No retrieval model yet: fine-tune one on a captioned image set (e.g. the retrieval "
                             "sample) and search with its run, or give a CLIP / SigLIP Hub id such as "
                             "openai/clip-vit-base-patch32 (needs the Hub).")
    return resolve_checkpoint(workspace, runs[0]["run_id"])


def search(workspace: Path, query: str, dataset_id: str, checkpoint: str = "", top_k: int = 5) -> list[dict]:
    """The ``top_k`` images of one of this workspace's datasets that best match a text: ``[{file_name, score}]``,
    best first; checkpoint "" = the newest finished retrieval run here (image embeddings cached on disk)."""
    from .data import find_dataset
    from .imagesearch import check_query, search_images

    query = check_query(query)
    dataset_dir = find_dataset(workspace, dataset_id)
    return search_images(query, dataset_dir, _retrieval_checkpoint(workspace, checkpoint), top_k)


def match_captions(workspace: Path, image, dataset_id: str, checkpoint: str = "", top_k: int = 5) -> list[dict]:
    """The captions of one of this workspace's datasets that best match an image: ``[{caption, score}]``."""
    from .data import find_dataset
    from .imagesearch import search_captions

    dataset_dir = find_dataset(workspace, dataset_id)
    return search_captions(image, dataset_dir, _retrieval_checkpoint(workspace, checkpoint), top_k)


def zero_shot(workspace: Path, image, labels, checkpoint: str = "", template: str = "a photo of a {}.") -> dict:
    """``{label: probability}`` for a PIL image and free-text labels (comma-separated); checkpoint "" = the
    offline ImageNet-based classifier, else a retrieval run of this workspace or a CLIP / SigLIP Hub id."""
    from .zeroshot import zero_shot_batch

    if image is None:
        raise UserInputError("No image given: give an image to classify.")
    return zero_shot_batch([image], labels, resolve_checkpoint(workspace, checkpoint) or "", template)[0]


def method_plan(workspace: Path, dataset_id: str, base_model: str = "", method: str = "") -> dict:
    """What a method trains on a base model for this dataset, before launch: trainable / total parameters
    and the layers it adapts (see mmdemo.bakeoff.method_plan)."""
    from .bakeoff import method_plan as plan
    from .data import find_dataset, load_summary

    summary = load_summary(find_dataset(workspace, dataset_id))
    # The method given: the config then resolves no default method (VQA's reads every answer of the dataset).
    cfg = jobs.new_run_config(workspace, find_dataset(workspace, dataset_id), task=summary.task, base_model=base_model,
                              method=method)
    return plan(summary.task, cfg.base_model, list(summary.classes or []), method)


def start_bakeoff(workspace: Path, dataset_id: str, base_model: str = "", steps: int = 0, image_size: int = 0, *,
                  manager: jobs.JobManager | None = None) -> dict:
    """Queues one run per applicable method with the same step budget; returns {bakeoff_id, methods,
    skipped, steps}."""
    from .bakeoff import start_bakeoff as start_all
    from .checks import as_int
    from .data import find_dataset

    return start_all(workspace, find_dataset(workspace, dataset_id), manager or job_manager(), base_model or "",
                     as_int("steps", steps or 0), as_int("image_size", image_size or 0))


def bakeoff_status(workspace: Path, bakeoff_id: str, *, manager: jobs.JobManager | None = None) -> dict:
    """The bake-off table so far: {rows, done, pick, steps, base_model}."""
    from .bakeoff import bakeoff_table

    return bakeoff_table(workspace, bakeoff_id, manager or job_manager())
