"""Image-text retrieval (task ``retrieval``): the training task, its evaluation and the predictor.

Data: the captioning layout (images with a metadata.jsonl / .csv of ``file_name`` and ``text`` /
``caption``, several captions per image allowed), ingested by ``mmdemo.data.text`` (split by image); each
row is one image with its captions and its ``file_name`` (the path in the upload, shown by search).
The model is a dual encoder (``mmdemo.dualenc``: the offline LiT default, CLIP / SigLIP).

Each training visit of an image pairs it with one of its captions, chosen at random; the other pairs of
the batch are the negatives, except those whose caption is also a caption of this image. The evaluation
ranks every held-out image against every distinct held-out caption (``metrics.retrieval_metrics``).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .dualenc import TASK, build_dual_encoder
from .errors import UserInputError

EXAMPLE_QUERIES = 8  # evaluation examples: this many held-out captions with their top-5 images


class RetrievalRows(torch.utils.data.Dataset):
    """A split as tensors: distinct images decoded once (and, with a locked image tower, their features
    computed once), distinct captions tokenised once (and, with a frozen text tower, its outputs computed once)."""

    def __init__(self, split, model, image_size: int, locked: bool, train: bool, seed: int = 0,
                 frozen_text: bool = False):
        from .images import decode_unique

        self.pixels, self.image_of = decode_unique(split, image_size)
        self.captions = [list(c) for c in split["captions"]]
        self.file_names = list(split["file_name"]) if "file_name" in split.column_names else \
            [str(i) for i in range(len(self.captions))]
        self.texts = list(dict.fromkeys(c for caps in self.captions for c in caps))
        position = {t: i for i, t in enumerate(self.texts)}
        self.caption_ids = [tuple(position[c] for c in caps) for caps in self.captions]
        self.input_ids, self.attention_mask = model.tokenize(self.texts) if self.texts else (None, None)
        self.features = model.image_features(self.pixels) if locked and len(self.pixels) else None
        self.text_features = model.text_features(self.input_ids, self.attention_mask) \
            if frozen_text and self.texts else None
        self.train, self.rng = train, random.Random(seed)

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        ids = self.caption_ids[i]
        text = self.rng.choice(ids) if self.train else ids[0]
        k = self.image_of[i]
        image = {"image_features": self.features[k]} if self.features is not None else {"images": self.pixels[k]}
        caption = {"text_features": self.text_features[text]} if self.text_features is not None else \
            {"input_ids": self.input_ids[text], "attention_mask": self.attention_mask[text]}
        return {**image, **caption, "text": text, "caption_ids": ids}


def collate_pairs(items: list[dict], trim: bool = True) -> dict:
    """Stacks (image, caption) items; ``positives[i, j]``: caption j is one of image i's captions. A caption
    that several pairs share is tokenised (and encoded) once: ``text_index`` maps each pair to its row."""
    captions = [set(item["caption_ids"]) for item in items]
    texts = [item["text"] for item in items]
    first = {t: i for i, t in reversed(list(enumerate(texts)))}
    distinct = sorted(first.values())
    row = {texts[i]: r for r, i in enumerate(distinct)}
    batch = {"positives": torch.tensor([[t in caps for t in texts] for caps in captions], dtype=torch.bool),
             "text_index": torch.tensor([row[t] for t in texts], dtype=torch.long)}
    for key in ("images", "image_features"):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    for key in ("input_ids", "attention_mask", "text_features"):
        if key in items[0]:
            batch[key] = torch.stack([items[i][key] for i in distinct])
    if trim and "attention_mask" in batch:  # the captions were padded to the longest of the split: keep the batch's longest
        n = int(batch["attention_mask"].sum(1).max())
        batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:, :n], batch["attention_mask"][:, :n]
    return batch


class RetrievalTask:
    main_metric = "mean_recall"
    headline_metrics = ("t2i_recall@1", "t2i_recall@5", "i2t_recall@1", "i2t_recall@5")
    max_evals = 10

    def __init__(self, cfg, splits):
        self.model = build_dual_encoder(cfg.base_model, cfg.image_size, cfg.pretrained, cfg.contrastive_loss)
        self.model.apply_method(cfg.method, cfg.lora_r, cfg.lora_alpha)
        self.image_size = self.model.preprocess.image_size
        self.method = cfg.method
        locked, frozen_text = cfg.method in ("frozen_towers", "locked_image"), cfg.method == "frozen_towers"
        self.model.eval()
        self.train_ds = RetrievalRows(splits["train"], self.model, self.image_size, locked, True, cfg.seed, frozen_text)
        self.val_ds = RetrievalRows(splits["validation"], self.model, self.image_size, locked, False, cfg.seed,
                                    frozen_text)
        trim = self.model.padding is True

        def collate(items):
            return collate_pairs(items, trim)

        self.collate = collate

    def train_mode(self, model) -> None:
        model.train()
        inner = model.module if hasattr(model, "module") else model
        frozen = {"frozen_towers": inner.tower_modules(), "locked_image": [inner.image_tower],
                  "lora": inner.tower_modules()}.get(self.method, [])
        for name in frozen:  # a frozen or adapted tower keeps its BatchNorm statistics and has no dropout
            inner.get_submodule(name).eval()

    def loss(self, model, batch):
        return model(**batch)

    @torch.no_grad()
    def report(self, model, loader, acc, step) -> dict:
        from .metrics import retrieval_metrics

        model.eval()
        losses = [model(**batch).float().reshape(1).cpu() for batch in loader]
        inner = acc.unwrap_model(model)
        ds = self.val_ds
        images = inner.embed_features(ds.features) if ds.features is not None else inner.embed_images(ds.pixels)
        images = images[ds.image_of]
        texts = inner.embed_text_features(ds.text_features) if ds.text_features is not None else inner.embed_texts(ds.texts)
        similarity = images @ texts.T
        scores = retrieval_metrics(similarity.numpy(), ds.captions, ds.texts)
        examples = []
        for j in range(min(EXAMPLE_QUERIES, len(ds.texts))):
            top = similarity[:, j].topk(min(5, len(images)))
            examples.append({"query": ds.texts[j], "top": [
                {"file_name": ds.file_names[i], "score": round(float(s), 4), "match": ds.texts[j] in ds.captions[i]}
                for s, i in zip(top.values.tolist(), top.indices.tolist())]})
        return {"task": TASK, "step": step, "val_loss": round(torch.cat(losses).mean().item(), 5) if losses else 0.0,
                "num_val": len(ds), "num_val_captions": len(ds.texts),
                **{k: round(v, 5) for k, v in scores.items()}, "examples": examples}

    def save(self, model, model_dir: Path, run_dir: Path, result: dict) -> None:
        model.save(model_dir)
        model.save_adapters(model_dir)


def load_retrieval_predictor(key: str, task: str = TASK):
    """The dual encoder of a model folder, a CLIP / SigLIP folder or a Hub id (the task registry's predictor)."""
    from .dualenc import load_dual_encoder
    from .dualhf import HFDualEncoder
    from .refs import local_dir
    from .runs import META_FILE

    if not key:
        raise UserInputError(f"No {TASK} model yet: fine-tune one on a captioned image set (e.g. the retrieval "
                             "sample) and use its run, or give a CLIP / SigLIP Hub id such as "
                             "openai/clip-vit-base-patch32 (needs the Hub).")
    path = local_dir(key)
    if path is not None and (path / META_FILE).is_file():
        return load_dual_encoder(path)
    return HFDualEncoder.build(key)


def load_dual(checkpoint) -> object:
    """The cached dual encoder of a retrieval run or model folder, a CLIP / SigLIP folder or a Hub id; any
    other checkpoint is refused with what it is for."""
    from .inference import _cached, load_predictor
    from .refs import local_dir
    from .runs import model_dir_of

    checkpoint = str(checkpoint or "").strip()
    path = local_dir(checkpoint)
    if path is not None and model_dir_of(checkpoint) is None and (path / "config.json").is_file():
        return _cached(str(path), path.stat().st_mtime_ns, TASK)  # a transformers folder made elsewhere
    return load_predictor(checkpoint or None, TASK)
