"""Command line: the same engine calls as the UI.

    python -m mmdemo train --task classification --data PATH --output-dir DIR [--base-model NAME] ...
    python -m mmdemo train --config RUN_DIR/config.yaml
    python -m mmdemo predict --checkpoint DIR --task classification IMG...
    python -m mmdemo predict --checkpoint DIR --task image_text_classification --text "what color is it?" IMG...
    python -m mmdemo predict --task retrieval [--checkpoint DIR] --labels "cat, dog, car" IMG...
    python -m mmdemo search --checkpoint DIR --data DATASET "a red circle"
    python -m mmdemo baselines DATASET             # advice before training (mmdemo/advice_cli.py)
    python -m mmdemo compare RUN_DIR RUN_DIR...    # runs side by side
    python -m mmdemo distill TEACHER_RUN --student efficientnet_lite0 [--baseline]  # (mmdemo/distill_cli.py)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from .config import TASKS
from .errors import UserInputError
from .progress import dumps


def _train_parser(sub) -> None:
    """The train flags, one per TrainConfig field (``--no-augment`` style for the booleans); each defaults
    to None so that only the flags given override a --config file."""
    from .config import param_fields, param_type

    p = sub.add_parser("train", help="fine-tune a model (also under torchrun / accelerate launch)")
    p.add_argument("--config", help="a config.yaml; flags given as well override its values")
    for f in param_fields():
        flag, kind, help_ = "--" + f.name.replace("_", "-"), param_type(f), f.metadata.get("help")
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, dest=f.name, type=kind, default=None, choices=f.metadata.get("choices"), help=help_)
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
    p.add_argument("--task", default="classification", choices=TASKS)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--question", help="the question (vqa)")
    p.add_argument("--text", help="the text that goes with every image (image_text_classification)")
    p.add_argument("--pairs", help="image_text_classification: a CSV file of image,text rows, one prediction per "
                                   "row (a first row 'image,text' is a header; image paths relative to the file)")
    p.add_argument("--labels", help="comma-separated labels to choose from (retrieval: zero-shot classification)")
    p.add_argument("--template", help="retrieval: how a label becomes a caption, {} = the label ('a photo of a {}.')")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per forward pass (default: 32 on a GPU, 1 on the CPU, where bigger batches are "
                        "slower per image)")
    p.add_argument("images", nargs="*")


def _config_from_args(args):
    from .config import TrainConfig, param_fields

    flags = {f.name: getattr(args, f.name) for f in param_fields() if getattr(args, f.name) is not None}
    values = {}
    if args.config:
        if not Path(args.config).is_file():
            raise UserInputError(f"Config file {args.config} not found.")
        values = TrainConfig.load_values(args.config)
    values.update(flags)
    for name in ("base_model", "teacher", "distill_baseline", "distill_images"):
        if values.get(name):  # a folder given relative to here becomes absolute (the engine's rule)
            from .refs import resolve_model_ref

            values[name] = resolve_model_ref(values[name], field="--" + name.replace("_", "-"), allow_local=True)
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
    from .procs import apply_child_limits

    apply_child_limits()  # before torch loads, so that every allocation of this process counts
    stop = _StopOnSignal()
    from .progress import TrainingPrinter
    from .runs import STATUS_FILE, read_json, resume_advice, write_status
    from .training import train

    _quiet_datasets()
    # Under torchrun only rank 0 speaks; the others' output would repeat it.
    quiet = args.quiet or int(os.environ.get("RANK", "0")) != 0
    printer = TrainingPrinter("json" if args.json else "quiet" if quiet else "bar")
    cfg, started = None, time.time()
    try:
        cfg = _config_from_args(args)
        stop.watch(Path(cfg.output_dir))
        result = train(cfg, on_record=printer)
    except BaseException as e:  # noqa: BLE001 - every failure must reach status.json
        printer.close()
        if cfg is not None and isinstance(e, Exception) and not _peer_failed_first(Path(cfg.output_dir), started):
            write_status(Path(cfg.output_dir), "failed", message=_failure_message(e, Path(cfg.output_dir)))
        if isinstance(e, UserInputError):
            print(f"error: {cli_wording(str(e))}", file=sys.stderr)
            return 2
        raise
    run_dir = Path(cfg.output_dir)
    status = read_json(run_dir / STATUS_FILE).get("status", "completed")
    if stop.signalled and status == "stopped":
        write_status(run_dir, "stopped",
                     message=f"Stopped by a termination signal (the app shutting down). {resume_advice(run_dir)}")
    printer.summary(result, cfg.output_dir, status)
    return 0


def _peer_failed_first(run_dir: Path, started: float) -> bool:
    """Whether another process of this multi-process launch already wrote its failure (the cause, e.g. an
    out-of-memory stop): this one's own error is then its consequence (a collective whose peer is gone)."""
    from .runs import read_status_file

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    status = read_status_file(run_dir)
    return status.get("status") == "failed" and status.get("updated", 0) >= started


def _quiet_datasets() -> None:
    # Ingesting a local file "downloads" and "generates" nothing worth a progress bar per split.
    import datasets

    datasets.disable_progress_bars()


class _StopOnSignal:
    """SIGTERM (the app shutting down) becomes the cooperative stop request: the STOP file the loop
    checks at every step boundary, so the run writes a checkpoint and exits instead of dying mid-step."""

    def __init__(self):
        import signal

        self.signalled, self.run_dir = False, None
        signal.signal(signal.SIGTERM, self._handle)

    def watch(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        if self.signalled:  # the signal came while the config was being read
            self._request()

    def _handle(self, signum, frame) -> None:
        self.signalled = True
        if self.run_dir is not None:
            self._request()

    def _request(self) -> None:
        from .runs import STOP_FILE

        (self.run_dir / STOP_FILE).touch()


# How an allocation failure reads when it is not a torch.OutOfMemoryError: the CPU allocator's
# RuntimeError, a DataLoader worker's re-raised one, numpy / PIL running out of address space.
OOM_TEXTS = ("can't allocate memory", "cannot allocate memory", "out of memory", "unable to allocate")


def _failure_message(e: Exception, run_dir: Path | None = None) -> str:
    import torch

    if isinstance(e, UserInputError):
        return str(e)
    text = str(e).lower()
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
            isinstance(e, RuntimeError) and any(t in text for t in OOM_TEXTS)):
        where = "GPU memory" if isinstance(e, torch.OutOfMemoryError) or "cuda" in text else "memory"
        from .fit import oom_advice

        # Resuming would replay the same batch: the advice is a new run with lighter settings.
        return oom_advice(where)
    from .runs import resume_advice

    advice = resume_advice(run_dir) + " " if run_dir is not None else ""
    return f"Training failed: {type(e).__name__}: {e}. {advice}See train.log."


def _run_predict(args) -> int:
    """One JSON line per image (or --pairs row), in the order given; images go through the model --batch-size
    at a time. An image that cannot be read gets an "error" line; the exit code is 1 if any line is one."""
    from .data import open_image
    from .inference import classify_batch, generate_batch, inference_device

    items = _predict_items(args)
    checkpoint = _predict_checkpoint(args.checkpoint, args.task)
    # Default model, 2 CPU cores: 62 images/s one at a time, 54 in batches of 8, 47 in batches of 32.
    batch_size = args.batch_size or (32 if inference_device().type == "cuda" else 1)

    def predict(images: list, row_texts: list) -> list[dict]:
        if args.task == "classification":
            return [{"labels": labels} for labels in classify_batch(images, checkpoint, args.top_k)]
        if args.task == "retrieval":
            from .retrieval_cli import zero_shot_records

            return zero_shot_records(images, args, checkpoint)
        if args.task == "image_text_classification":
            from .imagetext import classify_batch as classify_with_text

            return [{"text": text, "labels": labels}
                    for text, labels in zip(row_texts, classify_with_text(images, row_texts, checkpoint, args.top_k))]
        questions = None if args.task == "captioning" else [args.question] * len(images)
        texts = generate_batch(images, questions, checkpoint, args.max_new_tokens, args.num_beams)
        key = "caption" if questions is None else "answer"
        return [{key: text} if questions is None else {"question": args.question, key: text} for text in texts]

    failed = False
    for start in range(0, len(items), batch_size):
        records, images = {}, {}
        for i, (path, _) in enumerate(items[start:start + batch_size], start):
            try:
                images[i] = open_image(path, name=path)
            except UserInputError as e:
                records[i] = {"error": f"cannot read {path}: {cli_wording(str(e))}"}
        if images:
            # A UserInputError here is about the model or a parameter, not an image: it ends the command.
            records.update(zip(images, predict(list(images.values()), [items[i][1] for i in images])))
        for i, (path, _) in enumerate(items[start:start + batch_size], start):
            record = _finite_or_error(records[i])
            failed |= "error" in record
            print(dumps({"image": path, **record}), flush=True)
    return 1 if failed else 0


def _predict_items(args) -> list[tuple[str, str | None]]:
    """(image path, its text) to predict, in order: the images given with --text, or the rows of --pairs."""
    import csv

    if not args.pairs:
        if not args.images:
            raise UserInputError("Give one or more image files to predict"
                                 + (", or a --pairs CSV file of image,text rows." if
                                    args.task == "image_text_classification" else "."))
        return [(path, args.text) for path in args.images]
    if args.task != "image_text_classification":
        raise UserInputError(f"--pairs is for --task image_text_classification (this is {args.task}); give the "
                             "images instead.")
    if args.images or args.text:
        raise UserInputError("Give either --pairs or images with --text, not both.")
    pairs = Path(args.pairs)
    if not pairs.is_file():
        raise UserInputError(f"--pairs {pairs} was not found: give a CSV file of image,text rows.")
    with open(pairs, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    if rows and [c.strip().lower() for c in rows[0]] in (["image", "text"], ["file_name", "text"]):
        rows = rows[1:]
    bad = [n for n, r in enumerate(rows, 1) if len(r) != 2 or not r[0].strip() or not r[1].strip()]
    if bad or not rows:
        where = f"row {bad[0]} has no image and text" if bad else "it has no rows"
        raise UserInputError(f"--pairs {pairs}: {where}; each row is image,text (quote a text that holds a comma).")
    return [(str(pairs.parent / r[0].strip()), r[1].strip()) for r in rows]


def _predict_checkpoint(text: str, task: str) -> str | None:
    """--checkpoint as the engine takes it (a folder made absolute), its model loaded once up front, so
    that a wrong checkpoint is one error (exit code 2), not one per image."""
    from .inference import load_predictor
    from .refs import resolve_model_ref

    if task == "retrieval":  # "" = the offline zero-shot classifier; a CLIP folder needs no mmdemo.json
        from .retrieval_cli import retrieval_checkpoint

        return retrieval_checkpoint(text)
    checkpoint = resolve_model_ref(text, field="--checkpoint", allow_local=True) or None
    try:
        load_predictor(checkpoint, task)
    except UserInputError as e:
        if checkpoint and not Path(checkpoint).is_absolute() and "/" in checkpoint:
            raise UserInputError(f"--checkpoint '{checkpoint}' was not found: there is no such folder here, and as "
                                 f"a Hub model id it could not be loaded. {e}") from None
        raise
    return checkpoint


# The engine's messages speak to the app's user ("upload it again"); on the command line the same
# advice is about a file or a folder. Applied to every message the CLI prints.
CLI_WORDING = [
    (r"was not found; upload it again", "was not found; check the path"),
    (r"upload the dataset again", "ingest the dataset again"),
    (r"\b(and )?(re-upload|upload (it )?again)", r"\1try again"),
    (r"\bthe upload\b", "the dataset"),
    (r"\bupload\b", "give"),
    (r"pick one from the list", "list the runs to find it"),
    (r"type the text that goes with the image", "give the text that goes with the image with --text"),
]


def cli_wording(message: str) -> str:
    """An engine message in command-line words (see CLI_WORDING)."""
    for pattern, replacement in CLI_WORDING:
        message = re.sub(pattern, replacement, message)
    return message


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
    from .retrieval_cli import add_search_command

    add_search_command(sub)
    from .advice_cli import add_cli_commands as add_advice_commands, run_cli as run_advice_cli

    add_advice_commands(sub)
    from .distill_cli import add_cli_commands as add_distill_command, run_cli as run_distill_cli

    add_distill_command(sub)
    args = parser.parse_args(argv)
    code = run_cli(args)
    code = run_advice_cli(args) if code is None else code
    code = run_distill_cli(args) if code is None else code
    if code is not None:
        return code
    try:
        if args.command == "search":
            from .retrieval_cli import run_search

            return run_search(args)
        return _run_train(args) if args.command == "train" else _run_predict(args)
    except UserInputError as e:
        print(f"error: {cli_wording(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
