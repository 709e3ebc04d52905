"""Comparing runs: loss and validation curves overlaid, the settings that differ, metric deltas.

Pure over run directories (the ``mmdemo.runs`` readers: config.yaml, metrics.jsonl, eval.json,
status.json); no torch. Runs are named by the first 8 digits of their id (more where two share them).

    view = compare_runs([run_a, run_b])
    view["config"]    # [{"setting": "learning_rate", "1a2b3c4d": 0.001, "5e6f7a8b": 0.003}]
    view["metrics"]   # [{"metric": "accuracy", "class": "all", "1a2b3c4d": 0.9, "5e6f7a8b": 0.95, "Δ 5e6f7a8b": 0.05}]
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserInputError
from .runs import read_config, read_eval, read_metrics, read_status_file, report_rows

MAX_RUNS = 8
# Every run has its own: never a difference worth showing.
IGNORED_SETTINGS = ("output_dir",)
PER_CLASS_METRICS = ("f1", "precision", "recall")


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Short, unique names for the runs: 8 digits of the id, more where two runs share them."""
    ids = [Path(d).name for d in run_dirs]
    for width in (8, 12, 16, 32):
        labels = [i[:width] for i in ids]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i} ({n + 1})" for n, i in enumerate(ids)]  # the same run picked twice


def _shown(value):
    # A dataset or a continued run's base model is a path on the server: show its last part only.
    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    return value


def config_differences(configs: list[dict], labels: list[str]) -> list[dict]:
    """One row per setting whose value differs between the runs (``data`` as the dataset id)."""
    keys = list(dict.fromkeys(k for cfg in configs for k in cfg))
    rows = []
    for key in keys:
        if key in IGNORED_SETTINGS:
            continue
        values = [_shown(cfg.get(key)) for cfg in configs]
        if any(v != values[0] for v in values[1:]):
            rows.append({"setting": "dataset" if key == "data" else key,
                         **{label: (str(v) if isinstance(v, (dict, list)) else v) for label, v in zip(labels, values)}})
    return rows


def _final_metrics(result: dict) -> dict[tuple[str, str], float]:
    """(metric, class) -> value of a run's final evaluation; class "all" for the headline metrics."""
    if not result:
        return {}
    values = {}
    for key in ("accuracy", "val_loss"):
        if isinstance(result.get(key), (int, float)):
            values[(key, "all")] = float(result[key])
    if result.get("task", "classification") == "classification":
        for name, scores in (result.get("per_class") or {}).items():
            for metric in PER_CLASS_METRICS:
                if isinstance(scores.get(metric), (int, float)):
                    values[(metric, name)] = float(scores[metric])
    else:
        values.update({(r["metric"], "all"): float(r["value"]) for r in report_rows(result)
                       if isinstance(r["value"], (int, float))})
    return values


def metric_deltas(results: list[dict], labels: list[str]) -> list[dict]:
    """One row per final metric (and per class), each run's value and its difference to the first run's."""
    finals = [_final_metrics(r) for r in results]
    keys = list(dict.fromkeys(k for f in finals for k in f))
    rows = []
    for metric, cls in keys:
        values = [f.get((metric, cls)) for f in finals]
        row = {"metric": metric, "class": cls, **dict(zip(labels, values))}
        for label, value in zip(labels[1:], values[1:]):
            row[f"Δ {label}"] = None if value is None or values[0] is None else round(value - values[0], 5)
        rows.append(row)
    return rows


def compare_runs(run_dirs: list[Path]) -> dict:
    """The Compare view of 2 to MAX_RUNS run directories.

    Returns:
        ``{"runs": [{"run", "run_id", "task", "method", "base_model", "status"}],
        "loss": [{"run", "step", "loss"}], "val": [{"run", "epoch", "step", "metric", "value"}],
        "config": [{"setting", <run>: value, ...}], "metrics": [{"metric", "class", <run>: value, "Δ <run>": ...}]}``;
        the deltas are each run's value minus the first run's.

    Raises:
        UserInputError: fewer than 2 runs, or more than MAX_RUNS.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if len(run_dirs) < 2:
        raise UserInputError("Pick at least two runs to compare (the Runs list).")
    if len(run_dirs) > MAX_RUNS:
        raise UserInputError(f"Pick at most {MAX_RUNS} runs to compare (got {len(run_dirs)}).")
    labels = run_labels(run_dirs)
    configs = [read_config(d) for d in run_dirs]
    loss, val = [], []
    for label, run_dir in zip(labels, run_dirs):
        for record in read_metrics(run_dir):
            if record.get("type") == "train":
                loss.append({"run": label, "step": record["step"], "loss": record["loss"]})
            elif record.get("type") == "eval":
                val += [{"run": label, "epoch": record["epoch"], "step": record["step"], "metric": k, "value": v}
                        for k, v in record.items()
                        if k not in ("type", "epoch", "step", "time") and isinstance(v, (int, float))]
    runs = [{"run": label, "run_id": d.name, "task": cfg.get("task"), "method": cfg.get("method"),
             "base_model": _shown(cfg.get("base_model")), "status": read_status_file(d).get("status", "unknown")}
            for label, d, cfg in zip(labels, run_dirs, configs)]
    return {"runs": runs, "loss": loss, "val": val, "config": config_differences(configs, labels),
            "metrics": metric_deltas([read_eval(d) for d in run_dirs], labels)}
