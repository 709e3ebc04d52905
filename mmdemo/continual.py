"""Continual learning for classifiers: a run that continues another keeps what that one knew.

Every classification run keeps a rehearsal memory in its run directory (``memory/``: a small,
class-balanced sample of its training images, bounded by ``MEMORY_PER_CLASS`` per class, the previous
memory's classes included). A run whose base model is a previous run then, by ``keep_old``:

- ``replay``: mixes that memory into its training split, repeated so that an old class is seen about as
  often per epoch as a new one;
- ``distill``: learning without forgetting (Li & Hoiem, 2016): the previous model, frozen, labels every
  training image; the new model's old-class logits are pulled towards its softened outputs;
- ``both`` (the default, chosen by bench/continual.py) or ``off`` (plain fine-tuning).

Its report gains a forgetting table: accuracy on the old classes, on the previous run's validation split,
before (the previous model) and after (this one), and on the new classes of this run's validation split.

Captioning and VQA runs (``TextContinual``) keep a memory of training rows instead (image + captions, or
image + question + answers; ``MEMORY_TEXT_ROWS`` in all, shared equally by the runs they come from), replay
it by ``keep_old`` ``replay`` (the default there: distillation is for classifiers) or ``off``, and report the
old validation split's metric (VQA accuracy / exact match; CIDEr-D / exact match) before and after, and this
run's validation metric before (the previous model) and after.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from .runs import CONFIG_FILE, META_FILE

MEMORY_DIR = "memory"
MEMORY_PER_CLASS = 30
# Captioning / VQA: rows in a text run's memory, split equally among the runs they come from (a run's own rows
# are one group, labelled with its run id), so a chain of continued runs keeps rows of each.
MEMORY_TEXT_ROWS = 300
TEXT_COLUMNS = {"captioning": ("captions",), "vqa": ("question", "answers")}
TEXT_FORGETTING_METRICS = {"captioning": ("cider", "exact_match"), "vqa": ("vqa_accuracy", "exact_match")}
# Distillation: softmax temperature and the weight of its term (LwF's values).
TEMPERATURE, DISTILL_WEIGHT = 2.0, 1.0


def select_memory(labels: list[str], per_class: int, seed: int = 0) -> list[int]:
    """Row indices of a class-balanced sample: up to ``per_class`` rows of each label, seeded, in row order."""
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    rng = random.Random(seed)
    chosen = [i for rows in by_class.values() for i in (rng.sample(rows, per_class) if len(rows) > per_class else rows)]
    return sorted(chosen)


def save_memory(run_dir: Path, split, class_names: list[str], previous: Path | None = None,
                per_class: int = MEMORY_PER_CLASS, seed: int = 0) -> int:
    """Writes ``run_dir/memory/``: a balanced sample of the training split's rows and, for a continued run,
    of the previous memory's (its classes kept). Returns the number of images kept."""
    return write_memory(run_dir, split, [class_names[y] for y in split["label"]], previous, per_class, seed)


def write_memory(run_dir: Path, split, labels: list[str], previous: Path | None, per_class: int, seed: int = 0,
                 columns: tuple[str, ...] = ()) -> int:
    """Writes ``run_dir/memory/`` from the rows of ``split`` (grouped by ``labels``, one per row) and the
    previous run's memory: up to ``per_class`` rows per group, seeded. The memory holds the image, the group
    (``label``) and the split's ``columns`` (a text task's captions or question and answers)."""
    import datasets

    def encoded(ds, rows):  # only the rows kept are read: a large split's images never all load
        return list(ds.select(rows).cast_column("image", datasets.Image(decode=False))["image"]) if rows else []

    def values(ds, rows, column):
        return list(ds.select(rows)[column]) if rows else []

    old = load_memory(previous) if previous else None
    if old is not None and not set(columns) <= set(old.column_names):
        old = None  # a memory of another kind (a run from before its task kept one): nothing to carry over
    old_labels = list(old["label"]) if old is not None else []
    keep = select_memory(labels + old_labels, per_class, seed)
    n = len(labels)
    new_rows, old_rows = [i for i in keep if i < n], [i - n for i in keep if i >= n]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string"),
                                  **{c: split.features[c] for c in columns}})
    memory = datasets.Dataset.from_dict(
        {"image": encoded(split, new_rows) + encoded(old, old_rows), "label": [(labels + old_labels)[i] for i in keep],
         **{c: values(split, new_rows, c) + values(old, old_rows, c) for c in columns}}, features=features)
    memory.save_to_disk(str(Path(run_dir) / MEMORY_DIR))
    return len(keep)


def load_memory(run_dir: Path):
    """The rehearsal memory of a run (a datasets.Dataset with image and label name), or None."""
    import datasets

    folder = Path(run_dir) / MEMORY_DIR
    return datasets.load_from_disk(str(folder)) if folder.is_dir() else None


def previous_model(base_model: str) -> tuple[Path, Path | None] | None:
    """(model folder, run directory or None) when the base model is a saved mmdemo classifier."""
    path = Path(base_model)
    if not path.is_absolute():
        return None
    if (path / "model" / META_FILE).is_file():
        return path / "model", path if (path / CONFIG_FILE).is_file() else None
    if (path / META_FILE).is_file():
        return path, None
    return None


class _Repeated(torch.utils.data.Dataset):
    def __init__(self, ds, times: int):
        self.ds, self.times = ds, times

    def __len__(self):
        return len(self.ds) * self.times

    def __getitem__(self, i):
        return self.ds[i % len(self.ds)]


def replay_repeats(new_rows: int, new_classes: int, memory_rows: int, memory_classes: int) -> int:
    """How often the memory is repeated per epoch so that an old class gets about as many rows as a new one."""
    if not memory_rows or not new_classes:
        return 1
    return max(1, round((new_rows / new_classes) / (memory_rows / max(1, memory_classes))))


class Continual:
    """What a continued classification run does on top of fine-tuning (``keep_old``), and its report."""

    def __init__(self, task, cfg, previous: tuple[Path, Path | None]):
        from .models import load_classifier

        self.model_dir, self.run_dir = previous
        self.mode = cfg.keep_old
        self.teacher = load_classifier(self.model_dir).eval().requires_grad_(False)
        self.old_labels = list(self.teacher.labels)
        self.memory_rows, self.repeats = 0, 0
        memory = load_memory(self.run_dir) if self.run_dir and self.mode in ("replay", "both") else None
        if memory is not None and len(memory):
            labels = task.model.labels
            split = {"image": memory["image"], "label": [labels.index(n) for n in memory["label"]]}
            mem = task.training_tensors(split, list(range(len(labels))))
            new_classes = len(set(task.train_ds.labels.tolist()) - set(range(len(self.old_labels))))
            self.memory_rows = len(mem)
            self.repeats = replay_repeats(len(task.train_ds), new_classes or len(labels), len(mem),
                                          len(set(memory["label"])))
            task.train_ds = torch.utils.data.ConcatDataset([task.train_ds, _Repeated(mem, self.repeats)])

    @property
    def distills(self) -> bool:
        return self.mode in ("distill", "both")

    def distill_loss(self, logits: torch.Tensor, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        """KL(teacher || student) on the old classes, softened by TEMPERATURE (``x``: the uint8 batch)."""
        from .images import normalize

        teacher = self.teacher.to(x.device)
        pre = teacher.preprocess
        with torch.no_grad():
            target = teacher(normalize(x, pre.mean, pre.std, channels_last)).float()
        n, t = target.shape[1], TEMPERATURE
        return DISTILL_WEIGHT * t * t * F.kl_div(F.log_softmax(logits[:, :n] / t, -1), F.log_softmax(target / t, -1),
                                                 log_target=True, reduction="batchmean")

    def report(self, clf, image_size: int, current_val) -> dict:
        """The forgetting table and what was done, for eval.json."""
        from .data import load_splits

        info = {"keep_old": self.mode, "memory_images": self.memory_rows, "memory_repeats": self.repeats,
                "distill": self.distills}
        after_cur = predict_labels(clf, current_val, image_size)
        names = current_val.features["label"].names
        cur_true = [names[y] for y in current_val["label"]]
        old_true = old_before = old_after = []
        data = _read_yaml(self.run_dir / CONFIG_FILE).get("data") if self.run_dir else None
        try:
            old_val = load_splits(data)["validation"] if data else None
        except Exception:  # the previous run's dataset was removed: the new classes only
            old_val = None
        if old_val is not None:
            names = old_val.features["label"].names
            old_true = [names[y] for y in old_val["label"]]
            old_before = predict_labels(self.teacher, old_val, self.teacher.preprocess.image_size)
            old_after = predict_labels(clf, old_val, image_size)
        else:
            info["note"] = "the previous run's dataset is gone: no old-class figures"
        rows = forgetting_table(self.old_labels, old_true, old_before, old_after, cur_true, after_cur)
        return {"forgetting": rows, "continual": info}


@torch.no_grad()
def predict_labels(clf, split, image_size: int, batch: int = 64) -> list[str]:
    """The label names ``clf`` predicts for a split's images (eval mode, centre crop at ``image_size``)."""
    from .images import ImageTensors, normalize

    names = split.features["label"].names
    ds = ImageTensors(split, image_size, list(range(len(names))), train=False)
    was_training = clf.training
    clf.eval()
    device = next(clf.parameters()).device
    pre, preds = clf.preprocess, []
    for i in range(0, len(ds), batch):
        x = normalize(ds.pixels[i:i + batch].to(device), pre.mean, pre.std, clf.channels_last_input)
        preds += clf(x).argmax(-1).tolist()
    clf.train(was_training)
    return [clf.labels[p] for p in preds]


def forgetting_table(old_labels: list[str], old_true: list[str], old_before: list[str], old_after: list[str],
                     new_true: list[str], new_after: list[str]) -> list[dict]:
    """Rows of the forgetting table: each old class on the previous run's validation split (accuracy before
    and after), each new class on this run's (after only), then one row per group.

    Args:
        old_labels: the previous model's labels.
        old_true, old_before, old_after: the previous validation split's true labels, the previous and the
            new model's predictions.
        new_true, new_after: this run's validation split: true labels and predictions.
    """
    def accuracy(pairs):
        return round(sum(t == p for t, p in pairs) / len(pairs), 4) if pairs else None

    def row(group, name, true, before, after):
        rows_after = [(t, p) for t, p in zip(true, after) if name is None or t == name]
        rows_before = [(t, p) for t, p in zip(true, before) if name is None or t == name] if before is not None else []
        b, a = accuracy(rows_before), accuracy(rows_after)
        return {"group": group, "class": name or "all", "support": len(rows_after), "before": b, "after": a,
                "change": round(a - b, 4) if a is not None and b is not None else None}

    old_set = set(old_labels)
    new_pairs = [(t, p) for t, p in zip(new_true, new_after) if t not in old_set]
    new_classes = list(dict.fromkeys(t for t, _ in new_pairs))
    rows = [row("old", c, old_true, old_before, old_after) for c in old_labels if c in set(old_true)]
    rows += [row("new", c, [t for t, _ in new_pairs], None, [p for _, p in new_pairs]) for c in new_classes]
    if old_true:
        rows.append(row("old", None, old_true, old_before, old_after))
    if new_pairs:
        rows.append(row("new", None, [t for t, _ in new_pairs], None, [p for _, p in new_pairs]))
    return rows


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, ValueError):
        return {}


def setup(task, cfg, splits) -> Continual | None:
    """The continual part of a classification run whose base model is a saved classifier (with keep_old off,
    only its forgetting table)."""
    previous = previous_model(cfg.base_model)
    return Continual(task, cfg, previous) if previous is not None else None


def save_text_memory(run_dir: Path, split, task: str, previous: Path | None = None, rows: int = MEMORY_TEXT_ROWS,
                     seed: int = 0) -> int:
    """Writes a captioning / VQA run's ``memory/``: up to ``rows`` training rows, the same share from this
    run's split and from each earlier run in the previous memory. Returns the number of rows kept."""
    old = load_memory(previous) if previous else None
    groups = {Path(run_dir).name} | (set(old["label"]) if old is not None else set())
    return write_memory(run_dir, split, [Path(run_dir).name] * len(split), previous, max(1, rows // len(groups)), seed,
                        TEXT_COLUMNS[task])


class TextContinual:
    """A captioning / VQA run continued from a previous one: the replay of its memory (``keep_old`` replay)
    and the forgetting table of the report (also with ``off``)."""

    def __init__(self, task, cfg, previous: tuple[Path, Path | None]):
        from .tasks import TextRows

        self.model_dir, self.run_dir = previous
        self.task, self.mode = cfg.task, cfg.keep_old
        self.memory_rows, self.repeats, self.note = 0, 0, ""
        memory = load_memory(self.run_dir) if self.run_dir and self.mode == "replay" else None
        if memory is not None and not set(TEXT_COLUMNS[cfg.task]) <= set(memory.column_names):
            memory = None
        if self.mode == "replay" and (memory is None or not len(memory)):
            self.note = "the previous run has no memory of training rows (trained before text runs kept one): no replay"
        elif memory is not None:
            rows = TextRows(memory, task.image_size, cfg.task, True, cfg.seed, task.featurize)
            self.memory_rows = len(rows)
            # Each earlier run's rows are seen about as often per epoch as this run's (classification's rule).
            self.repeats = replay_repeats(len(task.train_ds), 1, len(rows), len(set(memory["label"])))
            task.train_ds = torch.utils.data.ConcatDataset([task.train_ds, _Repeated(rows, self.repeats)])

    def report(self, model, task, predictions: list[str]) -> dict:
        """The forgetting table (eval.json's ``forgetting``) and what was done (``continual``); ``predictions``:
        the final model's texts for this run's validation rows."""
        from .data import load_splits
        from .tasks import TextRows, generate_texts
        from .vlm import load_image_text_model

        device = next(model.parameters()).device
        before = load_image_text_model(self.model_dir).to(device).eval()
        info = {"keep_old": self.mode, "memory_rows": self.memory_rows, "memory_repeats": self.repeats,
                "distill": False}
        new_refs = task.val_ds.references
        new_before = generate_texts(before, task.val_ds, self.task, task.max_new_tokens, pixels_only=True)
        data = _read_yaml(self.run_dir / CONFIG_FILE).get("data") if self.run_dir else None
        try:
            old_val = load_splits(data)["validation"] if data else None
        except Exception:  # the previous run's dataset was removed: this run's figures only
            old_val = None
        old_refs = old_before = old_after = None
        if old_val is not None and set(TEXT_COLUMNS[self.task]) <= set(old_val.column_names):
            old_rows = TextRows(old_val, model.preprocess.image_size, self.task, False, 0)
            old_refs = old_rows.references
            old_after = generate_texts(model, old_rows, self.task, task.max_new_tokens)
            if before.preprocess.image_size != model.preprocess.image_size:
                old_rows = TextRows(old_val, before.preprocess.image_size, self.task, False, 0)
            old_before = generate_texts(before, old_rows, self.task, task.max_new_tokens)
        else:
            why = "the previous run's dataset is gone" if self.run_dir else "the base model is a model folder, not a run"
            self.note = "; ".join(filter(None, [self.note, f"{why}: no figures on its validation split"]))
        if self.note:
            info["note"] = self.note
        del before
        rows = text_forgetting_table(self.task, old_refs, old_before, old_after, new_refs, new_before, predictions)
        return {"forgetting": rows, "continual": info}


def text_forgetting_table(task: str, old_refs, old_before, old_after, new_refs, new_before, new_after) -> list[dict]:
    """Rows of a captioning / VQA forgetting table: per metric (``TEXT_FORGETTING_METRICS``), the previous
    run's validation split (group "old": the previous model's score before, this one's after) and this
    run's (group "new"). ``*_refs``: each row's references; the others: each row's predicted text (None:
    that group is left out)."""
    from .metrics import caption_metrics, vqa_metrics

    score = vqa_metrics if task == "vqa" else caption_metrics
    rows = []
    for group, refs, before, after in (("old", old_refs, old_before, old_after), ("new", new_refs, new_before, new_after)):
        if not refs or after is None:
            continue
        b = score(before, refs) if before is not None else {}
        a = score(after, refs)
        for metric in TEXT_FORGETTING_METRICS[task]:
            rb, ra = (round(b[metric], 4) if b else None), round(a[metric], 4)
            rows.append({"group": group, "metric": metric, "support": len(refs), "before": rb, "after": ra,
                         "change": round(ra - rb, 4) if rb is not None else None})
    return rows


def setup_text(task, cfg) -> TextContinual | None:
    """The continual part of a captioning / VQA run whose base model is a saved captioning / VQA model."""
    previous = previous_model(cfg.base_model)
    return TextContinual(task, cfg, previous) if previous is not None else None


def memory_info(run_dir: Path) -> dict:
    """How many images of which classes a run's memory holds."""
    memory = load_memory(run_dir)
    labels = list(memory["label"]) if memory is not None else []
    return {"images": len(labels), "per_class": {c: labels.count(c) for c in dict.fromkeys(labels)}}

