"""Uploads in: a zip, a folder, a metadata file or a Hub id -> a safe local folder or a Hub dataset.

Shared by every task: safe extraction, junk filtering, the imagefolder split rules and the reading of
metadata.csv / metadata.jsonl. Messages end with the task's own layout hint (`Layout`).
"""

import csv
import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import NamedTuple

from mmdemo.errors import UserInputError

SPLITS = ("train", "validation", "test")
MAX_UNZIPPED_BYTES = 4 << 30  # zip bomb guard on the declared sizes (zipfile enforces them)
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
JUNK_NAMES = {"__macosx", "thumbs.db", "desktop.ini"}
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
IMAGE_TYPES = "JPEG, PNG, WebP, BMP, GIF or TIFF"


class Layout(NamedTuple):
    """How a task's upload looks, for the messages: 'a .zip of {zip_of}', 'image files {images_where}'."""

    zip_of: str
    images_where: str


class Upload(NamedTuple):
    root: Path | None  # the folder the layout is read from; None for a Hub dataset
    display: str  # the name the user knows the upload by
    metadata: Path | None = None  # a metadata file uploaded on its own: one train split
    hub_id: str | None = None


def open_upload(source, work: Path, layout: Layout) -> Upload:
    """Resolves any source; a zip is checked and extracted into `work`."""
    path = Path(source)
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserInputError(f"'{path.name}' is empty (0 bytes); upload it again.")
        if path.suffix.lower() in (".csv", ".jsonl"):
            if path.suffix not in (".csv", ".jsonl"):  # the builder picks the metadata reader by exact suffix
                raise UserInputError(f"Rename '{path.name}' to end in lower-case {path.suffix.lower()} and upload it "
                                     "again.")
            return Upload(path.parent.resolve(), path.name, metadata=path.resolve())
        if not zipfile.is_zipfile(path):
            raise UserInputError(f"'{path.name}' is not a zip archive; upload a .zip of {layout.zip_of}, a folder, "
                                 "or a metadata .csv/.jsonl file.")
        upload = Upload(extract_zip(path, work / "extract"), path.name)
    elif path.is_dir():
        upload = Upload(path.resolve(), path.resolve().name)
    elif HUB_ID.fullmatch(str(source)) and path.suffix.lower() not in (".zip", ".csv", ".jsonl"):
        return Upload(None, str(source), hub_id=str(source))
    else:
        raise UserInputError(f"'{path.name}' was not found; upload it again.")
    if not list_images(upload.root):
        raise UserInputError(f"No images found in '{upload.display}'; it needs image files (JPEG, PNG, WebP, BMP, "
                             f"GIF, TIFF) {layout.images_where}.")
    return upload


def is_junk(rel_path) -> bool:
    # macOS resource forks, Windows thumbnails and dot files are never data
    parts = Path(rel_path).parts
    return any(p.startswith(".") or p.lower() in JUNK_NAMES for p in parts)


def image_extensions() -> set[str]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return set(ImageFolder.EXTENSIONS)  # the builder's own list, so we count exactly what it loads


def list_images(root: Path) -> list[str]:
    exts = image_extensions()
    found = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
    return sorted(p.as_posix() for p in found if p.suffix.lower() in exts and not is_junk(p))


def extract_zip(zip_path: Path, dest: Path) -> Path:
    """Extracts images and metadata files only, after checking every member is safe."""
    name = zip_path.name
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            _check_members(members, name)
            wanted = image_extensions()
            for info in members:
                rel = info.filename.replace("\\", "/")
                keep = Path(rel).suffix.lower() in wanted or Path(rel).name in METADATA_NAMES
                if info.is_dir() or is_junk(rel) or not keep:
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


def split_patterns(root: Path) -> dict:
    """The imagefolder split patterns, limited to split *folders* (train/, val/, test/)."""
    from datasets.data_files import DEFAULT_PATTERNS_ALL, DEFAULT_PATTERNS_SPLIT_IN_DIR_NAME, get_data_patterns

    patterns = get_data_patterns(str(root))
    by_folder = list(DEFAULT_PATTERNS_SPLIT_IN_DIR_NAME.values())
    # datasets also splits by keywords in *file* names: cats/test_1.jpg would become the only test image
    # and every other file would be dropped, so fall back to one train split in that case
    if all(p in by_folder for p in patterns.values()):
        return {str(split): p for split, p in patterns.items()}
    return {"train": DEFAULT_PATTERNS_ALL["train"]}


def split_files(root: Path) -> dict[str, list[Path]]:
    """Split -> its files (images and metadata files), resolved by datasets itself as the builder does."""
    from datasets.data_files import DataFilesDict

    files = DataFilesDict.from_patterns(split_patterns(root), base_path=str(root))
    return {SPLIT_ALIASES.get(split, split): [Path(f) for f in found if not is_junk(os.path.relpath(f, root))]
            for split, found in files.items()}


def ignored_images_warning(used: set[str], root: Path) -> list[str]:
    """Names images the layout left out: outside the split folders, or not listed in a metadata file."""
    ignored = [p for p in list_images(root) if p not in used]
    if not ignored:
        return []
    return [f"Ignored {plural(len(ignored), 'image')} outside the split folders or not listed in the metadata file: "
            f"{listing(ignored, 5)}."]


def read_metadata(meta: Path, display, example: dict) -> tuple[list[str], list[tuple[int, dict]]]:
    """The columns and (line number, row) pairs of a metadata .csv / .jsonl; lines as an editor numbers them."""
    text = meta.read_text(encoding="utf-8-sig", errors="replace")
    if not text.strip():
        raise UserInputError(f"'{display}' is empty; it needs a header '{','.join(example)}' and one row per image.")
    if meta.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        return list(reader.fieldnames or []), [(reader.line_num, row) for row in reader]
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise UserInputError(f"Line {number} of '{display}' is not a JSON object; write one object per line, "
                                 f"e.g. {json.dumps(example)}.")
        rows.append((number, row))
    return list(rows[0][1]), rows


def check_columns(display, columns, needed: list[tuple[str, ...]], fix: str) -> dict[str, str]:
    """Picks, for each group of alternative names, the first one present (exact, lower-case names, as the
    builder reads them); raises naming the columns found and expected."""
    chosen = {names[0]: next((c for c in names if c in columns), None) for names in [("file_name",), *needed]}
    if None in chosen.values():
        expected = expected_columns(needed, ["'file_name' (image path relative to that file)"])
        raise UserInputError(f"'{display}' has columns {', '.join(columns) or '(none)'}; expected {expected}, in "
                             f"lower case. {fix}")
    return chosen


def expected_columns(needed: list[tuple[str, ...]], first=()) -> str:
    """[("question",), ("answer", "answers")] -> "'question' and 'answer' (or 'answers')"."""
    names = [*first, *(f"'{alts[0]}'" + (f" (or {', '.join(repr(a) for a in alts[1:])})" if alts[1:] else "")
                       for alts in needed)]
    return ", ".join(names[:-1]) + " and " + names[-1]


def extra_columns_warning(display, columns, used) -> list[str]:
    extra = [c for c in columns if c not in used]
    return [f"Ignored columns in '{display}': {', '.join(extra)}."] if extra else []


def load_hub(repo_id: str, layout: Layout):
    import datasets

    try:
        return datasets.load_dataset(repo_id)
    except datasets.exceptions.DatasetNotFoundError:
        raise UserInputError(f"Dataset '{repo_id}' was not found on the Hugging Face Hub (or is private); "
                             f"check the id, or upload a zip of {layout.zip_of} instead.") from None
    except Exception as error:  # any network/loader failure: the user can only switch to an upload
        raise UserInputError(f"Could not reach the Hugging Face Hub for dataset '{repo_id}' "
                             f"({type(error).__name__}); upload a zip of {layout.zip_of} instead.") from None


def hub_image_column(features) -> str | None:
    import datasets

    return "image" if "image" in features else next(
        (k for k, v in features.items() if isinstance(v, datasets.Image)), None)


def select_hub_splits(raw, repo_id, renames: dict[str, str]):
    """Keeps the columns in `renames` (Hub name -> ours) of the train / validation / test splits."""
    import datasets

    renames_needed = {k: v for k, v in renames.items() if k != v}
    out = datasets.DatasetDict()
    for split, ds in raw.items():
        if SPLIT_ALIASES.get(split) and SPLIT_ALIASES[split] not in out:
            out[SPLIT_ALIASES[split]] = ds.select_columns(list(renames)).rename_columns(renames_needed)
    if "train" not in out:
        raise UserInputError(f"Hub dataset '{repo_id}' has no train split (found {', '.join(raw)}).")
    return out


def plural(n, noun) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def listing(items, n, sep=", ") -> str:
    return sep.join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
