"""The run directory contract: its file names, and reading and writing them (no torch here).

A run directory is the source of truth about a run; the training child writes it, the job manager,
the UI, the API and the Hub export read it::

    config.yaml      the resolved TrainConfig (written before the run, completed by training once the
                     model and the data fix image_size and epochs)
    status.json      {"status": queued|running|completed|failed|stopped, "total_steps", "message", ...}
    metrics.jsonl    one JSON object per log step ("train"), per evaluation ("eval"), plus "start" / "end"
    checkpoint-N/    model + optimizer + loop state; ``latest`` names the newest complete one
    model/           the fine-tuned model with mmdemo.json (task, family, labels); adapter/ for LoRA
    eval.json        final metrics, per-class P/R/F1, confusion matrix, misclassified / example rows
    train.log        the training child's stdout and stderr
    STOP             created by whoever wants the run to stop at the next step boundary

Runs live in ``WORKSPACE/runs/<32 hex digits>/``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from .errors import UserInputError

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
STOP_FILE = "STOP"
LATEST_FILE = "latest"
MODEL_DIR = "model"
EVAL_FILE = "eval.json"
LOG_FILE = "train.log"
META_FILE = "mmdemo.json"  # inside model/: what the model is (task, family, labels, preprocessing)
CONFUSION_PLOT = "confusion_matrix.png"

ID_RE = re.compile(r"^[0-9a-f]{32}$")
ACTIVE = ("queued", "running", "stopping")  # "stopping": a stop was asked for, the child is still saving


def read_json(path) -> dict:
    """A JSON object that the engine wrote into a workspace (status, summary, report...), or {} when the
    file is missing, being rewritten, or holds no object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def meta_labels(meta: dict) -> list[str]:
    """The labels of a model's mmdemo.json (``id2label``; a closed-answer VQA run's answers) in output order."""
    id2label = meta.get("id2label", {})
    return [id2label[str(i)] for i in range(len(id2label))]


def write_json_atomic(path: Path, obj) -> None:
    """Readers (the UI polling status) never see a half-written file: temp file + rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    from .progress import dumps  # strict JSON: NaN / infinity become null

    tmp.write_text(dumps(obj, indent=1))
    tmp.replace(path)


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the checkpoint that ``latest`` names, or None when there is no complete one."""
    try:
        name = (Path(run_dir) / LATEST_FILE).read_text().strip()
        step = int(name.removeprefix("checkpoint-"))
    except (OSError, ValueError):
        return None
    return step if (Path(run_dir) / name / "state.json").is_file() else None


def resume_advice(run_dir: Path) -> str:
    """What Resume will do for this run: continue from its checkpoint, or start again without one."""
    step = checkpoint_step(run_dir)
    if step is None:
        return "No checkpoint was saved yet: press Resume to start it again from the beginning."
    return f"The checkpoint at step {step} is kept: press Resume to continue from it."


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_status(run_dir: Path, status: str, **fields) -> None:
    path = Path(run_dir) / STATUS_FILE
    old = json.loads(path.read_text()) if path.exists() else {}
    write_json_atomic(path, {**old, **fields, "status": status, "updated": time.time()})


def read_status_file(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / STATUS_FILE)


def read_metrics(run_dir: Path) -> list[dict]:
    """All complete lines of metrics.jsonl (a line being written is skipped until it is whole)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    try:
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):
                    records.append(json.loads(line))
    except FileNotFoundError:
        pass
    return records


def read_config(run_dir: Path) -> dict:
    """config.yaml as a plain dict ({} when missing or unreadable): for readers that only show it."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    return cfg if isinstance(cfg, dict) else {}


def runs_dir(workspace) -> Path:
    return Path(workspace) / "runs"


def find_run(workspace, run_id: str) -> Path:
    """The run directory for ``run_id`` inside this workspace, or a UserInputError."""
    run_id = (run_id or "").strip()
    run_dir = runs_dir(workspace) / run_id
    if not ID_RE.match(run_id) or not (run_dir / CONFIG_FILE).is_file():
        raise UserInputError(f"Unknown run id '{run_id[:40]}'. Start a training run first, or pick one from the list.")
    return run_dir


def model_dir_of(checkpoint: str | Path) -> Path | None:
    """A run directory or a model folder (an absolute path: see refs.local_dir) -> the folder holding
    mmdemo.json; None for anything else."""
    from .refs import local_dir

    path = local_dir(checkpoint)
    if path is None:
        return None
    for candidate in (path / MODEL_DIR, path):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def read_eval(run_dir: Path) -> dict:
    """The final evaluation (eval.json), or {} before the run has one."""
    return read_json(Path(run_dir) / EVAL_FILE)


REPORT_TEXT_METRICS = ("val_loss", "vqa_accuracy", "exact_match", "bleu4", "rouge_l", "cider",
                       *(f"{d}_{m}" for d in ("t2i", "i2t") for m in ("recall@1", "recall@5", "recall@10", "median_rank")))
REPORT_QUERIES = 4  # a retrieval report's gallery: the first example queries, each with its top 5 images


def report_rows(result: dict) -> list[dict]:
    """The report table of an evaluation: classification, one row for all classes, then one per class;
    captioning / VQA / retrieval, one row per metric."""
    if result.get("task", "classification") == "classification":
        return ([{"class": "all", "precision": None, "recall": None, "f1": None, "support": result["num_val"],
                  "accuracy": result["accuracy"]}]
                + [{"class": c, **m, "accuracy": None} for c, m in result["per_class"].items()]
                + forgetting_rows(result))
    return [{"metric": k, "value": result[k]} for k in REPORT_TEXT_METRICS if k in result] + forgetting_rows(result)


def forgetting_rows(result: dict) -> list[dict]:
    """A continued run's forgetting table as report rows: old classes on the previous run's validation split
    (accuracy before -> after), new classes on this run's."""
    rows = result.get("forgetting") or []
    if rows and "metric" in rows[0]:  # captioning / VQA: one row per metric and split, before -> after
        where = {"old": "previous run's validation", "new": "this run's validation"}
        return [{"metric": f"{r['metric']} ({where[r['group']]})", "value": r["after"], "before": r["before"],
                 "support": r["support"]} for r in rows]
    where = {"old": "old class, previous run's validation", "new": "new class"}
    return [{"class": f"{r['class']} ({where[r['group']]})", "support": r["support"], "accuracy": r["after"],
             "accuracy before": r["before"]} for r in rows]


def report_examples(run_dir: Path, limit: int = 24) -> list[tuple]:
    """(image, caption) pairs for the report gallery: the misclassified validation images
    ("true → predicted"), for captioning / VQA the reference vs the predicted text, for retrieval the
    example queries' top images."""
    from .data import load_splits

    result = read_eval(run_dir)
    if result.get("task") == "retrieval":
        return _query_examples(run_dir, result.get("examples") or [], limit)
    rows = (result.get("misclassified") or result.get("examples") or [])[:limit]
    if not rows:
        return []
    validation = load_splits(read_config(run_dir).get("data", ""))["validation"]
    return [(validation[r["row"]]["image"], _example_caption(r)) for r in rows]


def _query_examples(run_dir: Path, queries: list[dict], limit: int) -> list[tuple]:
    """A retrieval run's example queries on its held-out images: each query's top images in rank order,
    captioned with the query, the rank, the file, the cosine and whether it is a true match."""
    from .imagesearch import images_by_name

    hits = [(q["query"], rank, hit) for q in queries[:REPORT_QUERIES] for rank, hit in enumerate(q["top"], 1)][:limit]
    images = images_by_name(read_config(run_dir).get("data", ""), [hit["file_name"] for _, _, hit in hits])
    return [(images[hit["file_name"]], f"“{query}” #{rank}: {hit['file_name']} · {hit['score']:.3f}"
             f"{' ✓' if hit.get('match') else ''}") for query, rank, hit in hits if hit["file_name"] in images]


def _example_caption(row: dict) -> str:
    if "label" in row:
        text = f"{row['text']} · " if row.get("text") else ""  # image + text classification: the row's text
        return f"{text}{row['label']} → {row['predicted']}"
    question = f"{row['question']} " if row.get("question") else ""
    return f"{question}ref: {row['references'][0]} · predicted: {row['predicted']}"
