"""The CLI's ``baselines`` and ``compare`` commands: the advice before training and the Compare view.

    python -m mmdemo baselines DATASET          # an ingested dataset folder, or a zip / folder / csv / jsonl
    python -m mmdemo compare RUN_DIR RUN_DIR... # two or more run directories

Each prints one JSON object on stdout (exit code 0), or the error on stderr (exit code 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import UserInputError


def add_cli_commands(subparsers) -> None:
    b = subparsers.add_parser("baselines", help="what a classification dataset gets without fine-tuning, and the "
                                                "recommended recipe (frozen-feature k-shot curve, linear probe)")
    b.add_argument("data", help="an ingested dataset folder, or a zip / folder / csv / jsonl to ingest first")
    b.add_argument("--workspace", default="mmdemo-workspace",
                   help="where a dataset that is not ingested yet is ingested (default: ./mmdemo-workspace)")
    c = subparsers.add_parser("compare", help="two or more runs side by side: settings that differ, metric deltas, "
                                              "curves")
    c.add_argument("run_dirs", nargs="+")


def run_cli(args) -> int | None:
    """Runs ``baselines`` / ``compare``; None when ``args.command`` is neither."""
    command = getattr(args, "command", None)
    if command not in ("baselines", "compare"):
        return None
    try:
        out = _baselines(args) if command == "baselines" else _compare(args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


def _baselines(args) -> dict:
    from .baselines import baseline_report
    from .data import ingest_dataset

    data = Path(args.data)
    if not (data / "summary.json").is_file():
        data = Path(ingest_dataset(args.data, Path(args.workspace)).path)
    return {"dataset": str(data), **baseline_report(data)}


def _compare(args) -> dict:
    from .compare import compare_runs
    from .runs import CONFIG_FILE

    missing = [d for d in args.run_dirs if not (Path(d) / CONFIG_FILE).is_file()]
    if missing:
        raise UserInputError(f"Not a run directory (no {CONFIG_FILE}): {', '.join(missing)}. "
                             "Give the --output-dir of runs that `train` wrote.")
    return compare_runs([Path(d) for d in args.run_dirs])
