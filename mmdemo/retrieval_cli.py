"""The command line of the retrieval task: ``search`` and ``predict --task retrieval --labels``.

    python -m mmdemo search --checkpoint RUN_DIR --data DATASET "a red circle" [--top-k 5] [--image IMG]
    python -m mmdemo predict --task retrieval [--checkpoint RUN_DIR] --labels "cat, dog, car" IMG...
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import UserInputError
from .progress import dumps

SEARCH_CACHE = Path.home() / ".cache" / "mmdemo" / "search"  # where a zip given to --data is ingested


def add_search_command(sub) -> None:
    p = sub.add_parser("search", help="the images of a dataset that best match a text (or the captions of an image)")
    p.add_argument("--checkpoint", required=True, help="a retrieval run directory, model folder, CLIP / SigLIP "
                                                       "folder or Hub id")
    p.add_argument("--data", required=True, help="an ingested dataset folder, or a zip / folder / jsonl to ingest")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--image", help="find the dataset's captions that best match this image instead")
    p.add_argument("query", nargs="?", default="", help="what to look for, e.g. 'a red circle'")


def retrieval_checkpoint(text: str) -> str:
    """--checkpoint for retrieval: "" stays "" (zero-shot: the offline classifier); anything else is loaded
    once up front, so that a wrong checkpoint is one error."""
    from .refs import resolve_model_ref
    from .retrieval import load_dual

    checkpoint = resolve_model_ref(text, field="--checkpoint", allow_local=True)
    if checkpoint:
        load_dual(checkpoint)
    return checkpoint


def zero_shot_records(images: list, args, checkpoint: str) -> list[dict]:
    from .zeroshot import DEFAULT_TEMPLATE, zero_shot_batch

    if not args.labels:
        raise UserInputError("predict --task retrieval classifies among free-text labels: give them with --labels "
                             "\"cat, dog, car\".")
    template = args.template or DEFAULT_TEMPLATE
    return [{"labels": probs} for probs in zero_shot_batch(images, args.labels, checkpoint, template)]


def dataset_folder(data: str) -> Path:
    """An ingested dataset folder as is; anything else ingested once (for task retrieval) into a cache
    folder keyed by its path and modification time, so that its embeddings are computed once too."""
    from .__main__ import _ingested

    if (Path(data) / "summary.json").is_file():
        return Path(data)
    path = Path(data).resolve()
    if not path.exists():
        raise UserInputError(f"--data '{data}' was not found; give an ingested dataset folder or a zip of images "
                             "with a metadata.jsonl.")
    key = hashlib.sha1(f"{path}|{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    root = SEARCH_CACHE / key
    root.mkdir(parents=True, exist_ok=True)
    return Path(_ingested(str(path), root / "dataset", "retrieval"))


def run_search(args) -> int:
    from .data import open_image
    from .imagesearch import search_captions, search_images

    checkpoint = retrieval_checkpoint(args.checkpoint)
    folder = dataset_folder(args.data)
    if args.image:
        hits = search_captions(open_image(args.image, name=args.image), folder, checkpoint, args.top_k)
    else:
        hits = search_images(args.query, folder, checkpoint, args.top_k)
    for rank, hit in enumerate(hits, 1):
        print(dumps({"rank": rank, **hit}), flush=True)
    return 0
