"""Classification ingest: class folders or a file_name/label metadata file -> image + ClassLabel.

The layout is parsed by the `datasets` imagefolder builder itself, so labels and counts match what
`load_dataset("imagefolder", ...)` reports.
"""

import os
import random
from collections import Counter, defaultdict
from pathlib import Path

from mmdemo.errors import UserInputError

from .decode import decode_image, decode_split, duplicate_warning, require_readable
from .upload import (METADATA_NAMES, SPLIT_ALIASES, SPLITS, Layout, check_columns, extra_columns_warning,
                     hub_image_column, ignored_images_warning, is_junk, list_images, listing, load_hub,
                     open_upload, plural, read_metadata, select_hub_splits, split_patterns)

LAYOUT = Layout("class folders", "in one folder per class, e.g. cats/1.jpg and dogs/2.jpg")
LAYOUT_HINT = "Use class folders (cats/1.jpg, dogs/2.jpg) or a metadata.csv with file_name and label columns."
EXAMPLE_ROW = {"file_name": "cats/1.jpg", "label": "cat"}


def ingest_classification(source, work, task="classification", *, val_fraction, seed, max_side):
    """-> (DatasetDict with image + label, class names, split -> class -> count, warnings). ``task`` is
    the task registry's uniform argument (one layout serves classification)."""
    import datasets

    raw, root, warnings = _load_raw(source, work)
    splits, classes, warnings = _decode_splits(raw, root, work, max_side, warnings)
    splits = _ensure_validation(splits, classes, val_fraction, seed)
    warnings += _quality_warnings(splits, classes)
    label = datasets.ClassLabel(names=classes)
    out = datasets.DatasetDict({s: splits[s].select_columns(["image", "label"]).cast_column("label", label)
                                for s in SPLITS if s in splits})
    tallies = {s: Counter(splits[s]["label"]) for s in out}
    return out, classes, {s: {c: tallies[s][c] for c in classes} for s in out}, warnings


def _load_raw(source, work):
    """Turns any source into (DatasetDict with undecoded images and a label column, root, warnings)."""
    upload = open_upload(source, work, LAYOUT)
    if upload.hub_id:
        return _normalise_hub(load_hub(upload.hub_id, LAYOUT), upload.hub_id), None, []
    root, display = upload.root, upload.display
    if upload.metadata:
        warnings = _check_metadata(upload.metadata, display)
        return _load_folder(root, work, display, metadata=display), root, warnings
    metadata = sorted(p for name in METADATA_NAMES for p in root.rglob(name) if not is_junk(p.relative_to(root)))
    warnings = [w for meta in metadata for w in _check_metadata(meta, meta.relative_to(root))]
    raw = _load_folder(root, work, display)
    if "label" not in raw[next(iter(raw))].features:
        _explain_missing_labels(root, display, list(raw))
    return raw, root, warnings + ignored_images_warning(_used_images(raw, root), root)


def _check_metadata(meta: Path, display) -> list[str]:
    """Checks a metadata file's columns up front: the builder's own errors do not name the fix."""
    columns, _ = read_metadata(meta, display, EXAMPLE_ROW)
    check_columns(display, columns, [("label",)], "Rename the columns, or remove the file to use folder names "
                                                   "as labels.")
    return extra_columns_warning(display, columns, ("file_name", "label"))


def _load_folder(root: Path, work: Path, display, metadata=None):
    import datasets

    kwargs = {"data_files": {"train": [metadata]}, "metadata_filenames": [metadata]} if metadata else {
        "data_files": split_patterns(root)}
    try:
        raw = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(work / "cache"), **kwargs)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as error:
        detail = str(error.__cause__ or error).replace(f"{root}{os.sep}", "")[:300]
        raise UserInputError(f"Could not read '{display}' as an image dataset ({detail}). {LAYOUT_HINT}") from None
    return datasets.DatasetDict({SPLIT_ALIASES.get(s, s): raw[s] for s in raw})


def _used_images(raw, root: Path) -> set[str]:
    import datasets

    return {Path(os.path.relpath(ref["path"], root)).as_posix() for ds in raw.values()
            for ref in ds.cast_column("image", datasets.Image(decode=False))["image"] if ref and ref["path"]}


def _explain_missing_labels(root: Path, display, splits):
    images = list_images(root)
    folders = sorted({Path(p).parent.name for p in images if "/" in p})
    depths = {p.count("/") for p in images}
    if len(depths) > 1:
        shallow, deep = min(images, key=lambda p: p.count("/")), max(images, key=lambda p: p.count("/"))
        raise UserInputError(f"Images in '{display}' sit at different folder depths (e.g. '{shallow}' and "
                             f"'{deep}'); put every image inside its class folder.")
    if not folders:
        raise UserInputError(f"The images in '{display}' are not in class folders; put each class's images "
                             "in a folder named after the class, e.g. cats/1.jpg and dogs/2.jpg.")
    if len(folders) > 1:  # the builder took some folders for splits (any name starting train/val/test...)
        raise UserInputError(f"'{display}' was read as splits ({', '.join(splits)}) without class folders inside "
                             f"them; folders whose names start or end with train, val, dev or test mark splits: "
                             f"rename those among {', '.join(folders)}, or use train/cats/1.jpg.")
    raise UserInputError(f"Found 1 class folder ({folders[0]}/) in '{display}'; need at least 2, e.g. "
                         "cats/ and dogs/.")


def _normalise_hub(raw, repo_id):
    """Renames a Hub dataset's image/label columns and split names to ours."""
    import datasets

    first = raw[next(iter(raw))].features
    image = hub_image_column(first)
    label = next((k for k in ("label", "labels") if k in first), None) or next(
        (k for k, v in first.items() if isinstance(v, datasets.ClassLabel)), None)
    if image is None or label is None:
        raise UserInputError(f"Hub dataset '{repo_id}' has columns {', '.join(first)}; need an image column and "
                             "a label column for classification.")
    return select_hub_splits(raw, repo_id, {image: "image", label: "label"})


def _decode_example(example, index, root, max_side, label_names):
    ref = example["image"] or {}
    source = ref.get("path") or f"#{index}"
    if root is not None and os.path.isabs(source):
        source = Path(os.path.relpath(source, root)).as_posix()
    out = {"image": None, "label": None, "source": source, "digest": "", "error": ""}
    label = example["label"]
    if label is None or label != label or (label_names and label < 0):  # None/NaN in metadata, -1 on the Hub
        out["error"] = "no label"
        return out
    out["label"] = label_names[label] if label_names else str(label)
    return {**out, **decode_image(ref, source, max_side)}


def _describe(row) -> str:
    return f"{row['source']} ({row['error']})"


def _decode_splits(raw, root, work, max_side, warnings):
    """Decodes every split once, keeping `source` and `digest` columns for the checks that follow."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), **{k: datasets.Value("string") for k in
                                  ("label", "source", "digest", "error")}})
    decoded, skipped = {}, []
    for split, ds in raw.items():
        feature = ds.features["label"]
        kwargs = {"root": root, "max_side": max_side,
                  "label_names": feature.names if isinstance(feature, datasets.ClassLabel) else None}
        decoded[split], bad = decode_split(ds, split, _decode_example, features, kwargs, work, _describe)
        skipped += bad
    require_readable(decoded, skipped)
    if skipped:
        warnings = warnings + [f"Skipped {plural(len(skipped), 'unreadable image')}: {listing(skipped, 10)}"]
    return decoded, _label_names(raw), warnings


def _label_names(raw) -> list[str]:
    import datasets

    feature = raw[next(iter(raw))].features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = {str(v) for ds in raw.values() for v in ds["label"] if v is not None and v == v}
    if len(values) < 2:
        raise UserInputError(f"The label column has {len(values)} distinct value(s) ({', '.join(values)}); "
                             "need at least 2 classes, e.g. cat and dog.")
    return sorted(values)


def _ensure_validation(splits, classes, val_fraction, seed):
    """Checks per-class counts; makes a seeded stratified validation split when there is none."""
    if "train" not in splits:
        raise UserInputError(f"Found only {', '.join(s + '/' for s in splits)}; add a train/ folder, or put the "
                             "class folders at the top of the zip.")
    train_counts = Counter(splits["train"]["label"])
    for name in classes:
        if train_counts[name] == 0:
            raise UserInputError(f"Class '{name}' has no usable training images; add images to it or remove it "
                                 "(folders named like train, val or test are treated as splits).")
        if train_counts[name] == 1 and "validation" not in splits:
            raise UserInputError(f"Class '{name}' has only 1 image, so it cannot be split into training and "
                                 "validation; add at least one more image to it.")
    if "validation" in splits:
        return splits
    train_idx, val_idx = _stratified_indices(list(splits["train"]["label"]), val_fraction, seed)
    return {**splits, "train": splits["train"].select(train_idx), "validation": splits["train"].select(val_idx)}


def _stratified_indices(labels, val_fraction, seed):
    rng = random.Random(seed)
    by_class = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    train, val = [], []
    for label in sorted(by_class):
        idx = by_class[label]
        rng.shuffle(idx)
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))  # >= 1 each side
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


def _quality_warnings(splits, classes) -> list[str]:
    warnings = []
    counts = Counter(splits["train"]["label"])
    big, small = max(classes, key=counts.__getitem__), min(classes, key=counts.__getitem__)
    if counts[big] > 3 * counts[small]:
        warnings.append(f"Classes are imbalanced: '{big}' has {counts[big]} training images but '{small}' only "
                        f"{counts[small]}; add images to the smaller classes or expect lower accuracy on them.")
    return warnings + duplicate_warning(splits)
