"""Image + text classification (task ``image_text_classification``): ingest, training task, predictor.

Data: images plus a metadata.csv / metadata.jsonl of ``file_name``, ``text``, ``label`` rows (an image
may appear in several rows, with different texts and labels), or a Hub dataset with image, text and
label columns. Rows are grouped by image for decoding (each image decoded once) and for the validation
split (no image in two splits), then saved one row per (image, text, label).

The model is the ``fused`` family (``mmdemo.fusion``). Its evaluation adds a modality ablation: the
accuracy with both inputs, with the image only and with the text only (the other input replaced by the
null embedding it was trained with).
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path

from .errors import UserInputError

TASK = "image_text_classification"
EXAMPLE = {"file_name": "images/1.jpg", "text": "what color is the shape?", "label": "red"}
NEEDED = [("text",), ("label",)]


def _layout():
    from .data.upload import Layout

    return Layout("images with a metadata.csv (file_name, text, label)",
                  "with a metadata.csv or metadata.jsonl giving each row's file_name, text and label")


# ---------------------------------------------------------------------------------------------
# Ingest


def ingest_image_text(source, work, task=TASK, *, val_fraction, seed, max_side):
    """-> (DatasetDict of image, text, label rows, class names, split -> label -> rows, warnings)."""
    import datasets

    from .data.decode import decode_split, duplicate_warning, require_readable
    from .data.text import _decode_unit, _describe, _split_by_image
    from .data.upload import SPLITS, listing, open_upload, plural

    upload = open_upload(source, work, _layout())
    units, warnings = _hub_units(upload.hub_id) if upload.hub_id else _upload_units(upload)
    decoded, skipped = {}, []
    for split, ds in units.items():
        decoded[split], bad = decode_split(ds, split, _decode_unit, _unit_features(datasets.Image(), digest=True),
                                           {"max_side": max_side}, work, _describe)
        skipped += bad
    require_readable(decoded, skipped)
    if skipped:
        warnings.append(f"Skipped {plural(len(skipped), 'unreadable image')} and dropped their metadata rows: "
                        f"{listing(skipped, 10)}.")
    splits = _split_by_image(decoded, val_fraction, seed)
    warnings += duplicate_warning(splits)
    classes = sorted({label for ds in splits.values() for labels in ds["labels"] for label in labels})
    if len(classes) < 2:
        raise UserInputError(f"The label column has {len(classes)} distinct value ({', '.join(classes)}); need at "
                             "least 2 labels, e.g. yes and no.")
    train_labels = {label for labels in splits["train"]["labels"] for label in labels}
    unseen = [c for c in classes if c not in train_labels]
    if unseen:
        warnings.append(f"{plural(len(unseen), 'label')} never occur in the training rows, so the model cannot "
                        f"learn them: {listing(unseen, 5)}; add training rows with them.")
    out = datasets.DatasetDict({s: _rows(splits[s], classes, work / f"rows-{s}.arrow") for s in SPLITS if s in splits})
    tallies = {s: Counter(out[s].features["label"].int2str(y) for y in out[s]["label"]) for s in out}
    return out, classes, {s: {c: tallies[s][c] for c in classes} for s in out}, warnings


def _unit_features(image, digest=False):
    import datasets

    texts = datasets.List(datasets.Value("string"))
    columns = {"image": image, "source": datasets.Value("string"), "rows": datasets.Value("string"),
               "texts": texts, "labels": texts}
    if digest:
        columns.update(digest=datasets.Value("string"), error=datasets.Value("string"))
    return datasets.Features(columns)


def _units_dataset(units: dict, images=None):
    """file -> {"image", "source", "rows", "texts", "labels"} -> a Dataset, one row per image."""
    import datasets

    units = list(units.values())
    columns = {"source": [u["source"] for u in units],
               "rows": [f"line{'s' * (len(u['rows']) > 1)} {', '.join(u['rows'])}" for u in units],
               "texts": [u["texts"] for u in units], "labels": [u["labels"] for u in units]}
    features = _unit_features(datasets.Image(decode=False))
    if images is None:
        return datasets.Dataset.from_dict({"image": [u["image"] for u in units], **columns}, features=features)
    del features["image"]
    return datasets.concatenate_datasets([images, datasets.Dataset.from_dict(columns, features=features)], axis=1)


def _cell(value, name) -> tuple[str, str]:
    """One text / label cell -> (its text, the problem)."""
    from .data.text import _texts

    texts, problem = _texts(value, name)
    if problem:
        return "", problem
    if len(texts) > 1:
        return "", f"the {name} holds several values; write one {name} per row"
    return texts[0], ""


def _upload_units(upload):
    from .data.text import _image_path
    from .data.upload import (METADATA_NAMES, check_columns, extra_columns_warning, ignored_images_warning,
                              image_extensions, listing, plural, read_metadata, split_files)

    root = upload.root
    metas = {"train": [upload.metadata]} if upload.metadata else {
        split: sorted(p for p in paths if p.name in METADATA_NAMES) for split, paths in split_files(root).items()}
    for split, found in metas.items():
        if not found:
            raise UserInputError(f"No metadata.csv or metadata.jsonl for the {split} images in '{upload.display}'; "
                                 f"{TASK} needs one next to the images with a row per image and text, e.g. "
                                 f"{json.dumps(EXAMPLE)}.")
    if len({p.suffix for found in metas.values() for p in found}) > 1:
        raise UserInputError(f"'{upload.display}' has both metadata.csv and metadata.jsonl files; use one format.")
    units, problems, warnings, exts = {}, [], [], image_extensions()
    for split, split_metas in metas.items():
        units[split] = {}
        for meta in split_metas:
            display = Path(os.path.relpath(meta, root)).as_posix()
            columns, rows = read_metadata(meta, display, EXAMPLE)
            chosen = check_columns(display, columns, NEEDED, "Rename the columns.")
            if not rows:
                raise UserInputError(f"'{display}' has no rows; add one per image and text, e.g. {json.dumps(EXAMPLE)}.")
            warnings += extra_columns_warning(display, columns, list(chosen.values()))
            for line, row in rows:
                file_name = row.get("file_name")
                where = f"{display} line {line}" + (f" ({file_name})" if isinstance(file_name, str) and file_name else "")
                rel, problem = _image_path(file_name, meta, root, exts)
                text, problem = ("", problem) if problem else _cell(row.get(chosen["text"]), "text")
                label, problem = ("", problem) if problem else _cell(row.get(chosen["label"]), "label")
                if problem:
                    problems.append(f"{where}: {problem}")
                    continue
                unit = units[split].setdefault(rel, {"image": {"path": str(root / rel), "bytes": None},
                                                     "source": rel, "rows": [], "texts": [], "labels": []})
                unit["rows"].append(f"{display}:{line}")
                unit["texts"].append(text)
                unit["labels"].append(label)
    if problems:
        hint = (" file_name is the image's path relative to the folder of its metadata file, e.g. images/1.jpg."
                if any("not in the upload" in p for p in problems) else "")
        raise UserInputError(f"{plural(len(problems), 'metadata row')} cannot be used: {listing(problems, 5, '; ')}. "
                             f"Fix or delete those rows and upload again.{hint}")
    if not upload.metadata:
        warnings += ignored_images_warning({rel for found in units.values() for rel in found}, root)
    return {split: _units_dataset(found) for split, found in units.items()}, warnings


def _hub_units(repo_id):
    """A Hub dataset -> one unit per row; rows without a text or label are dropped and named in a warning."""
    from .data.upload import expected_columns, hub_image_column, listing, load_hub, plural, select_hub_splits

    raw = load_hub(repo_id, _layout())
    first = raw[next(iter(raw))].features
    image = hub_image_column(first)
    if image is None or not all(c in first for (c,) in NEEDED):
        raise UserInputError(f"Hub dataset '{repo_id}' has columns {', '.join(first)}; need "
                             f"{expected_columns(NEEDED, ['an image column'])} for {TASK}.")
    units, dropped = {}, []
    for split, ds in select_hub_splits(raw, repo_id, {image: "image", "text": "text", "label": "label"}).items():
        names = ds.features["label"].names if hasattr(ds.features["label"], "names") else None
        keep, found = [], {}
        for index, row in enumerate(ds.remove_columns("image")):
            label = names[row["label"]] if names and isinstance(row["label"], int) else row["label"]
            text, problem = _cell(row["text"], "text")
            label, problem = ("", problem) if problem else _cell(label, "label")
            if problem:
                dropped.append(f"{split} row {index}: {problem}")
                continue
            keep.append(index)
            found[index] = {"source": f"{split} row {index}", "rows": [str(index)], "texts": [text], "labels": [label]}
        units[split] = _units_dataset(found, images=ds.select(keep).select_columns(["image"]))
    warnings = [f"Dropped {plural(len(dropped), 'row')} of '{repo_id}' without a usable text or label: "
                f"{listing(dropped, 5)}."]
    return units, warnings if dropped else []


def _explode(batch, classes):
    index = {c: i for i, c in enumerate(classes)}
    out = {"image": [], "text": [], "label": []}
    for image, texts, labels in zip(batch["image"], batch["texts"], batch["labels"]):
        out["image"] += [image] * len(texts)  # the encoded bytes, shared: small after max_side
        out["text"] += texts
        out["label"] += [index[label] for label in labels]
    return out


def _rows(units, classes, cache_file: Path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=classes)})
    units = units.cast_column("image", datasets.Image(decode=False))
    return units.map(_explode, batched=True, features=features, remove_columns=units.column_names,
                     fn_kwargs={"classes": classes}, cache_file_name=str(cache_file))


# ---------------------------------------------------------------------------------------------
# Training


def _torch():
    import torch

    return torch


class FusedRows:
    """A split as tensors: each distinct image decoded once and each distinct text tokenised once; with
    frozen encoders, their outputs computed once (image feature maps, text token states) and trained on."""

    def __init__(self, split, model, image_size: int, frozen: bool):
        torch = _torch()
        from .images import decode_unique

        self.pixels, self.image_of = decode_unique(split, image_size)
        self.texts = list(split["text"])
        distinct = list(dict.fromkeys(self.texts))
        position = {t: i for i, t in enumerate(distinct)}
        self.text_of = torch.tensor([position[t] for t in self.texts], dtype=torch.long)
        self.input_ids, self.attention_mask = model.tokenize(distinct) if distinct else (None, None)
        self.labels = torch.tensor(list(split["label"]), dtype=torch.long)
        self.row_ids = list(range(len(self.labels)))
        self.image_features = self.text_features = None
        if frozen and len(self.labels):
            model.eval()
            self.image_features = model.image_features(self.pixels)
            self.text_features = model.text_features(self.input_ids, self.attention_mask)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        k, j = self.image_of[i], self.text_of[i]
        item = {"attention_mask": self.attention_mask[j], "labels": self.labels[i]}
        if self.image_features is not None:
            item.update(image_features=self.image_features[k], text_features=self.text_features[j])
        else:
            item.update(images=self.pixels[k], input_ids=self.input_ids[j])
        return item


class ImageTextClassificationTask:
    main_metric = "accuracy"
    max_evals = 1000

    def __init__(self, cfg, splits):
        from .fusion import apply_fused_method, build_fused_model

        self.classes = splits["train"].features["label"].names
        self.model = build_fused_model(cfg.base_model, self.classes, cfg.image_size, cfg.pretrained)
        apply_fused_method(self.model, cfg.method, cfg.lora_r, cfg.lora_alpha)
        self.image_size = self.model.preprocess.image_size
        self.method, self.label_smoothing = cfg.method, cfg.label_smoothing
        self.modality_dropout = float(cfg.extra.get("modality_dropout", _fusion().MODALITY_DROPOUT))
        frozen = cfg.method == "frozen_encoders"
        self.train_ds = FusedRows(splits["train"], self.model, self.image_size, frozen)
        self.val_ds = FusedRows(splits["validation"], self.model, self.image_size, frozen)
        self.collate = None  # every item is a dict of equal-shape tensors: the default collate stacks them

    def train_mode(self, model) -> None:
        model.train()
        if self.method != "full":  # frozen or adapted encoders keep their BatchNorm statistics and no dropout
            inner = model.module if hasattr(model, "module") else model
            for name in inner.encoder_modules():
                inner.get_submodule(name).eval()

    def loss(self, model, batch):
        torch = _torch()
        labels = batch.pop("labels")
        r = torch.rand(len(labels), device=labels.device)
        p = self.modality_dropout
        logits = model(**batch, drop_image=r < p / 2, drop_text=(r >= p / 2) & (r < p))
        batch["labels"] = labels
        return torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def predict(self, model, loader, acc, drop: str = ""):
        """(losses, predictions, labels) over the loader; ``drop`` "image" / "text" replaces that input by
        its null embedding."""
        torch = _torch()
        from .tasks import gather_predictions

        def batches():
            for batch in loader:
                batch = dict(batch)
                y = batch.pop("labels")
                flags = {f"drop_{m}": torch.full((len(y),), drop == m, device=y.device) for m in ("image", "text")}
                yield model(**batch, **flags).float(), y

        model.eval()
        with torch.no_grad():
            return gather_predictions(batches(), acc)

    def report(self, model, loader, acc, step) -> dict:
        from .tasks import evaluation_report

        losses, preds, labels = self.predict(model, loader, acc)
        result = evaluation_report(losses, preds, labels, self.classes, self.val_ds.row_ids, step)
        for row in result["misclassified"]:
            row["text"] = self.val_ds.texts[row["row"]]
        image_only = (self.predict(model, loader, acc, "text")[1] == labels).float().mean().item()
        text_only = (self.predict(model, loader, acc, "image")[1] == labels).float().mean().item()
        majority = Counter(labels.tolist()).most_common(1)[0][1] / max(1, len(labels))
        result.update(task=TASK, image_only_accuracy=round(image_only, 5), text_only_accuracy=round(text_only, 5),
                      ablation={"both": result["accuracy"], "image_only": round(image_only, 5),
                                "text_only": round(text_only, 5), "majority_class": round(majority, 5)})
        return result

    def save(self, model, model_dir: Path, run_dir: Path, result: dict) -> None:
        from .tasks import plot_confusion

        model.save(model_dir)
        for part, folder in (("image_encoder", "vision"), ("text_encoder", "text")):
            inner = getattr(model, part)
            if hasattr(inner, "peft_config"):  # the adapters as well as the merged model
                inner.save_pretrained(model_dir / "adapter" / folder)
        plot_confusion(result, run_dir / "confusion_matrix.png")


def _fusion():
    from . import fusion

    return fusion


# ---------------------------------------------------------------------------------------------
# Prediction


def load_image_text_predictor(key: str, task: str = TASK):
    """The fused classifier of a folder or a Hub id (the task registry's predictor)."""
    from .fusion import FusedClassifier
    from .refs import local_dir

    if not key:
        raise UserInputError(f"No {TASK} model yet: fine-tune one on an image + text dataset (e.g. the sample) and "
                             "use its run.")
    if local_dir(key):
        return FusedClassifier.load(key)
    from huggingface_hub import snapshot_download

    from .models import ensure_hub

    ensure_hub(key)
    return FusedClassifier.load(snapshot_download(key))


def classify_batch(images, texts, checkpoint, top_k: int = 5) -> list[dict[str, float]]:
    """Top-k labels with probabilities for (image, text) pairs from an image + text classification model."""
    torch = _torch()
    from .checks import shown
    from .images import resize_center_crop
    from .inference import batcher, load_predictor

    texts = [None] * len(images) if texts is None else list(texts)
    wrong = next((t for t in texts if t is not None and not isinstance(t, str)), None)
    if wrong is not None:
        raise UserInputError(f"text must be text (got {shown(wrong)})")
    texts = [(t or "").strip() for t in texts]
    if len(texts) != len(images) or not all(texts):
        raise UserInputError("This checkpoint classifies an image together with a text: type the text that goes "
                             "with the image (e.g. its question, title or caption).")
    model = load_predictor(checkpoint, TASK)
    pixels = torch.stack([resize_center_crop(image, model.preprocess.image_size) for image in images])
    probs = batcher.submit(("image_text", model), functools.partial(_classify_pairs, model), (pixels, texts),
                           len(texts))
    top = probs.topk(min(top_k, probs.shape[-1]))
    return [{model.labels[i]: round(float(p), 5) for p, i in zip(values, indices)}
            for values, indices in zip(top.values.tolist(), top.indices.tolist())]


def _classify_pairs(model, pairs: list[tuple]) -> list:
    """Probabilities for several callers' (uint8 images, texts) in one forward (the batcher's run function)."""
    torch = _torch()
    from .inference import _on_device

    with torch.no_grad():
        device = _on_device(model)
        input_ids, attention_mask = model.tokenize([text for _, texts in pairs for text in texts])
        logits = model(attention_mask.to(device), images=torch.cat([pixels for pixels, _ in pairs]),
                       input_ids=input_ids.to(device))
        return list(logits.float().softmax(-1).cpu().split([len(texts) for _, texts in pairs]))


def checkpoint_task(checkpoint) -> str:
    """The task a run directory or model folder was trained for ("" for anything else)."""
    from .runs import META_FILE, model_dir_of

    model_dir = model_dir_of(str(checkpoint)) if checkpoint else None
    if model_dir is None:
        return ""
    return json.loads((model_dir / META_FILE).read_text()).get("task", "classification")
