"""Dataset ingest: any upload in, one canonical image/label dataset on disk out.

Every dataset check lives here. The layout is parsed by the `datasets` imagefolder builder itself,
so labels and counts match what `load_dataset("imagefolder", ...)` reports; each image is then
decoded once, normalised to a small RGB image and stored, so training never meets a bad file.
"""

import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import uuid
import zipfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mmdemo.errors import UserInputError

TASKS = ("classification",)
MAX_PIXELS = 89_000_000  # Pillow's own bomb limit: bigger headers are skipped before decoding
MAX_UNZIPPED_BYTES = 4 << 30  # zip bomb guard on the declared sizes (zipfile enforces them)
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
JUNK_NAMES = {"__macosx", "thumbs.db", "desktop.ini"}
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
LAYOUT_HINT = "Use class folders (cats/1.jpg, dogs/2.jpg) or a metadata.csv with file_name and label columns."


@dataclass
class DatasetSummary:
    """What ingest produced: the id the UI refers to, counts, classes and warnings."""

    dataset_id: str
    task: str
    num_train: int
    num_val: int
    num_test: int
    classes: list[str]
    counts: dict[str, dict[str, int]]
    warnings: list[str] = field(default_factory=list)
    path: str = ""  # set on load from where the folder is now; never sent to the browser

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "path"}


def ingest_dataset(source, workspace, task="classification", *, val_fraction=0.2, seed=0, max_side=256):
    """Checks an upload, decodes every image once and saves a canonical dataset.

    Args:
        source: a .zip, a folder, a .csv/.jsonl metadata file (image paths relative to it) or a
            Hugging Face Hub dataset id.
        workspace: the folder that holds `datasets/<id>/` (and the temp dir used while ingesting).
        task: only "classification" for now.
        val_fraction: share of each class moved to validation when the upload has no validation split.
        seed: seed of that stratified split.
        max_side: images are downscaled so that their longer side is at most this many pixels.

    Returns:
        The DatasetSummary, also written to `workspace/datasets/<id>/summary.json`.

    Raises:
        UserInputError: the upload cannot be used; the message names the file and the fix.
    """
    _check_arguments(task, val_fraction, max_side)
    workspace = Path(workspace).resolve()
    dataset_id = uuid.uuid4().hex
    work = workspace / "tmp" / dataset_id
    work.mkdir(parents=True)
    try:
        raw, root, warnings = _load_raw(source, work)
        splits, classes, warnings = _decode_splits(raw, root, work, max_side, warnings)
        splits = _ensure_validation(splits, classes, val_fraction, seed)
        warnings += _quality_warnings(splits, classes)
        return _save(splits, classes, warnings, task, workspace, work, dataset_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_summary(dataset_dir) -> DatasetSummary:
    """Reads the summary.json that ingest_dataset wrote."""
    path = Path(dataset_dir) / "summary.json"
    if not path.is_file():
        raise UserInputError(f"No dataset summary in '{Path(dataset_dir).name}'; upload the dataset again.")
    data = {**json.loads(path.read_text()), "path": str(Path(dataset_dir).resolve())}
    return DatasetSummary(**{f.name: data[f.name] for f in fields(DatasetSummary) if f.name in data})


def load_splits(dataset_dir):
    """Loads the saved DatasetDict (keys "train", "validation" and "test" if present)."""
    import datasets

    return datasets.load_from_disk(str(Path(dataset_dir) / "data"))


def preview_images(dataset_dir, per_class=6, split="train"):
    """Returns up to `per_class` thumbnails per class name, for the UI grid."""
    splits = load_splits(dataset_dir)
    if split not in splits:
        raise UserInputError(f"This dataset has no '{split}' split; choose one of {', '.join(splits)}.")
    ds = splits[split]
    names = ds.features["label"].names
    picked, chosen = defaultdict(int), []
    for i, label in enumerate(ds["label"]):
        if picked[label] < per_class:
            picked[label] += 1
            chosen.append(i)
    previews = {name: [] for name in names}
    for example in ds.select(chosen):
        image = example["image"]
        image.thumbnail((128, 128))
        previews[names[example["label"]]].append(image)
    return previews


def find_dataset(workspace, dataset_id) -> Path:
    """Returns the folder of an ingested dataset; the id must be one ingest_dataset gave out."""
    path = Path(workspace).resolve() / "datasets" / str(dataset_id)
    # hex only: the id comes from the browser and must never walk out of the workspace
    if not re.fullmatch(r"[0-9a-f]{32}", str(dataset_id)) or not (path / "summary.json").is_file():
        raise UserInputError(f"Unknown dataset id {str(dataset_id)[:40]!r}; upload a dataset first.")
    return path


def _check_arguments(task, val_fraction, max_side):
    problems = []
    if task not in TASKS:
        problems.append(f"task '{task}' is not supported yet; supported tasks: {', '.join(TASKS)}")
    if not 0 < val_fraction < 1:
        problems.append(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if max_side < 16:
        problems.append(f"max_side must be at least 16 pixels, got {max_side}")
    if problems:
        raise UserInputError("; ".join(problems) + ".")


def _load_raw(source, work):
    """Turns any source into (DatasetDict with undecoded images and a label column, root, warnings)."""
    path = Path(source)
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserInputError(f"'{path.name}' is empty (0 bytes); upload it again.")
        if path.suffix.lower() in (".csv", ".jsonl"):
            if path.suffix not in (".csv", ".jsonl"):  # the builder picks the metadata reader by exact suffix
                raise UserInputError(f"Rename '{path.name}' to end in lower-case {path.suffix.lower()} and upload it "
                                     "again.")
            warnings = _check_metadata(path, path.name)
            return _load_folder(path.parent, work, path.name, metadata=path.name), path.parent, warnings
        if not zipfile.is_zipfile(path):
            raise UserInputError(f"'{path.name}' is not a zip archive; upload a .zip of class folders, a folder, "
                                 "or a metadata .csv/.jsonl file.")
        root, display = _extract_zip(path, work / "extract"), path.name
    elif path.is_dir():
        root, display = path.resolve(), path.resolve().name
    elif HUB_ID.fullmatch(str(source)) and path.suffix.lower() not in (".zip", ".csv", ".jsonl"):
        return _load_hub(str(source)), None, []
    else:
        raise UserInputError(f"'{path.name}' was not found; upload it again.")
    if not _list_images(root):
        raise UserInputError(f"No images found in '{display}'; it needs image files (JPEG, PNG, WebP, BMP, "
                             "GIF, TIFF) in one folder per class, e.g. cats/1.jpg and dogs/2.jpg.")
    metadata = sorted(p for name in METADATA_NAMES for p in root.rglob(name) if not _is_junk(p.relative_to(root)))
    warnings = [w for meta in metadata for w in _check_metadata(meta, meta.relative_to(root))]
    raw = _load_folder(root, work, display)
    if "label" not in raw[next(iter(raw))].features:
        _explain_missing_labels(root, display, list(raw))
    return raw, root, warnings + _ignored_images_warning(raw, root)


def _is_junk(rel_path) -> bool:
    # macOS resource forks, Windows thumbnails and dot files are never data
    parts = Path(rel_path).parts
    return any(p.startswith(".") or p.lower() in JUNK_NAMES for p in parts)


def _image_extensions() -> set[str]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return set(ImageFolder.EXTENSIONS)  # the builder's own list, so we count exactly what it loads


def _list_images(root: Path) -> list[str]:
    exts = _image_extensions()
    found = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
    return sorted(p.as_posix() for p in found if p.suffix.lower() in exts and not _is_junk(p))


def _extract_zip(zip_path: Path, dest: Path) -> Path:
    """Extracts images and metadata files only, after checking every member is safe."""
    name = zip_path.name
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            _check_members(members, name)
            wanted = _image_extensions()
            for info in members:
                rel = info.filename.replace("\\", "/")
                keep = Path(rel).suffix.lower() in wanted or Path(rel).name in METADATA_NAMES
                if info.is_dir() or _is_junk(rel) or not keep:
                    continue  # nested archives and other files never reach the imagefolder builder
                target = dest.joinpath(*rel.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as error:  # RuntimeError: encrypted
        raise UserInputError(f"'{name}' is damaged or password-protected ({error}); create the zip again "
                             "without a password and re-upload.") from None
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _check_members(members, name):
    total = 0
    for info in members:
        rel = info.filename.replace("\\", "/")
        is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
        if rel.startswith("/") or re.match(r"[A-Za-z]:", rel) or ".." in rel.split("/") or is_link:
            raise UserInputError(f"'{name}' contains an unsafe entry '{info.filename}' (absolute path, '..' "
                                 "or symlink); zip the dataset folder itself and upload that.")
        total += info.file_size
    if total > MAX_UNZIPPED_BYTES:
        raise UserInputError(f"'{name}' unpacks to {total / 2**30:.1f} GB, more than the "
                             f"{MAX_UNZIPPED_BYTES / 2**30:.0f} GB limit; upload fewer or smaller images.")


def _check_metadata(meta: Path, display) -> list[str]:
    """Checks a metadata file's columns up front: the builder's own errors do not name the fix."""
    lines = meta.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise UserInputError(f"'{display}' is empty; it needs a header 'file_name,label' and one row per image.")
    if meta.suffix == ".csv":
        columns = next(csv.reader([first]))
    else:
        try:
            row = json.loads(first)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise UserInputError(f"The first line of '{display}' is not a JSON object; write one object per "
                                 'line, e.g. {"file_name": "cats/1.jpg", "label": "cat"}.')
        columns = list(row)
    # exact names: the builder does not strip spaces or fold case either
    if "file_name" not in columns or "label" not in columns:
        raise UserInputError(f"'{display}' has columns {', '.join(columns) or '(none)'}; expected 'file_name' "
                             "(image path relative to that file) and 'label', in lower case. Rename the columns, "
                             "or remove the file to use folder names as labels.")
    extra = [c for c in columns if c not in ("file_name", "label")]
    return [f"Ignored columns in '{display}': {', '.join(extra)}."] if extra else []


def _split_patterns(root: Path) -> dict:
    """The imagefolder split patterns, limited to split *folders* (train/, val/, test/)."""
    from datasets.data_files import DEFAULT_PATTERNS_ALL, DEFAULT_PATTERNS_SPLIT_IN_DIR_NAME, get_data_patterns

    patterns = get_data_patterns(str(root))
    by_folder = list(DEFAULT_PATTERNS_SPLIT_IN_DIR_NAME.values())
    # datasets also splits by keywords in *file* names: cats/test_1.jpg would become the only test image
    # and every other file would be dropped, so fall back to one train split in that case
    if all(p in by_folder for p in patterns.values()):
        return {str(split): p for split, p in patterns.items()}
    return {"train": DEFAULT_PATTERNS_ALL["train"]}


def _load_folder(root: Path, work: Path, display, metadata=None):
    import datasets

    kwargs = {"data_files": {"train": [metadata]}, "metadata_filenames": [metadata]} if metadata else {
        "data_files": _split_patterns(root)}
    try:
        raw = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(work / "cache"), **kwargs)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as error:
        detail = str(error.__cause__ or error).replace(f"{root}{os.sep}", "")[:300]
        raise UserInputError(f"Could not read '{display}' as an image dataset ({detail}). {LAYOUT_HINT}") from None
    return datasets.DatasetDict({SPLIT_ALIASES.get(s, s): raw[s] for s in raw})


def _ignored_images_warning(raw, root: Path) -> list[str]:
    """Names images the builder left out: outside the split folders, or not listed in a metadata file."""
    import datasets

    used = {Path(os.path.relpath(ref["path"], root)).as_posix() for ds in raw.values()
            for ref in ds.cast_column("image", datasets.Image(decode=False))["image"] if ref and ref["path"]}
    ignored = [p for p in _list_images(root) if p not in used]
    if not ignored:
        return []
    return [f"Ignored {_count(len(ignored), 'image')} outside the split folders or not listed in the metadata file: "
            f"{_first(ignored, 5)}."]


def _explain_missing_labels(root: Path, display, splits):
    images = _list_images(root)
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


def _load_hub(repo_id: str):
    import datasets

    try:
        raw = datasets.load_dataset(repo_id)
    except datasets.exceptions.DatasetNotFoundError:
        raise UserInputError(f"Dataset '{repo_id}' was not found on the Hugging Face Hub (or is private); "
                             "check the id, or upload a zip of class folders instead.") from None
    except Exception as error:  # any network/loader failure: the user can only switch to an upload
        raise UserInputError(f"Could not reach the Hugging Face Hub for dataset '{repo_id}' "
                             f"({type(error).__name__}); upload a zip of class folders instead.") from None
    return _normalise_hub(raw, repo_id)


def _normalise_hub(raw, repo_id):
    """Renames a Hub dataset's image/label columns and split names to ours."""
    import datasets

    first = raw[next(iter(raw))].features
    image = "image" if "image" in first else next((k for k, v in first.items() if isinstance(v, datasets.Image)), None)
    label = next((k for k in ("label", "labels") if k in first), None) or next(
        (k for k, v in first.items() if isinstance(v, datasets.ClassLabel)), None)
    if image is None or label is None:
        raise UserInputError(f"Hub dataset '{repo_id}' has columns {', '.join(first)}; need an image column and "
                             "a label column for classification.")
    renames = {k: v for k, v in ((image, "image"), (label, "label")) if k != v}
    out = datasets.DatasetDict()
    for split, ds in raw.items():
        if SPLIT_ALIASES.get(split) and SPLIT_ALIASES[split] not in out:
            out[SPLIT_ALIASES[split]] = ds.select_columns([image, label]).rename_columns(renames)
    if "train" not in out:
        raise UserInputError(f"Hub dataset '{repo_id}' has no train split (found {', '.join(raw)}).")
    return out


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
    try:
        image, fmt = _open_rgb(ref, max_side)
    except Exception as error:  # any decoder failure means a bad file, never a crashed ingest
        too_large = "too large" in str(error) or type(error).__name__ == "DecompressionBombError"
        out["error"] = "file not found" if isinstance(error, FileNotFoundError) else (
            "too large" if too_large else "not a readable image")
        return out
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    digest = hashlib.sha1(image.tobytes() + str(image.size).encode()).hexdigest()
    out.update(image={"bytes": buffer.getvalue(), "path": source}, digest=digest)
    return out


def _open_rgb(ref, max_side):
    """Decodes one image to RGB (EXIF rotation applied, alpha on white), longer side <= max_side."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") else ref["path"]) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError("too large")
        fmt = "JPEG" if image.format == "JPEG" else "PNG"  # re-encoding a JPEG as PNG only costs disk
        image.draft("RGB", (max_side, max_side))  # JPEG decodes at 1/2..1/8 scale: far less memory and time
        image = _to_rgb(ImageOps.exif_transpose(image))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image, fmt


def _to_rgb(image):
    from PIL import Image

    if image.mode.startswith("I;16"):  # 16-bit grey: scale to 8 bits, a plain convert clips it to white
        image = image.convert("I").point(lambda v: v * (1 / 257))
    if image.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _decode_splits(raw, root, work, max_side, warnings):
    """Decodes every split once, keeping `source` and `digest` columns for the checks that follow."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), **{k: datasets.Value("string") for k in
                                  ("label", "source", "digest", "error")}})
    decoded, skipped = {}, []
    for split, ds in raw.items():
        ds = ds.cast_column("image", datasets.Image(decode=False))
        feature = ds.features["label"]
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        # an explicit cache file keeps decoded copies of Hub datasets out of the user's HF cache
        ds = ds.map(_decode_example, with_indices=True, features=features, remove_columns=ds.column_names,
                    fn_kwargs={"root": root, "max_side": max_side, "label_names": names},
                    cache_file_name=str(work / f"decoded-{split}.arrow"))
        errors = ds["error"]
        skipped += [f"{source} ({error})" for source, error in zip(ds["source"], errors) if error]
        decoded[split] = ds.select([i for i, error in enumerate(errors) if not error])
    if not any(len(ds) for ds in decoded.values()):
        raise UserInputError(f"None of the images could be read, so nothing usable is left (e.g. {skipped[0]}); "
                             "upload JPEG, PNG, WebP, BMP, GIF or TIFF images.")
    if skipped:
        warnings = warnings + [f"Skipped {_count(len(skipped), 'unreadable image')}: {_first(skipped, 10)}"]
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
    seen = set(splits["train"]["digest"])
    dupes = [f"{split}: {source}" for split, ds in splits.items() if split != "train"
             for digest, source in zip(ds["digest"], ds["source"]) if digest in seen]
    if dupes:
        warnings.append(f"Found {_count(len(dupes), 'validation/test image')} identical to training images "
                        f"({_first(dupes, 5)}); remove the copies so the scores are not inflated.")
    return warnings


def _count(n, noun) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _first(items, n) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _save(splits, classes, warnings, task, workspace, work, dataset_id) -> DatasetSummary:
    """Writes data/ and summary.json to a staging dir, then moves it into place in one rename."""
    import datasets

    final = workspace / "datasets" / dataset_id
    label = datasets.ClassLabel(names=classes)
    out = datasets.DatasetDict({s: splits[s].select_columns(["image", "label"]).cast_column("label", label)
                                for s in ("train", "validation", "test") if s in splits})
    tallies = {s: Counter(splits[s]["label"]) for s in out}
    counts = {s: {c: tallies[s][c] for c in classes} for s in out}
    summary = DatasetSummary(dataset_id, task, len(out["train"]), len(out["validation"]),
                             len(out["test"]) if "test" in out else 0, classes, counts, warnings, str(final))
    staging = work / "out"
    out.save_to_disk(str(staging / "data"))
    (staging / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    return summary
