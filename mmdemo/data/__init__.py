"""Dataset ingest: any upload in, one canonical dataset on disk out; every dataset check lives here.

Each image is decoded once, normalised to a small RGB image and stored, so training never meets a bad
file. Modules: `upload` (sources, safe extraction, layout and metadata rules), `decode` (images),
`classification` (class folders / labels, parsed by the imagefolder builder itself), `text`
(captioning and VQA metadata rows), `disk` (the saved dataset, its summary and previews).
"""

import shutil
import uuid
from pathlib import Path

from mmdemo.config import TASKS
from mmdemo.errors import UserInputError
from mmdemo.taskspec import task_spec

from . import classification, text  # noqa: F401 - the ingest modules the task registry names, loaded as before
from .decode import open_image, to_rgb
from .disk import DatasetSummary, find_dataset, load_splits, load_summary, preview_images, save_dataset
from .upload import hub_dataset_id

__all__ = ["MAX_PIXELS", "TASKS", "DatasetSummary", "find_dataset", "ingest_dataset", "load_splits", "load_summary",
           "open_image", "preview_images", "to_rgb"]

MAX_PIXELS = 89_000_000  # Pillow's own bomb limit: bigger headers are skipped before decoding (read at call time)


def ingest_dataset(source, workspace, task="classification", *, val_fraction=0.2, seed=0, max_side=256):
    """Checks an upload, decodes every image once and saves a canonical dataset.

    Args:
        source: a .zip, a folder, a .csv/.jsonl metadata file (image paths relative to it) or a
            Hugging Face Hub dataset id.
        workspace: the folder that holds `datasets/<id>/` (and the temp dir used while ingesting).
        task: "classification" (class folders, or metadata with file_name + label), "captioning"
            (metadata with file_name + text / caption / captions) or "vqa" (metadata with file_name,
            question and answer / answers); see load_splits for the columns saved.
        val_fraction: share moved to validation when the upload has no validation split: of each class
            (classification), or of the distinct images, with all their captions / questions (otherwise).
        seed: seed of that split.
        max_side: images are downscaled so that their longer side is at most this many pixels.

    Returns:
        The DatasetSummary, also written to `workspace/datasets/<id>/summary.json`.

    Raises:
        UserInputError: the upload cannot be used; the message names the file (and row) and the fix.
    """
    _check_arguments(task, val_fraction, max_side)
    workspace = Path(workspace).resolve()
    dataset_id = uuid.uuid4().hex
    work = workspace / "tmp" / dataset_id
    # A failed ingest leaves no empty folders: tmp/, and the workspace itself when this call made it.
    leftovers = [work.parent] + ([] if workspace.exists() else [workspace])
    _make_dir(work)
    try:
        options = {"val_fraction": val_fraction, "seed": seed, "max_side": max_side}
        result = task_spec(task).resolve("ingest")(source, work, task, **options)
        return save_dataset(*result, task, workspace, work, dataset_id, hub_dataset_id(source) or "")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for folder in leftovers:
            try:
                folder.rmdir()  # only if empty: a dataset saved, or another ingest under way, keeps it
            except OSError:
                pass


def _make_dir(path: Path, tries: int = 3) -> None:
    # Another ingest may remove the empty parent between its creation and ours: create it again.
    for attempt in range(tries):
        try:
            path.mkdir(parents=True)
            return
        except FileNotFoundError:
            if attempt == tries - 1:
                raise


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
