"""Uploads in: a zip, a folder, a metadata file or a Hub id -> a safe local folder or a Hub dataset.

Shared by every task: safe extraction, junk filtering, the imagefolder split rules and the reading of
metadata.csv / metadata.jsonl. Messages end with the task's own layout hint (`Layout`).
"""

import csv
import errno
import io
import json
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

from mmdemo.errors import UserInputError
from mmdemo.runs import read_json
from mmdemo.settings import UPLOAD_LIMITS as LIMITS  # noqa: F401  (the defaults, named here as before)
from mmdemo.settings import upload_limit as limit

SPLITS = ("train", "validation", "test")
# Upload limits (LIMITS, limit) are read at call time by mmdemo.settings: a zip is counted as it unpacks.
RATIO_FLOOR = 1 << 20  # the ratio is judged past 1 MB: small files (a metadata.csv) compress very well
CHUNK = 1 << 20
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
JUNK_NAMES = {"__macosx", "thumbs.db", "desktop.ini"}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar")
SKIPPED_FILE = ".mmdemo-skipped.json"  # what extract_zip left out; hidden, so no builder reads it
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
IMAGE_TYPES = "JPEG, PNG, WebP, BMP, GIF or TIFF"


def hub_dataset_id(source) -> str | None:
    """The Hugging Face Hub dataset id that ``source`` names, or None for a local file or folder."""
    path = Path(str(source))
    if path.exists() or not HUB_ID.fullmatch(str(source)) or path.suffix.lower() in (".zip", ".csv", ".jsonl"):
        return None
    return str(source)


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
    elif hub_dataset_id(source):
        return Upload(None, str(source), hub_id=str(source))
    else:
        raise UserInputError(f"'{path.name}' was not found; upload it again.")
    if not list_images(upload.root):
        archives = _skipped(upload.root).get("archives")
        inside = (f" (it holds another archive, {archives[0]}: unzip that and zip the images themselves)"
                  if archives else "")
        raise UserInputError(f"No images found in '{upload.display}'{inside}; it needs image files (JPEG, PNG, WebP, "
                             f"BMP, GIF, TIFF) {layout.images_where}.")
    return upload


def _mb(n: float) -> str:
    return f"{n:g} MB"


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
    """Extracts images and metadata files only, after checking every member is safe.

    The caps (MMDEMO_MAX_ZIP_MEMBERS, MMDEMO_MAX_UNZIPPED_MB, MMDEMO_MAX_ZIP_RATIO) are enforced on the
    bytes actually decompressed, chunk by chunk, never on the sizes the archive declares. What is left
    out (nested archives, other files, repeated paths) is recorded in dest/SKIPPED_FILE for the warnings.
    """
    name = zip_path.name
    skipped = {"archives": [], "other": [], "duplicates": [], "unwritable": []}
    try:
        _check_directory(zip_path, name)
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            _check_members(members, name)
            budget = _Budget(name, zip_path.stat().st_size)
            wanted, seen = image_extensions(), set()
            for info in members:
                rel = info.filename.replace("\\", "/")
                if info.is_dir() or rel.endswith("/") or is_junk(rel):
                    continue
                if Path(rel).suffix.lower() not in wanted and Path(rel).name not in METADATA_NAMES:
                    # nested archives and other files never reach the imagefolder builder
                    skipped["archives" if rel.lower().endswith(ARCHIVE_SUFFIXES) else "other"].append(rel)
                    continue
                if rel in seen:
                    skipped["duplicates"].append(rel)
                    continue
                seen.add(rel)
                _extract_member(archive, info, dest.joinpath(*[p for p in rel.split("/") if p not in ("", ".")]),
                                budget, skipped)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:  # encrypted
        raise UserInputError(f"'{name}' is damaged or password-protected ({error}); create the zip again "
                             "without a password and re-upload.") from None
    dest.mkdir(parents=True, exist_ok=True)
    if any(skipped.values()):
        (dest / SKIPPED_FILE).write_text(json.dumps(skipped))
    return dest


def _check_directory(zip_path: Path, name: str) -> None:
    """Counts entries from the end record before zipfile parses the central directory into memory."""
    with open(zip_path, "rb") as f:
        end = zipfile._EndRecData(f)  # noqa: SLF001 - the stdlib's own reader of the end record
    if not end:
        return  # not a zip after all: zipfile raises BadZipFile with its own words
    # An entry takes 46 bytes plus its name: a huge directory is a flood of entries, whatever count it declares
    entries = max(end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE] // 200)  # noqa: SLF001
    _check_count(entries, name)


def _check_count(entries: int, name: str) -> None:
    cap = int(limit("MMDEMO_MAX_ZIP_MEMBERS"))
    if entries > cap:
        raise UserInputError(f"'{name}' holds more than {cap} entries, the limit of this app "
                             "(MMDEMO_MAX_ZIP_MEMBERS); upload fewer files, e.g. split the dataset.")


def _check_members(members, name):
    _check_count(len(members), name)
    for info in members:
        rel = info.filename.replace("\\", "/")
        is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
        if rel.startswith("/") or re.match(r"[A-Za-z]:", rel) or ".." in rel.split("/") or is_link:
            raise UserInputError(f"'{name}' contains an unsafe entry '{info.filename}' (absolute path, '..' "
                                 "or symlink); zip the dataset folder itself and upload that.")
        if not info.is_dir() and info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # bzip2 / LZMA decompress a whole read at once, so the byte count below could not stop them in time
            raise UserInputError(f"'{name}' stores '{info.filename}' with bzip2 or LZMA compression; create the "
                                 "zip with the standard (Deflate) compression and upload it again.")


class _Budget:
    """Counts decompressed bytes against the caps as they are written."""

    def __init__(self, name: str, archive_size: int):
        self.name, self.archive_size, self.total = name, archive_size, 0
        self.max_bytes = limit("MMDEMO_MAX_UNZIPPED_MB") * 2**20
        self.ratio = limit("MMDEMO_MAX_ZIP_RATIO")

    def add(self, info, written: int, n: int) -> None:
        self.total += n
        if self.total > self.max_bytes:
            raise UserInputError(f"'{self.name}' unpacks to more than {_mb(self.max_bytes / 2**20)}, the limit of "
                                 "this app (MMDEMO_MAX_UNZIPPED_MB); upload fewer or smaller images.")
        if self.ratio and (written > max(RATIO_FLOOR, self.ratio * info.compress_size)
                           or self.total > max(RATIO_FLOOR, self.ratio * self.archive_size)):
            raise UserInputError(f"'{self.name}' looks like a zip bomb: '{info.filename}' unpacks to more than "
                                 f"{self.ratio:g} times its compressed size (MMDEMO_MAX_ZIP_RATIO); upload the "
                                 "images themselves, which barely compress.")


def _extract_member(archive, info, target: Path, budget: _Budget, skipped: dict) -> None:
    written, rel, opened = 0, info.filename.replace("\\", "/"), False
    try:
        if target.exists():  # the same path spelt differently (cats//1.png, cats/./1.png)
            skipped["duplicates"].append(rel)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as src, open(target, "wb") as dst:
            opened = True
            while chunk := src.read(CHUNK):
                written += len(chunk)
                budget.add(info, written, len(chunk))  # before writing: stop at the cap, not after it
                dst.write(chunk)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserInputError("The server ran out of disk space while unpacking the upload; try a smaller "
                                 "dataset or try again later.") from None
        # a name too long for the disk, or a path that is both a file and a folder in the zip
        if opened:
            target.unlink(missing_ok=True)
        skipped["unwritable"].append(rel)


def _skipped(root: Path) -> dict:
    return read_json(Path(root) / SKIPPED_FILE)


def _are(items) -> str:
    return "is" if len(items) == 1 else "are"


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
    """Names images the layout left out (outside the split folders, or not listed in a metadata file) and
    the zip entries extraction left out (nested archives, other files, repeated paths)."""
    ignored = [p for p in list_images(root) if p not in used]
    warnings = [f"Ignored {plural(len(ignored), 'image')} outside the split folders or not listed in the metadata "
                f"file: {listing(ignored, 5)}."] if ignored else []
    skipped = _skipped(root)
    if skipped.get("archives"):
        warnings.append(f"Skipped {plural(len(skipped['archives']), 'nested archive')} "
                        f"({listing(skipped['archives'], 5)}): archives inside the zip are not opened; unzip them "
                        "and put their images in the zip itself.")
    if skipped.get("other"):
        warnings.append(f"Ignored {plural(len(skipped['other']), 'file')} that {_are(skipped['other'])} neither "
                        f"images nor metadata: {listing(skipped['other'], 5)}.")
    if skipped.get("unwritable"):
        warnings.append(f"Skipped {plural(len(skipped['unwritable']), 'file')} that cannot be unpacked here (a name "
                        f"too long, or a path that is also a folder): {listing(skipped['unwritable'], 5)}.")
    if skipped.get("duplicates"):
        n = len(skipped["duplicates"])
        warnings.append(f"Skipped {n} repeated {'entry' if n == 1 else 'entries'} "
                        f"({listing(skipped['duplicates'], 5)}): the zip holds the same path more than once; the "
                        "first copy was kept.")
    return warnings


def read_metadata(meta: Path, display, example: dict) -> tuple[list[str], list[tuple[int, dict]]]:
    """The columns and (line number, row) pairs of a metadata .csv / .jsonl; lines as an editor numbers them."""
    text = _read_text(meta, display)
    if not text.strip():
        raise UserInputError(f"'{display}' is empty; it needs a header '{','.join(example)}' and one row per image.")
    if meta.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        try:
            return list(reader.fieldnames or []), [(reader.line_num, row) for row in reader]
        except csv.Error as error:  # e.g. a cell over the csv module's 128 kB field limit
            raise UserInputError(f"Line {reader.line_num} of '{display}' is not valid CSV ({error}); save it as a "
                                 "plain comma-separated file with one row per image.") from None
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested brackets
            row = None
        if not isinstance(row, dict):
            raise UserInputError(f"Line {number} of '{display}' is not a JSON object; write one object per line, "
                                 f"e.g. {json.dumps(example)}.")
        rows.append((number, row))
    return list(rows[0][1]), rows


def _read_text(meta: Path, display) -> str:
    """A metadata file's text: capped in size (MMDEMO_MAX_METADATA_MB), strictly UTF-8 (a BOM is fine)."""
    cap = limit("MMDEMO_MAX_METADATA_MB")
    size = meta.stat().st_size
    if size > cap * 2**20:
        raise UserInputError(f"'{display}' is {size / 2**20:.1f} MB, more than the {_mb(cap)} limit for metadata "
                             "files (MMDEMO_MAX_METADATA_MB); keep only the needed columns, or split the dataset.")
    data = meta.read_bytes()
    if b"\0" in data:
        raise UserInputError(f"'{display}' is not a text file (it contains binary data); write the metadata as "
                             "text and save it as UTF-8.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserInputError(f"'{display}' is not UTF-8 text (byte 0x{data[error.start]:02x} at position "
                             f"{error.start}); save it as UTF-8 (in Excel: Save As, 'CSV UTF-8') and upload it "
                             "again.") from None


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
