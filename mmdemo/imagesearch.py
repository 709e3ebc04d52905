"""Search an ingested dataset with a dual encoder: text -> its best images, image -> its best captions.

The embeddings of a dataset's images (and of its distinct captions) are computed once per (dataset,
checkpoint) and kept on disk next to the dataset (``embeddings/<key>.safetensors``, the key naming the
checkpoint and the time its model was saved), and in memory: a second query only embeds its text and
takes one matrix-vector product.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from pathlib import Path

from .checks import int_in_range, shown
from .errors import UserInputError

CACHE_DIR = "embeddings"
MAX_TOP_K = 100
MAX_QUERY_CHARS = 1000
CHUNK = 256  # images decoded and embedded at a time (bounded memory for big datasets)
_build_lock = threading.Lock()


def check_query(query) -> str:
    if not isinstance(query, str):
        raise UserInputError(f"query must be text (got {shown(query)})")
    query = query.strip()
    if not query:
        raise UserInputError("Type what to look for first, e.g. 'a red circle'.")
    if len(query) > MAX_QUERY_CHARS:
        raise UserInputError(f"The query is {len(query)} characters long; keep it under {MAX_QUERY_CHARS} (a few "
                             "words describing the image work best).")
    return query


def search_images(query: str, dataset_dir, checkpoint, top_k: int = 5) -> list[dict]:
    """The ``top_k`` images of the dataset (every split) closest to ``query``: ``{file_name, score}``, best
    first; ``score`` is the cosine similarity."""
    from .retrieval import load_dual

    query = check_query(query)
    top_k = int_in_range("top_k", top_k, 1, MAX_TOP_K, 5)
    model = load_dual(checkpoint)
    model.check_query(query)
    images, names = image_embeddings(dataset_dir, checkpoint, model)
    return _best(images, names, embed_query(model, query), top_k, "file_name")


def embed_query(model, query: str):
    """One query's embedding on one thread: for a single short sentence the threads' synchronisation costs
    more than it saves (on 2 busy cores 72 ms on one thread against 2.7 s on two; bench/RESULTS.md). The
    thread count is process-wide, so it is changed only under the inference lock every forward pass takes."""
    import torch

    from .inference import _lock

    with _lock:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return model.embed_texts([query])[0]
        finally:
            torch.set_num_threads(threads)


def search_captions(image, dataset_dir, checkpoint, top_k: int = 5) -> list[dict]:
    """The dataset's distinct captions closest to a PIL image: ``{caption, score}``, best first."""
    from .images import resize_center_crop
    from .retrieval import load_dual

    if image is None:
        raise UserInputError("No image given: give an image to find its captions.")
    top_k = int_in_range("top_k", top_k, 1, MAX_TOP_K, 5)
    model = load_dual(checkpoint)
    texts, captions = caption_embeddings(dataset_dir, checkpoint, model)
    pixels = resize_center_crop(image, model.preprocess.image_size).unsqueeze(0)
    return _best(texts, captions, model.embed_images(pixels)[0], top_k, "caption")


def _best(embeddings, names, query, top_k, key) -> list[dict]:
    scores = embeddings @ query
    top = scores.topk(min(top_k, len(names)))
    return [{key: names[i], "score": round(float(s), 4)} for s, i in zip(top.values.tolist(), top.indices.tolist())]


def _cache_path(dataset_dir, checkpoint, kind: str) -> Path:
    from .runs import model_dir_of

    model_dir = model_dir_of(str(checkpoint)) if checkpoint else None
    stamp = (model_dir / "mmdemo.json").stat().st_mtime_ns if model_dir is not None else 0
    key = hashlib.sha1(f"{checkpoint}|{stamp}".encode()).hexdigest()[:20]
    return Path(dataset_dir) / CACHE_DIR / f"{kind}-{key}.safetensors"


def image_embeddings(dataset_dir, checkpoint, model):
    """(embeddings N x D, file names) of every image of the dataset, cached on disk and in memory."""
    return _cached(_cache_path(dataset_dir, checkpoint, "images"), functools.partial(_embed_images, dataset_dir, model))


def caption_embeddings(dataset_dir, checkpoint, model):
    """(embeddings N x D, the distinct captions) of the dataset, cached like the images'."""
    return _cached(_cache_path(dataset_dir, checkpoint, "captions"),
                   functools.partial(_embed_captions, dataset_dir, model))


@functools.lru_cache(maxsize=8)
def _read(path: str, _mtime: int):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.get_tensor("embeddings"), json.loads(f.metadata()["names"])


def _cached(path: Path, compute):
    with _build_lock:  # two first queries compute once
        if not path.is_file():
            from safetensors.torch import save_file

            embeddings, names = compute()
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"embeddings": embeddings.contiguous()}, str(tmp), metadata={"names": json.dumps(names)})
            tmp.replace(path)
    return _read(str(path), path.stat().st_mtime_ns)


def _embed_images(dataset_dir, model):
    import torch

    from .data import load_splits
    from .images import resize_center_crop

    out, names = [], []
    for split, ds in load_splits(dataset_dir).items():
        files = ds["file_name"] if "file_name" in ds.column_names else [f"{split}/{i}" for i in range(len(ds))]
        for start in range(0, len(ds), CHUNK):
            rows = ds.select(range(start, min(len(ds), start + CHUNK)))
            pixels = torch.stack([resize_center_crop(image, model.preprocess.image_size) for image in rows["image"]])
            out.append(model.embed_images(pixels))
        names += list(files)
    if not names:
        raise UserInputError("This dataset has no images to search.")
    return torch.cat(out), names


def _embed_captions(dataset_dir, model):
    from .data import load_splits

    splits = load_splits(dataset_dir)
    if any("captions" not in ds.column_names for ds in splits.values()):
        raise UserInputError("This dataset has no captions to match an image against; load a captioned image set "
                             "(task retrieval or captioning) and search that.")
    captions = list(dict.fromkeys(c for ds in splits.values() for caps in ds["captions"] for c in caps))
    return model.embed_texts(captions), captions


def images_by_name(dataset_dir, names: list[str]) -> dict:
    """file_name -> the PIL image of the dataset's row with that name (the gallery's thumbnails)."""
    from .data import load_splits

    wanted, found = set(names), {}
    for split, ds in load_splits(dataset_dir).items():
        files = ds["file_name"] if "file_name" in ds.column_names else [f"{split}/{i}" for i in range(len(ds))]
        rows = [i for i, name in enumerate(files) if name in wanted and name not in found]
        for i, example in zip(rows, ds.select(rows)):
            found[files[i]] = example["image"]
    return found
