"""Command line: the same engine calls as the UI.

    python -m mmdemo train --task classification --data PATH --output-dir DIR [--base-model NAME] ...
    python -m mmdemo train --config RUN_DIR/config.yaml
    python -m mmdemo predict --checkpoint DIR --task classification IMG...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserInputError
from .progress import dumps


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model (also under torchrun / accelerate launch)")
    p.add_argument("--config", help="a config.yaml; flags given as well override its values")
    p.add_argument("--task", default=None, choices=["classification", "captioning", "vqa"])
    p.add_argument("--data", help="a dataset: zip / folder / csv / jsonl, or an ingested dataset folder")
    p.add_argument("--output-dir", help="the run directory to write")
    p.add_argument("--base-model")
    p.add_argument("--method", choices=["full", "head", "lora", "bitfit", "frozen_vision"])
    for flag in ("epochs", "max-steps", "batch-size", "image-size", "seed", "early-stopping-patience",
                 "log-every", "num-workers"):
        p.add_argument(f"--{flag}", type=int)
    for flag in ("learning-rate", "weight-decay", "warmup-ratio"):
        p.add_argument(f"--{flag}", type=float)
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", help="print only the final JSON summary line")
    out.add_argument("--json", action="store_true", help="print every metrics record as a JSON line (for scripts)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="run a checkpoint on images; one JSON line per image")
    p.add_argument("--checkpoint", default="", help="a run directory or model folder ('' = ImageNet default)")
    p.add_argument("--task", default="classification", choices=["classification", "captioning", "vqa"])
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--question", help="the question (vqa)")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per forward pass (default: 32 on a GPU, 1 on the CPU, where bigger batches are "
                        "slower per image)")
    p.add_argument("images", nargs="+")


def _config_from_args(args):
    from .config import TrainConfig

    keys = ("task", "data", "output_dir", "base_model", "method", "epochs", "max_steps", "batch_size", "image_size",
            "seed", "early_stopping_patience", "log_every", "num_workers", "learning_rate", "weight_decay",
            "warmup_ratio", "augment", "pretrained")
    flags = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    values = {}
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise UserInputError(f"Config file {args.config} not found.")
        values = yaml.safe_load(path.read_text()) or {}
    values.update(flags)
    missing = [k for k in ("data", "output_dir") if not values.get(k)]
    if missing:
        raise UserInputError("train needs " + " and ".join("--" + k.replace("_", "-") for k in missing)
                             + " (or --config FILE.yaml).")
    values["data"] = _ingested(values["data"], Path(values["output_dir"]), values.get("task", "classification"))
    return TrainConfig.from_dict(values)


def _ingested(data: str, output_dir: Path, task: str) -> str:
    """An ingested dataset folder as is; anything else (zip, folder, csv, Hub id) ingested first."""
    from .data import ingest_dataset

    if (Path(data) / "summary.json").is_file():
        return data
    # Under torchrun every rank runs this: rank 0 ingests, the others wait for its marker file.
    workspace = output_dir.parent / (output_dir.name + "-data")
    marker = workspace / "INGESTED"
    if int(os.environ.get("RANK", "0")) == 0 and not marker.exists():
        summary = ingest_dataset(data, workspace, task=task)
        marker_tmp = workspace / ".INGESTED.tmp"
        marker_tmp.write_text(summary.path)
        marker_tmp.replace(marker)
    else:
        _wait_for(marker)
    return marker.read_text().strip()


def _wait_for(path: Path, timeout: float = 3600) -> None:
    import time

    start = time.time()
    while not path.exists():
        if time.time() - start > timeout:
            raise UserInputError(f"Timed out waiting for the dataset to be ingested ({path}).")
        time.sleep(0.5)


def _run_train(args) -> int:
    from .progress import TrainingPrinter
    from .training import train, write_status

    _quiet_datasets()
    # Under torchrun only rank 0 speaks; the others' output would repeat it.
    quiet = args.quiet or int(os.environ.get("RANK", "0")) != 0
    printer = TrainingPrinter("json" if args.json else "quiet" if quiet else "bar")
    cfg = None
    try:
        cfg = _config_from_args(args)
        result = train(cfg, on_record=printer)
    except BaseException as e:  # noqa: BLE001 - every failure must reach status.json
        printer.close()
        if cfg is not None and isinstance(e, Exception):
            write_status(Path(cfg.output_dir), "failed", message=_failure_message(e))
        if isinstance(e, UserInputError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    status = json.loads((Path(cfg.output_dir) / "status.json").read_text()).get("status", "completed")
    printer.summary(result, cfg.output_dir, status)
    return 0


def _quiet_datasets() -> None:
    # Ingesting a local file "downloads" and "generates" nothing worth a progress bar per split.
    import datasets

    datasets.disable_progress_bars()


# How an allocation failure reads when it is not a torch.OutOfMemoryError: the CPU allocator's
# RuntimeError, a DataLoader worker's re-raised one, numpy / PIL running out of address space.
OOM_TEXTS = ("can't allocate memory", "cannot allocate memory", "out of memory", "unable to allocate")


def _failure_message(e: Exception) -> str:
    import torch

    if isinstance(e, UserInputError):
        return str(e)
    text = str(e).lower()
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
            isinstance(e, RuntimeError) and any(t in text for t in OOM_TEXTS)):
        where = "GPU memory" if isinstance(e, torch.OutOfMemoryError) or "cuda" in text else "memory"
        # Resuming would replay the same batch: the advice is a new run with lighter settings.
        return (f"Out of {where}: a batch did not fit. Start a new run with a smaller batch size (e.g. half), a "
                "smaller image size, or the 'lora' or 'head' method (far fewer gradients and optimizer states to "
                "hold). The training process has exited, so its memory is free again.")
    return f"Training failed: {type(e).__name__}: {e}. The last checkpoint is kept; see train.log."


def _run_predict(args) -> int:
    """One JSON line per image, in the order given; images go through the model --batch-size at a
    time. An image that cannot be read gets an "error" line; the exit code is 1 if any line is one."""
    from PIL import Image

    from .inference import classify_batch, generate_batch, inference_device

    checkpoint = args.checkpoint or None
    # Default model, 2 CPU cores: 62 images/s one at a time, 54 in batches of 8, 47 in batches of 32.
    batch_size = args.batch_size or (32 if inference_device().type == "cuda" else 1)

    def predict(images: list) -> list[dict]:
        if args.task == "classification":
            return [{"labels": labels} for labels in classify_batch(images, checkpoint, args.top_k)]
        questions = None if args.task == "captioning" else [args.question] * len(images)
        texts = generate_batch(images, questions, checkpoint, args.max_new_tokens, args.num_beams)
        key = "caption" if questions is None else "answer"
        return [{key: text} if questions is None else {"question": args.question, key: text} for text in texts]

    failed = False
    paths = list(args.images)
    for start in range(0, len(paths), batch_size):
        records, images = {}, {}
        for path in paths[start:start + batch_size]:
            try:
                with Image.open(path) as img:
                    img.load()
                    images[path] = img.copy()
            except OSError as e:
                records[path] = {"error": f"cannot read {path}: {e}"}
        if images:
            try:
                records.update(zip(images, predict(list(images.values()))))
            except UserInputError as e:
                records.update((path, {"error": str(e)}) for path in images)
        for path in paths[start:start + batch_size]:
            record = _finite_or_error(records[path])
            failed |= "error" in record
            print(dumps({"image": path, **record}), flush=True)
    return 1 if failed else 0


def _finite_or_error(record: dict) -> dict:
    from .progress import finite

    if finite(record) == record:
        return record
    return {"error": "the model's output is not a number (NaN): its weights diverged in training. Train it again "
                     "with a lower learning rate."}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmdemo", description="Fine-tune and run vision models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _predict_parser(sub)
    from .hub import add_cli_commands, run_cli

    add_cli_commands(sub)
    args = parser.parse_args(argv)
    code = run_cli(args)
    if code is not None:
        return code
    try:
        return _run_train(args) if args.command == "train" else _run_predict(args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
