"""An ingested dataset on disk: `workspace/datasets/<id>/data` (a DatasetDict) and `summary.json`."""

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mmdemo.errors import UserInputError

PREVIEW_ITEMS_PER_CLASS = 4  # text tasks: per_class * this many thumbnails in all


@dataclass
class DatasetSummary:
    """What ingest produced: the id the UI refers to, counts, classes and warnings.

    `counts` is split -> class -> images for classification, split -> {"images", "captions"} for
    captioning and split -> {"images", "questions"} for VQA; num_* count rows (images, or questions).
    """

    dataset_id: str
    task: str
    num_train: int
    num_val: int
    num_test: int
    classes: list[str]
    counts: dict[str, dict[str, int]]
    warnings: list[str] = field(default_factory=list)
    path: str = ""  # set on load from where the folder is now; never sent to the browser
    source: str = ""  # the Hub dataset id it was ingested from ("" for an upload): model cards name it

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "path"}


def save_dataset(out, classes, counts, warnings, task, workspace: Path, work: Path, dataset_id,
                 source: str = "") -> DatasetSummary:
    """Writes data/ and summary.json to a staging dir, then moves it into place in one rename."""
    final = workspace / "datasets" / dataset_id
    sizes = {s: len(out[s]) if s in out else 0 for s in ("train", "validation", "test")}
    summary = DatasetSummary(dataset_id, task, sizes["train"], sizes["validation"], sizes["test"], classes, counts,
                             warnings, str(final), source)
    staging = work / "out"
    out.save_to_disk(str(staging / "data"))
    (staging / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    return summary


def load_summary(dataset_dir) -> DatasetSummary:
    """Reads the summary.json that ingest_dataset wrote."""
    path = Path(dataset_dir) / "summary.json"
    if not path.is_file():
        raise UserInputError(f"No dataset summary in '{Path(dataset_dir).name}'; upload the dataset again.")
    data = {**json.loads(path.read_text()), "path": str(Path(dataset_dir).resolve())}
    return DatasetSummary(**{f.name: data[f.name] for f in fields(DatasetSummary) if f.name in data})


def load_splits(dataset_dir):
    """Loads the saved DatasetDict (keys "train", "validation" and "test" if present).

    Columns: classification `image`, `label` (ClassLabel); captioning `image`, `captions` (list of
    strings), one row per image; VQA `image`, `question`, `answers` (list of strings), one row per question.
    """
    import datasets

    return datasets.load_from_disk(str(Path(dataset_dir) / "data"))


def preview_images(dataset_dir, per_class=6, split="train"):
    """Returns thumbnails (at most 128 px) for the UI grid, keyed by what the model learns.

    Classification: up to `per_class` per class name, every class present as a key. Captioning and
    VQA: up to `per_class * 4` images spread evenly over the split, keyed by the first caption, or by
    "question → first answer"; images that share that text share a key.
    """
    splits = load_splits(dataset_dir)
    if split not in splits:
        raise UserInputError(f"This dataset has no '{split}' split; choose one of {', '.join(splits)}.")
    ds = splits[split]
    if "label" not in ds.features:
        step = max(1, len(ds) // (per_class * PREVIEW_ITEMS_PER_CLASS))
        chosen = list(range(0, len(ds), step))[:per_class * PREVIEW_ITEMS_PER_CLASS]
        previews = {}
        for example in ds.select(chosen):
            key = (example["captions"][0] if "captions" in example
                   else f"{example['question']} → {example['answers'][0]}")
            previews.setdefault(key, []).append(_thumbnail(example["image"]))
        return previews
    names = ds.features["label"].names
    picked, chosen = [0] * len(names), []
    for i, label in enumerate(ds["label"]):
        if picked[label] < per_class:
            picked[label] += 1
            chosen.append(i)
    previews = {name: [] for name in names}
    for example in ds.select(chosen):
        previews[names[example["label"]]].append(_thumbnail(example["image"]))
    return previews


def _thumbnail(image):
    image.thumbnail((128, 128))
    return image


def find_dataset(workspace, dataset_id) -> Path:
    """Returns the folder of an ingested dataset; the id must be one ingest_dataset gave out."""
    path = Path(workspace).resolve() / "datasets" / str(dataset_id)
    # hex only: the id comes from the browser and must never walk out of the workspace
    if not re.fullmatch(r"[0-9a-f]{32}", str(dataset_id)) or not (path / "summary.json").is_file():
        raise UserInputError(f"Unknown dataset id {str(dataset_id)[:40]!r}; upload a dataset first.")
    return path
