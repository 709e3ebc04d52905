"""The PEFT bake-off: every method that applies, on one dataset, with one fixed budget, side by side.

``start_bakeoff`` queues one run per method (the same base model, batch size and number of optimizer
steps; each method's own learning rate) through the job manager, and records them in
``WORKSPACE/bakeoffs/<id>.json``. ``bakeoff_table`` reads the runs back: trainable parameters, peak
memory, step time, adapter size, the validation metric; the cheapest method (fewest trainable parameters)
within one point of the best is the pick. ``method_plan`` is what the Train tab shows before a launch:
the trainable-parameter count and the layers a method touches. No torch at import.
"""

from __future__ import annotations

import math
import statistics
import uuid
from pathlib import Path

from .errors import UserInputError
from .runs import EVAL_FILE, MODEL_DIR, find_run, read_json, read_metrics, write_json_atomic

BAKEOFF_DIR = "bakeoffs"
DEFAULT_STEPS = 60
BATCH_SIZE = 16
# "Within one point": metrics are fractions (accuracy 0.93), so one point is 0.01.
ONE_POINT = 0.01


def _build(task: str, base_model: str, labels: list[str], method: str, lora_r: int = 8, lora_alpha: int = 16):
    """The model ``method`` would train, untrained (pretrained weights are not needed to count)."""
    if task == "classification":
        from .models import apply_method, build_classifier

        clf, _ = build_classifier(base_model, labels, pretrained=False)
        return apply_method(clf, method, lora_r, lora_alpha)
    if task == "vqa" and method == "answer_head":  # a classifier over the answers (the summary's most frequent)
        from .vlm.answers import build_answer_model

        return build_answer_model(base_model, labels or ["yes", "no"], 0, False)
    if task in ("captioning", "vqa"):
        from .vlm import apply_text_method, build_image_text_model

        model = build_image_text_model(task, base_model, 0, False)
        apply_text_method(model, method, lora_r, lora_alpha)
        return model
    raise UserInputError(f"The bake-off and the parameter count cover classification, captioning and vqa "
                         f"(got {task}); train its methods one by one.")


def method_plan(task: str, base_model: str, labels: list[str], method: str, lora_r: int = 8,
                lora_alpha: int = 16) -> dict:
    """What ``method`` trains on ``base_model``: {"method", "trainable_params", "total_params", "share",
    "layers" (the adapted modules; the head trains as well), "text"}."""
    from .config import DEFAULT_MODELS, TASK_METHODS
    from .models import count_parameters
    from .peft_methods import touched_layers

    method = method or TASK_METHODS[task][0]
    if method not in TASK_METHODS[task]:
        raise UserInputError(f"method must be one of {', '.join(TASK_METHODS[task])} for {task} (got {method!r})")
    model = _build(task, base_model or DEFAULT_MODELS[task], labels, method, lora_r, lora_alpha)
    trainable, total = count_parameters(model)
    layers = touched_layers(model, method) if task == "classification" else []
    share = trainable / total if total else 0.0
    where = f"; adapts {len(layers)} layers ({', '.join(layers[:4])}{', …' if len(layers) > 4 else ''}) + the head" \
        if layers else ""
    if method == "prompt_tuning":
        from .vlm import PROMPT_TOKENS

        where = f"; {PROMPT_TOKENS} learned vectors in front of the frozen text decoder's input"
    return {"method": method, "trainable_params": trainable, "total_params": total, "share": round(share, 5),
            "layers": layers,
            "text": f"{method}: {trainable:,} of {total:,} parameters train ({100 * share:.2f}%){where}"}


def applicable_methods(task: str, base_model: str, labels: list[str]) -> tuple[list[str], dict]:
    """(methods that apply to this base model, {method: why not} for the others)."""
    from .config import TASK_METHODS

    methods, skipped = [], {}
    for method in TASK_METHODS[task]:
        try:
            _build(task, base_model, labels, method)
            methods.append(method)
        except UserInputError as e:
            if method == TASK_METHODS[task][0]:
                raise  # the base model itself cannot be built: nothing applies
            skipped[method] = str(e)
    return methods, skipped


def start_bakeoff(workspace: Path, dataset_dir: Path, manager, base_model: str = "", steps: int = 0,
                  image_size: int = 0) -> dict:
    """Queues one run per applicable method (``image_size`` 0: the model's own); returns {"bakeoff_id",
    "methods", "skipped", "steps"}."""
    from . import jobs
    from .config import DEFAULT_MODELS
    from .data import load_summary

    summary = load_summary(dataset_dir)
    steps = int(steps or DEFAULT_STEPS)
    if not 1 <= steps <= 10_000:
        raise UserInputError(f"steps must be between 1 and 10000 per method (got {steps})")
    cfg0 = jobs.new_run_config(workspace, dataset_dir, task=summary.task, base_model=base_model)
    base = cfg0.base_model or DEFAULT_MODELS[summary.task]
    methods, skipped = applicable_methods(summary.task, base, list(summary.classes or []))
    # Enough epochs for the step budget to bind (every method sees the same images).
    epochs = max(1, math.ceil(steps / max(1, summary.num_train // BATCH_SIZE)))
    runs = {}
    for method in methods:
        cfg = jobs.new_run_config(workspace, dataset_dir, task=summary.task, base_model=base_model, method=method,
                                  max_steps=steps, epochs=epochs, batch_size=BATCH_SIZE, image_size=image_size)
        runs[method] = jobs.start_training(cfg, manager)
    bakeoff_id = uuid.uuid4().hex
    record = {"bakeoff_id": bakeoff_id, "dataset_dir": str(dataset_dir), "task": summary.task, "base_model": base,
              "steps": steps, "batch_size": BATCH_SIZE, "image_size": image_size, "runs": runs, "skipped": skipped}
    folder = Path(workspace) / BAKEOFF_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"{bakeoff_id}.json", record)
    return {"bakeoff_id": bakeoff_id, "methods": methods, "skipped": skipped, "steps": steps}


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def run_row(run_dir: Path, status: str) -> dict:
    """One bake-off row from a run directory's metrics.jsonl and eval.json."""
    records = read_metrics(run_dir)
    start = next((r for r in records if r.get("type") == "start"), {})
    end = next((r for r in reversed(records) if r.get("type") == "end"), {})
    step_times = [r["step_time"] for r in records if r.get("type") == "train" and "step_time" in r]
    result = read_json(run_dir / EVAL_FILE) if (run_dir / EVAL_FILE).exists() else {}
    metric = next((k for k in ("accuracy", "vqa_accuracy", "cider") if k in result), None)
    trainable = start.get("trainable_params")
    # The adapter's own files where it has them; else what changed: the trainable tensors in fp32.
    adapter = _folder_bytes(run_dir / MODEL_DIR / "adapter") or (4 * trainable if trainable else 0)
    return {"status": status, "trainable_params": trainable, "total_params": start.get("total_params"),
            "peak_memory_mb": end.get("peak_memory_mb"),
            "step_time_s": round(statistics.median(step_times), 4) if step_times else None,
            "adapter_mb": round(adapter / 2**20, 3) if adapter else None,
            "metric": metric, "value": result.get(metric) if metric else None}


def mark_pick(rows: list[dict]) -> str | None:
    """Marks (``pick`` True) the row with the fewest trainable parameters among the finished ones whose
    metric is within ONE_POINT of the best; returns its method."""
    done = [r for r in rows if r.get("value") is not None and r.get("trainable_params") is not None]
    for r in rows:
        r["pick"] = False
    if not done:
        return None
    best = max(r["value"] for r in done)
    close = [r for r in done if r["value"] >= best - ONE_POINT - 1e-9]
    pick = min(close, key=lambda r: (r["trainable_params"], r.get("adapter_mb") or 0))
    pick["pick"] = True
    return pick["method"]


def bakeoff_table(workspace: Path, bakeoff_id: str, manager=None) -> dict:
    """{"rows": one per method, "done": every run finished, "pick": the marked method, "steps", "base_model"}."""
    from .jobs import run_status

    text = str(bakeoff_id or "").strip()
    path = Path(workspace) / BAKEOFF_DIR / f"{text}.json"
    if not text.isalnum() or not path.is_file():
        raise UserInputError(f"No bake-off '{text}' in this session: start one first (the bake-off of the Train settings, or /start_bakeoff).")
    record = read_json(path)
    rows = []
    for method, run_id in record["runs"].items():
        run_dir = find_run(workspace, run_id)
        rows.append({"method": method, "run_id": run_id, **run_row(run_dir, run_status(run_dir, manager)["status"])})
    pick = mark_pick(rows)
    rows += [{"method": m, "status": f"not applicable: {why}"} for m, why in record["skipped"].items()]
    done = all(r["status"] not in ("queued", "running", "stopping") for r in rows)
    return {"rows": rows, "done": done, "pick": pick, "steps": record["steps"], "base_model": record["base_model"]}
