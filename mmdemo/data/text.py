"""Captioning and VQA ingest: images plus text rows -> one row per image (captions) or per question.

The layout rules are the imagefolder builder's: split folders, a metadata.csv / metadata.jsonl in each,
file_name relative to the metadata file's folder, no '..' or absolute paths. The rows are read here,
not by the builder: it infers column types from the values (a CSV answer column of numbers with one
blank cell turns "2" into 2.0; a JSONL caption that is a string on one line and a list on another
fails), loses the line a message should name, and would decode an image once per repeated row.
"""

import json
import os
import posixpath
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

from mmdemo.errors import UserInputError

from .decode import decode_image, decode_split, duplicate_warning, require_readable
from .upload import (METADATA_NAMES, SPLITS, Layout, check_columns, expected_columns, extra_columns_warning,
                     hub_image_column, ignored_images_warning, image_extensions, is_junk, listing, load_hub,
                     open_upload, plural, read_metadata, select_hub_splits, split_files)

MAX_CLASSES = 100  # VQA: the summary lists at most this many answers, the most frequent


class TextLayout(NamedTuple):
    needed: list[tuple[str, ...]]  # the text columns: alternative names each, the first one found is read
    example: dict  # one metadata row, shown in messages
    counted: str  # what counts[split] counts beside images
    layout: Layout


TEXT_TASKS = {
    "captioning": TextLayout([("text", "caption", "captions")], {"file_name": "images/1.jpg", "text": "a red triangle"},
                           "captions", Layout("images with a metadata.jsonl (file_name, text)",
                                              "with a metadata.jsonl or metadata.csv giving each one's file_name "
                                              "and text (its caption)")),
    "vqa": TextLayout([("question",), ("answer", "answers")],
                    {"file_name": "images/1.jpg", "question": "what shape is this?", "answer": "triangle"},
                    "questions", Layout("images with a metadata.jsonl (file_name, question, answer)",
                                        "with a metadata.jsonl or metadata.csv of file_name, question and answer "
                                        "rows")),
}
# Image-text retrieval reads the captioning layout; its rows also keep each image's file name (search results).
TEXT_TASKS["retrieval"] = TEXT_TASKS["captioning"]
CAPTION_TASKS = ("captioning", "retrieval")


def ingest_text(source, work, task, *, val_fraction, seed, max_side):
    """-> (DatasetDict, classes, split -> {"images", "captions" | "questions"}, warnings)."""
    import datasets

    spec = TEXT_TASKS[task]
    upload = open_upload(source, work, spec.layout)
    if upload.hub_id:
        units, warnings = _hub_units(load_hub(upload.hub_id, spec.layout), upload.hub_id, task)
    else:
        units, warnings = _upload_units(upload, task)
    features = _unit_features(task, datasets.Image())
    features.update({"digest": datasets.Value("string"), "error": datasets.Value("string")})
    decoded, skipped = {}, []
    for split, ds in units.items():  # one image per unit: decoded once however many rows name it
        decoded[split], bad = decode_split(ds, split, _decode_unit, features, {"max_side": max_side}, work,
                                           _describe)
        skipped += bad
    require_readable(decoded, skipped)
    if skipped:
        warnings.append(f"Skipped {plural(len(skipped), 'unreadable image')} and dropped their metadata rows: "
                        f"{listing(skipped, 10)}.")
    splits = _split_by_image(decoded, val_fraction, seed)
    warnings += duplicate_warning(splits)
    column = "captions" if task in CAPTION_TASKS else "questions"
    counts = {s: {"images": len(set(splits[s]["digest"])), spec.counted: sum(map(len, splits[s][column]))}
              for s in SPLITS if s in splits}
    if task == "retrieval":
        out = {s: splits[s].select_columns(["image", "captions", "source"]).rename_column("source", "file_name")
               for s in counts}
        return datasets.DatasetDict(out), [], counts, warnings
    if task == "captioning":
        out = {s: splits[s].select_columns(["image", "captions"]) for s in counts}
        return datasets.DatasetDict(out), [], counts, warnings
    out = {s: _rows_per_question(splits[s], work / f"questions-{s}.arrow") for s in counts}
    return datasets.DatasetDict(out), _answer_classes(splits), counts, warnings


def _unit_features(task, image):
    """One row per image ("unit"): its text, where it came from (source, rows) for the messages."""
    import datasets

    texts = datasets.List(datasets.Value("string"))
    columns = {"captions": texts} if task in CAPTION_TASKS else {"questions": texts, "answers": datasets.List(texts)}
    return datasets.Features({"image": image, "source": datasets.Value("string"), "rows": datasets.Value("string"),
                              **columns})


def _upload_units(upload, task):
    """Reads every metadata file of every split -> split -> units Dataset (images not decoded yet)."""
    spec, root = TEXT_TASKS[task], upload.root
    metas = {"train": [upload.metadata]} if upload.metadata else {
        split: sorted(p for p in paths if p.name in METADATA_NAMES) for split, paths in split_files(root).items()}
    _check_metadata_files(metas, upload, task)
    units, problems, warnings, exts = {}, [], [], image_extensions()
    for split, split_metas in metas.items():
        units[split] = {}
        for meta in split_metas:
            warnings += _read_rows(meta, root, spec, exts, units[split], problems)
    if problems:
        hint = (" file_name is the image's path relative to the folder of its metadata file, e.g. images/1.jpg."
                if any("not in the upload" in p for p in problems) else "")
        raise UserInputError(f"{plural(len(problems), 'metadata row')} cannot be used: {listing(problems, 5, '; ')}. "
                             f"Fix or delete those rows and upload again.{hint}")
    if not upload.metadata:  # a lone metadata file's folder may be any folder: do not list it
        warnings += ignored_images_warning({rel for split_units in units.values() for rel in split_units}, root)
    return {split: _units_dataset(list(found.values()), task) for split, found in units.items()}, warnings


def _check_metadata_files(metas, upload, task):
    example = json.dumps(TEXT_TASKS[task].example)
    for split, found in metas.items():
        if found:
            continue
        at_top = [n for n in METADATA_NAMES if (upload.root / n).is_file()]  # then split folders were used
        note = (f" ({at_top[0]} at the top is not read when there are split folders: give each split folder "
                "its own, with file_name relative to that folder)" if at_top else "")
        raise UserInputError(f"No metadata.jsonl or metadata.csv for the {split} images in '{upload.display}'{note}; "
                             f"{task} needs one next to the images with a row per image and text, e.g. {example}.")
    if len({p.suffix for found in metas.values() for p in found}) > 1:  # the builder refuses a mix, so do we
        raise UserInputError(f"'{upload.display}' has both metadata.csv and metadata.jsonl files; use one format.")


def _read_rows(meta: Path, root: Path, spec: TextLayout, exts, units: dict, problems: list) -> list[str]:
    """Adds the rows of one metadata file to `units` (file -> unit); problems are collected, not raised."""
    display = Path(os.path.relpath(meta, root)).as_posix()
    columns, rows = read_metadata(meta, display, spec.example)
    chosen = check_columns(display, columns, spec.needed, "Rename the columns.")
    if not rows:
        raise UserInputError(f"'{display}' has no rows; add one per image, e.g. {json.dumps(spec.example)}.")
    for line, row in rows:
        file_name = row.get("file_name")
        where = f"{display} line {line}" + (f" ({file_name})" if isinstance(file_name, str) and file_name else "")
        rel, problem = _image_path(file_name, meta, root, exts)
        values, problem = (None, problem) if problem else _parse_row(row, chosen)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        unit = units.setdefault(rel, _new_unit({"path": str(root / rel), "bytes": None}, rel))
        _add_row(unit, values, f"{display} line", line)
    return extra_columns_warning(display, columns, list(chosen.values()))


def _image_path(file_name, meta: Path, root: Path, exts) -> tuple[str | None, str]:
    """file_name (relative to the metadata file's folder, as the builder reads it) -> path relative to root."""
    if not isinstance(file_name, str) or not file_name.strip():
        return None, "file_name is empty"
    name = file_name.replace("\\", "/")
    norm = posixpath.normpath(name)
    if "://" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name) or norm == ".." or norm.startswith("../"):
        return None, "file_name must be a path inside the folder of the metadata file (no '..', drive or URL)"
    path = meta.parent / norm
    rel = Path(os.path.relpath(path, root)).as_posix()
    if path.suffix.lower() not in exts or is_junk(rel) or not path.is_file():
        return None, "the image is not in the upload"
    return rel, ""


def _parse_row(row: dict, chosen: dict) -> tuple[dict | None, str]:
    values = {}
    for name, column in chosen.items():
        if name != "file_name":
            values[name], problem = _texts(row.get(column), "caption" if name == "text" else name)
            if problem:
                return None, problem
    if len(values.get("question", ())) > 1:
        return None, "the row has several questions; write one question per row"
    return values, ""


def _texts(value, noun) -> tuple[list[str] | None, str]:
    """A cell -> its texts: a string or number, a list (a JSON list also inside a CSV cell), or VQAv2-style
    answer dicts ({"answer": ...}); surrounding spaces are stripped."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            pass  # a caption that merely starts with "["
    texts = []
    for item in value if isinstance(value, list) else [value]:
        item = item["answer"] if isinstance(item, dict) and "answer" in item else item
        if isinstance(item, bool) or not isinstance(item, (str, int, float, type(None))):
            return None, f"the {noun} is not text ({repr(item)[:40]})"
        text = "" if item is None or item != item else str(item).strip()  # item != item: NaN
        if not text:
            return None, f"the {noun} is empty"
        texts.append(text)
    return (texts, "") if texts else (None, f"the {noun} is empty")


def _new_unit(image_ref, source) -> dict:
    return {"image": image_ref, "source": source, "rows": defaultdict(list), "captions": [], "questions": [],
            "answers": []}


def _add_row(unit, values, where, number):
    """Captions accumulate per image; a question asked again about the same image gains the answers."""
    unit["rows"][where].append(str(number))
    if "text" in values:
        unit["captions"] += values["text"]
    elif values["question"][0] in unit["questions"]:
        unit["answers"][unit["questions"].index(values["question"][0])] += values["answer"]
    else:
        unit["questions"] += values["question"]
        unit["answers"].append(values["answer"])


def _units_dataset(units: list[dict], task, images=None):
    """Units -> a Dataset; `images` (a Dataset with an image column) replaces their image references."""
    import datasets

    columns = {"source": [u["source"] for u in units],
               "rows": ["; ".join(f"{where}{'s' * (len(n) > 1)} {', '.join(n)}" for where, n in u["rows"].items())
                        for u in units]}
    columns.update({"captions": [u["captions"] for u in units]} if task in CAPTION_TASKS else
                   {"questions": [u["questions"] for u in units], "answers": [u["answers"] for u in units]})
    features = _unit_features(task, datasets.Image(decode=False))
    if images is None:
        return datasets.Dataset.from_dict({"image": [u["image"] for u in units], **columns}, features=features)
    del features["image"]
    return datasets.concatenate_datasets([images, datasets.Dataset.from_dict(columns, features=features)], axis=1)


def _hub_units(raw, repo_id, task):
    """A Hub dataset -> units, one per row; rows without usable text are dropped (a Hub dataset cannot be
    fixed by the user) and named in a warning."""
    spec = TEXT_TASKS[task]
    first = raw[next(iter(raw))].features
    image = hub_image_column(first)
    chosen = {names[0]: next((c for c in names if c in first), None) for names in spec.needed}
    if image is None or None in chosen.values():
        raise UserInputError(f"Hub dataset '{repo_id}' has columns {', '.join(first)}; need "
                             f"{expected_columns(spec.needed, ['an image column'])} for {task}.")
    units, dropped = {}, []
    for split, ds in select_hub_splits(raw, repo_id, {image: "image", **{c: c for c in chosen.values()}}).items():
        keep, found = [], []
        for index, row in enumerate(ds.remove_columns("image")):
            values, problem = _parse_row(row, chosen)
            if problem:
                dropped.append(f"{split} row {index}: {problem}")
                continue
            keep.append(index)
            found.append(_new_unit(None, f"{split} row {index}"))
            _add_row(found[-1], values, f"{split} row", index)
        units[split] = _units_dataset(found, task, images=ds.select(keep).select_columns(["image"]))
    warnings = [f"Dropped {plural(len(dropped), 'row')} of '{repo_id}' without usable text: {listing(dropped, 5)}."]
    return units, warnings if dropped else []


def _decode_unit(example, index, max_side):
    return {**example, **decode_image(example["image"], example["source"], max_side)}


def _describe(row) -> str:
    return f"{row['source']} ({row['error']}; dropped {row['rows']})"


def _split_by_image(splits, val_fraction, seed):
    """Makes a seeded validation split of whole images when there is none: every caption or question of an
    image stays with it, and identical pixels count as one image, so held-out images are unseen."""
    if "train" not in splits:
        raise UserInputError(f"Found only {', '.join(s + '/' for s in splits)}; add a train/ folder with its own "
                             "metadata.jsonl, or put the images and metadata.jsonl at the top of the zip.")
    if "validation" in splits:
        return splits
    train, digests = splits["train"], splits["train"]["digest"]
    images = sorted(set(digests))
    if len(images) < 2:
        raise UserInputError(f"The training split has {plural(len(images), 'distinct image')}; need at least 2 to "
                             "hold one out for validation, so add more images.")
    random.Random(seed).shuffle(images)
    held_out = set(images[:min(len(images) - 1, max(1, round(len(images) * val_fraction)))])
    return {**splits, "train": train.select([i for i, d in enumerate(digests) if d not in held_out]),
            "validation": train.select([i for i, d in enumerate(digests) if d in held_out])}


def _explode(batch):
    out = {"image": [], "question": [], "answers": []}
    for image, questions, answers in zip(batch["image"], batch["questions"], batch["answers"]):
        out["image"] += [image] * len(questions)  # the encoded bytes, shared: small after max_side
        out["question"] += questions
        out["answers"] += answers
    return out


def _rows_per_question(units, cache_file: Path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answers": datasets.List(datasets.Value("string"))})
    units = units.cast_column("image", datasets.Image(decode=False))
    return units.map(_explode, batched=True, features=features, remove_columns=units.column_names,
                     cache_file_name=str(cache_file))


def _answer_classes(splits) -> list[str]:
    """The distinct answers, sorted; the MAX_CLASSES most frequent when there are more."""
    counts = Counter(a for ds in splits.values() for per_image in ds["answers"] for answers in per_image
                     for a in answers)
    return sorted(sorted(counts, key=lambda a: (-counts[a], a))[:MAX_CLASSES])
