"""``push``, ``export`` and ``space deploy`` on the command line (wired into mmdemo/__main__.py)."""

from __future__ import annotations

import json
import sys

from ..errors import UserInputError
from .export import export_run
from .push import push_run
from .space import deploy_space


def add_cli_commands(subparsers) -> None:
    """Adds ``push``, ``export`` and ``space deploy`` to the CLI's sub-command parsers."""
    token_help = "a write token (default: HF_TOKEN, then the cached `hf auth login`)"
    p = subparsers.add_parser("push", help="upload a run's model, card and config to the Hugging Face Hub")
    p.add_argument("run_dir")
    p.add_argument("repo_id", help="owner/name, or name for your user")
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True, help="(the default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="make a new repo public")
    p.add_argument("--token", default="", help=token_help)
    p.add_argument("--merged", action="store_true", help="peft runs (lora, dora, ...): the merged model only, no adapter/ (refused for adapter / vpt)")
    e = subparsers.add_parser("export", help="write the files `push` would upload into a folder, offline")
    e.add_argument("run_dir")
    e.add_argument("out_dir")
    e.add_argument("--merged", action="store_true", help="peft runs (lora, dora, ...): the merged model only, no adapter/ (refused for adapter / vpt)")
    e.add_argument("--format", default="pytorch", help="pytorch (the default: what a push uploads) or onnx (that "
                   "folder plus model.onnx, measured against PyTorch in export.json)")
    e.add_argument("--quantize", action="extend", nargs="+", default=[], metavar="KIND",
                   help="onnx: also int8 (static, calibrated on the run's training images) and / or fp16")
    e.add_argument("--calibration-images", type=int, default=100, help="int8: training images that calibrate it")
    e.add_argument("--calibration", default="minmax", help="int8: minmax, entropy or percentile")
    e.add_argument("--activations", default="int8", help="int8: activations int8 (symmetric) or uint8")
    e.add_argument("--keep-fp32", default="last", help="int8: layers kept in fp32: first, last, first,last or none")
    e.add_argument("--latency-runs", type=int, default=30, help="timed batch-1 runs per variant")
    e.add_argument("--max-val-images", type=int, default=0, help="measure on at most this many validation images "
                   "(captioning / VQA: items); 0: all")
    s = subparsers.add_parser("space", help="deploy this app as a Hugging Face Space")
    d = s.add_subparsers(dest="space_command", required=True).add_parser(
        "deploy", help="create or update a Gradio Space running this app (settings: Space.yaml)")
    d.add_argument("repo_id", help="owner/name, or name for your user")
    d.add_argument("--token", default="", help=token_help)
    d.add_argument("--private", action="store_true", default=None, help="a new Space is private")


def _export(args) -> dict:
    from ..deploy import check_request

    quantize = check_request(args.format, args.quantize)
    if args.format.strip().lower() == "pytorch":
        return {"out_dir": args.out_dir, "files": export_run(args.run_dir, args.out_dir, merged=args.merged)}
    from ..deploy import export_onnx_run

    lab = export_onnx_run(args.run_dir, args.out_dir, quantize=quantize, calibration_images=args.calibration_images,
                          calibration=args.calibration, keep_fp32=args.keep_fp32, latency_runs=args.latency_runs,
                          activations=args.activations, max_val_images=args.max_val_images)
    for warning in lab["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return {"out_dir": args.out_dir, **lab}


def run_cli(args, api=None) -> int | None:
    """Runs ``push`` / ``export`` / ``space deploy``: one JSON line on stdout and exit code 0, or the error on
    stderr and 2. Returns None when ``args.command`` is none of these."""
    command = getattr(args, "command", None)
    if command not in ("push", "export", "space"):
        return None
    try:
        if command == "push":
            out = push_run(args.run_dir, args.repo_id, args.token, private=args.private, merged=args.merged, api=api)
        elif command == "export":
            out = _export(args)
        else:
            out = deploy_space(args.repo_id, args.token, private=args.private, api=api)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0
