"""The CLI's ``distill`` command: a smaller student trained on a teacher run's soft labels.

    python -m mmdemo distill TEACHER_RUN --student efficientnet_lite0 [--data DATASET] [--baseline]
        [--images UNLABELLED.zip] [--temperature 4] [--alpha 0.5] [--epochs N] [--output-dir DIR]

Each run is a normal run directory trained by the headless child (``python -m mmdemo train --config``):
with ``--baseline`` the student is first trained alone (OUTPUT_DIR-baseline), then with the teacher
(OUTPUT_DIR), whose report sets the three side by side. Progress goes to stderr; stdout gets one JSON object
(the run directories and the distillation table), exit code 0; an error goes to stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .errors import UserInputError

# The training settings the command passes on (others keep TrainConfig's defaults, or --config's).
PASSED_ON = ("epochs", "max_steps", "batch_size", "image_size", "learning_rate", "method", "seed", "pretrained")


def add_cli_commands(subparsers) -> None:
    d = subparsers.add_parser("distill", help="train a smaller student on a classification run's soft labels "
                                              "(knowledge distillation), optionally beside the student alone")
    d.add_argument("teacher", help="the teacher: a finished classification run directory")
    d.add_argument("--student", default="efficientnet_lite0",
                   help="the student's base model: a registry name (efficientnet_lite0), a timm name or Hub id")
    d.add_argument("--data", help="the dataset (ingested folder, zip, folder, csv); default: the teacher's own")
    d.add_argument("--output-dir", help="the distilled run's directory (default: TEACHER_RUN-distilled)")
    d.add_argument("--baseline", action="store_true", help="also train the student without the teacher first "
                                                           "(OUTPUT_DIR-baseline), for the report's comparison")
    d.add_argument("--baseline-run", help="an existing run of the student trained without the teacher")
    d.add_argument("--images", help="unlabelled images (a zip or a folder) the teacher labels for the student")
    d.add_argument("--temperature", type=float, default=None, help="softmax temperature (default 4)")
    d.add_argument("--alpha", type=float, default=None, help="weight of the soft-label term in [0, 1] (default 0.5)")
    d.add_argument("--epochs", type=int)
    d.add_argument("--max-steps", type=int)
    d.add_argument("--batch-size", type=int)
    d.add_argument("--image-size", type=int)
    d.add_argument("--learning-rate", type=float)
    d.add_argument("--method")
    d.add_argument("--seed", type=int)
    d.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start the student from its pretrained weights (default on)")


def run_cli(args) -> int | None:
    """Runs ``distill``; None when ``args.command`` is another command."""
    if getattr(args, "command", None) != "distill":
        return None
    try:
        out = distill(args)
    except UserInputError as e:
        from .__main__ import cli_wording

        print(f"error: {cli_wording(str(e))}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


def distill(args) -> dict:
    from .__main__ import _ingested
    from .config import TrainConfig
    from .distill import check_teacher_labels, prepare_images
    from .data import load_summary
    from .refs import resolve_model_ref
    from .runs import CONFIG_FILE, read_config

    teacher = Path(resolve_model_ref(args.teacher, field="teacher", allow_local=True))
    if not (teacher / CONFIG_FILE).is_file():
        raise UserInputError(f"teacher '{args.teacher}' is not a run directory (no {CONFIG_FILE}): give the "
                             "--output-dir of a finished classification run.")
    out = Path(args.output_dir or f"{teacher}-distilled").resolve()
    data = args.data or read_config(teacher).get("data", "")
    data = _ingested(str(data), out, "classification")
    check_teacher_labels(str(teacher), list(load_summary(data).classes or []))
    common = {"data": data, "task": "classification",
              "base_model": resolve_model_ref(args.student, field="--student", allow_local=True)}
    common.update({k: getattr(args, k) for k in PASSED_ON if getattr(args, k) is not None})
    baseline = str(Path(args.baseline_run).resolve()) if args.baseline_run else ""
    if args.baseline and not baseline:
        baseline = str(out.parent / f"{out.name}-baseline")
        _train_child(TrainConfig(output_dir=baseline, **common))
    distilled = dict(common, teacher=str(teacher), distill_baseline=baseline)
    if args.temperature is not None:
        distilled["distill_temperature"] = args.temperature
    if args.alpha is not None:
        distilled["distill_alpha"] = args.alpha
    if args.images:
        distilled["distill_images"] = prepare_images(Path(args.images).resolve(), out.parent / f"{out.name}-images")
    _train_child(TrainConfig(output_dir=str(out), **distilled))
    result = json.loads((out / "eval.json").read_text())
    return {"run_dir": str(out), "baseline_run_dir": baseline or None, "distill": result.get("distill")}


def _train_child(cfg) -> None:
    """One run through the headless child, its progress on stderr; a failed run is the command's error."""
    from .runs import CONFIG_FILE, read_status_file

    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / CONFIG_FILE)
    print(f"training {run_dir.name} ({cfg.base_model}{', teacher ' + Path(cfg.teacher).name if cfg.teacher else ''})",
          file=sys.stderr, flush=True)
    code = subprocess.call([sys.executable, "-m", "mmdemo", "train", "--config", str(run_dir / CONFIG_FILE), "--quiet"],
                           stdout=sys.stderr)
    if code != 0:
        status = read_status_file(run_dir) if (run_dir / "status.json").is_file() else {}
        raise UserInputError(f"The run {run_dir} failed: {status.get('message') or 'see its train.log'}")
