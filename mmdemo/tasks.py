"""What differs between tasks inside the one training loop: model, data, loss, evaluation, saving.

``make_task(cfg, splits)`` returns the training task the task registry (``mmdemo.taskspec``) names:
``ClassificationTask`` or ``TextTask`` (captioning / VQA); ``mmdemo.training`` drives either through the
same methods. ``report`` is the one evaluation: its
float entries (``val_loss`` and the task's metrics) are the scores logged per evaluation, and the last
report of a run becomes eval.json.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from . import continual
from .errors import UserInputError
from .images import ImageTensors, decode_unique, normalize
from .recipe import (ANSWER_METHOD, PROBE_FILE, answer_vocabulary, fit_head, follows_data, freeze_early, glyph_like,
                     image_side, sample, shift_share, use_crops, use_freeze_early, use_hflip, use_probe_guard)
from .peft_methods import METHODS as PEFT_METHODS
from .taskspec import task_spec

MAX_NEW_TOKENS = {"vqa": 8, "captioning": 24}  # what evaluation generates: short answers, one-sentence captions


class ClassificationTask:
    main_metric = "accuracy"
    max_evals = 1000

    def __init__(self, cfg, splits):
        from .models import apply_method, build_classifier

        self.classes = splits["train"].features["label"].names
        self.model, self.label_map = build_classifier(cfg.base_model, self.classes, cfg.pretrained)
        apply_method(self.model, cfg.method, cfg.lora_r, cfg.lora_alpha)
        images = splits["train"]["image"]  # decoded once, for the data-aware choices and the tensors
        # Asked once for the freeze, the flips and the shifts (under 0.1 s: 64 images shrunk to 32 px).
        glyphs = glyph_like(sample(images))
        early = freeze_early(self.model.net) if use_freeze_early(cfg.freeze_early, cfg.method, cfg.pretrained,
                                                                 glyphs) else 0
        native = self.model.preprocess.image_size
        sizes = [im.size for im in images]
        self.image_size = cfg.image_size or (image_side(sizes, native) if follows_data(cfg.recipe, cfg.method)
                                             else native)
        self.model.preprocess.image_size = self.image_size
        self.method, self.label_smoothing = cfg.method, cfg.label_smoothing
        self.crop = use_crops(sizes, self.image_size)
        self.recipe, self.hflip = cfg.recipe, use_hflip(cfg.hflip, None, self.crop, glyphs)
        self.shift = shift_share(glyphs, self.crop)
        self.continued = continues_run(cfg.base_model)  # its head is trained already
        self.batch_size = cfg.batch_size
        self.probe_guard = use_probe_guard(cfg.probe_guard, cfg.recipe, cfg.method, cfg.pretrained, len(images),
                                           self.continued, bool(cfg.teacher), glyphs)
        # Written to config.yaml by the loop.
        self.resolved = {"hflip": "on" if self.hflip else "off", "freeze_early": "on" if early else "off",
                         "probe_guard": "on" if self.probe_guard else "off",
                         "extra": {**cfg.extra, "random_crops": cfg.augment and self.crop,
                                   "random_shifts": cfg.augment and self.shift > 0}}
        self.augment = cfg.augment
        self.train_ds = self.training_tensors(splits["train"], self.label_map, images=images)
        self.val_ds = ImageTensors(splits["validation"], self.image_size, self.label_map, train=False)
        self.labelled_ds = self.train_ds
        self.collate = None
        self.channels_last = self.model.channels_last_input
        # A continued run keeps what its base knew (rehearsal memory / distillation), by cfg.keep_old.
        self.continual = continual.setup(self, cfg, splits)
        self.distiller = None  # a teacher run's soft labels (mmdemo/distill.py)
        if cfg.teacher:
            from .distill import Distiller

            self.distiller = Distiller(self, cfg, splits)
        self.train_split, self.val_split, self.base_model = splits["train"], splits["validation"], cfg.base_model

    def training_tensors(self, split, label_map: list[int], images=None) -> ImageTensors:
        """``split`` as training images with the run's augmentation (crops, shifts and flips as resolved above): the
        training split, a continued run's replay memory, a distilled run's unlabelled images."""
        return ImageTensors(split, self.image_size, label_map, train=self.augment, hflip=self.hflip, images=images,
                            crop=self.crop, shift=self.shift)

    def train_mode(self, model) -> None:
        # "head": the backbone is a fixed feature extractor. "lora": the adapter must reproduce the model
        # on top of the original base, so BatchNorm statistics (not part of the adapter) stay frozen.
        model.train(self.method not in ("head", "lora", *PEFT_METHODS))

    @staticmethod
    def _linear_head(model):
        """(the classifier, its final ``nn.Linear``), the head None where it is of another shape (a continued
        run's, a custom one) or wrapped by an adapter."""
        inner = model.module if hasattr(model, "module") else model
        try:
            head = inner.net.get_submodule(inner.head_name)
        except AttributeError:  # wrapped by an adapter
            head = None
        return inner, head if isinstance(head, torch.nn.Linear) else None

    def _fit_head(self, inner, head) -> dict:
        labelled = self.labelled_ds  # without the unlabelled images a distilled run may add
        return fit_head(inner, head, labelled.pixels, labelled.labels, self.image_size,
                        self._logits, batch_size=self.batch_size)

    def before_training(self, model) -> dict:
        """LP-FT's first phase where the recipe has it: the new head fitted on frozen features."""
        if self.recipe != "lp-ft" or self.continued:
            return {}
        inner, head = self._linear_head(model)
        return self._fit_head(inner, head) if head is not None else {}

    def probe_candidate(self, model, loader, acc, run_dir: Path) -> dict:
        """Where the recipe has the probe guard, before the first step: the pretrained network's linear probe
        (its head fitted on frozen features), scored on validation and kept in ``run_dir/PROBE_FILE``; the
        head then goes back to its initial weights. Returns the phase's figures ({} where there is none)."""
        inner, head = self._linear_head(acc.unwrap_model(model))
        if not self.probe_guard or head is None:
            return {}
        initial = {k: v.detach().clone() for k, v in head.state_dict().items()}
        rng = torch.get_rng_state()  # a validation pass draws the loader's seed: the run's random draws stay its own
        fitted = self._fit_head(inner, head)
        if fitted:
            scored = self.report(model, loader, acc, 0)
            fitted.update(val_accuracy=scored["accuracy"], val_loss=scored["val_loss"])
            if acc.is_main_process:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                          str(Path(run_dir) / PROBE_FILE), metadata={"val_accuracy": repr(fitted["val_accuracy"])})
        head.load_state_dict(initial)
        torch.set_rng_state(rng)
        acc.wait_for_everyone()
        return fitted

    def keep_probe(self, model, result: dict, run_dir: Path) -> bool:
        """Puts the probe of ``probe_candidate`` (the pretrained network and its fitted head) in ``model`` where it
        scored at least as high on validation as ``result``; whether it did. A tie keeps the probe, the simpler
        model: bench/recipes.py's faces had a fine-tune at 1.0 on validation and 0.986 on test where the probe
        scored 1.0 on both; on shapes both are 1.0 (bench/RESULTS.md)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(run_dir) / PROBE_FILE
        inner, head = self._linear_head(model)
        if not self.probe_guard or head is None or not path.is_file():
            return False
        with safe_open(str(path), "pt") as f:
            score = float((f.metadata() or {}).get("val_accuracy", "nan"))
        if not score >= result.get("accuracy", float("inf")):  # a probe's NaN never wins
            return False
        from .models import build_classifier

        pretrained = build_classifier(self.base_model, self.classes, True)[0]
        inner.net.load_state_dict(pretrained.net.state_dict())
        head.load_state_dict(load_file(str(path), device=str(head.weight.device)))
        return True

    def _logits(self, model, x):
        pre = self.model.preprocess
        return model(normalize(x, pre.mean, pre.std, self.channels_last)).float()

    def loss(self, model, batch):
        x, y = batch
        logits = self._logits(model, x)
        if self.distiller:
            return self.distiller.loss(logits, x, y, self.label_smoothing, self.channels_last)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.continual and self.continual.distills:
            loss = loss + self.continual.distill_loss(logits, x, self.channels_last)
        return loss

    @torch.no_grad()
    def predict(self, model, loader, acc):
        model.eval()  # BatchNorm running statistics and no dropout: what inference will see
        return gather_predictions(((self._logits(model, x), y) for x, y in loader), acc)

    def report(self, model, loader, acc, step) -> dict:
        losses, preds, labels = self.predict(model, loader, acc)
        return evaluation_report(losses, preds, labels, acc.unwrap_model(model).labels, self.val_ds.row_ids, step)

    def save(self, model, model_dir: Path, run_dir: Path, result: dict) -> None:
        from .models import save_classifier

        save_classifier(model, model_dir, task="classification")
        if hasattr(model.net, "peft_config"):
            model.net.save_pretrained(model_dir / "adapter")
        if self.continual:  # eval.json gets the forgetting table (result is written after this call)
            result.update(self.continual.report(model, self.image_size, self.val_split))
        if self.distiller:  # teacher, student and baseline: accuracy, CPU latency, parameters (+ distill.png)
            result.update(self.distiller.report(model, self.image_size, self.val_split, result["accuracy"], run_dir))
        previous = continual.previous_model(self.base_model)
        continual.save_memory(run_dir, self.train_split, self.classes, previous[1] if previous else None)
        plot_confusion(result, run_dir / "confusion_matrix.png")


def continues_run(base_model: str) -> bool:
    """Whether ``base_model`` names a previous run (or its model folder) rather than a new backbone."""
    from .refs import local_dir
    from .runs import META_FILE

    path = local_dir(base_model) if base_model else None
    return path is not None and ((path / META_FILE).is_file() or (path / "model" / META_FILE).is_file())


def gather_predictions(batches, acc):
    """Per-row losses, predicted and true labels, gathered from every process, of ``(logits, labels)``
    batches (the caller runs the model in eval mode under no_grad)."""
    losses, preds, labels = [], [], []
    for logits, y in batches:
        loss = F.cross_entropy(logits, y, reduction="none")
        loss, logits, y = acc.gather_for_metrics((loss, logits, y))
        losses.append(loss.cpu())
        preds.append(logits.argmax(-1).cpu())
        labels.append(y.cpu())
    return torch.cat(losses), torch.cat(preds), torch.cat(labels)


def evaluation_report(losses, preds, labels, label_names, row_ids, step) -> dict:
    """Accuracy, per-class precision / recall / F1, the confusion matrix and misclassified rows."""
    n = len(label_names)
    cm = torch.zeros(n, n, dtype=torch.long)
    cm.index_put_((labels, preds), torch.ones_like(labels), accumulate=True)
    per_class = {}
    for k, name in enumerate(label_names):
        tp, support, predicted = cm[k, k].item(), cm[k].sum().item(), cm[:, k].sum().item()
        if support == 0 and predicted == 0:
            continue  # a label of an earlier run that this dataset does not have
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                           "support": support}
    wrong = (preds != labels).nonzero().flatten().tolist()
    present = [i for i, name in enumerate(label_names) if name in per_class]
    return {"task": "classification", "step": step, "accuracy": round((preds == labels).float().mean().item(), 5),
            "val_loss": round(losses.mean().item(), 5), "num_val": len(labels), "per_class": per_class,
            "labels": [label_names[i] for i in present],
            "confusion_matrix": cm[present][:, present].tolist(),
            "misclassified": [{"row": row_ids[i], "label": label_names[labels[i]], "predicted": label_names[preds[i]]}
                              for i in wrong[:64]]}


def plot_confusion(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, cm = result["labels"], result["confusion_matrix"]
    size = min(12, 2 + 0.5 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 30:
        dark = max(max(row) for row in cm) / 2  # "Blues" cells past half the top count are dark
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > dark else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Captioning and VQA


class TextRows(torch.utils.data.Dataset):
    """Decoded pixels (once) plus the texts of each row; training picks one caption per visit."""

    def __init__(self, split, image_size: int, task: str, train: bool, seed: int, featurize=None):
        # VQA rows repeat their image (about ten questions each): decode and encode each image once.
        self.pixels, self.image_of = decode_unique(split, image_size)
        # A frozen encoder's output never changes: compute it once and train on it.
        self.features = torch.cat([featurize(self.pixels[i:i + 64]) for i in range(0, len(self.pixels), 64)]) \
            if featurize is not None and len(self.pixels) else None
        self.task, self.train, self.rng = task, train, random.Random(seed)
        if task == "vqa":
            self.questions, self.references = list(split["question"]), [list(a) for a in split["answers"]]
        else:
            self.questions, self.references = None, [list(c) for c in split["captions"]]
        self.row_ids = list(range(len(self.references)))

    def __len__(self):
        return len(self.references)

    def __getitem__(self, i):
        refs = self.references[i]
        # Training sees every reference over the epochs; evaluation uses the most common one.
        text = self.rng.choice(refs) if self.train else max(set(refs), key=refs.count)
        k = self.image_of[i]
        item = {"pixels": self.pixels[k], "row": i} if self.features is None else {"features": self.features[k], "row": i}
        if self.task == "vqa":
            item.update(question=self.questions[i], answer=text)
        else:
            item["text"] = text
        return item


class TextTask:
    max_evals = 10

    def __init__(self, cfg, splits):
        from .vlm import apply_text_method, build_image_text_model

        self.task = cfg.task
        self.main_metric = "vqa_accuracy" if cfg.task == "vqa" else "cider"
        if cfg.method == ANSWER_METHOD:  # closed-answer VQA: a classifier over the training answers
            from .vlm.answers import build_answer_model

            self.model = build_answer_model(cfg.base_model, answer_vocabulary(splits["train"]["answers"]),
                                            cfg.image_size, cfg.pretrained)
        else:
            self.model = build_image_text_model(cfg.task, cfg.base_model, cfg.image_size, cfg.pretrained)
            apply_text_method(self.model, cfg.method, cfg.lora_r, cfg.lora_alpha)
        self.image_size = cfg.image_size or self.model.preprocess.image_size
        self.model.preprocess.image_size = self.image_size
        self.max_new_tokens = MAX_NEW_TOKENS[cfg.task]
        self.frozen = self.model.vision_modules() if cfg.method != "full" else []
        featurize = None
        if self.frozen and hasattr(self.model, "image_features"):
            self.model.eval()
            featurize = self.model.image_features
        self.featurize = featurize
        self.train_ds = TextRows(splits["train"], self.image_size, cfg.task, True, cfg.seed, featurize)
        self.val_ds = TextRows(splits["validation"], self.image_size, cfg.task, False, cfg.seed, featurize)
        self.collate = self.model.collate
        # A continued run replays its base run's memory of training rows (cfg.keep_old) and reports forgetting.
        self.continual = continual.setup_text(self, cfg)
        self.train_split, self.predictions = splits["train"], []

    def train_mode(self, model) -> None:
        model.train()
        inner = model.module if hasattr(model, "module") else model
        for name in self.frozen:  # a frozen encoder keeps its BatchNorm statistics too
            inner.get_submodule(name).eval()

    def loss(self, model, batch):
        return model(**batch)

    @torch.no_grad()
    def predict(self, model, loader, acc):
        from accelerate.utils import gather_object

        model.eval()
        losses = [acc.gather_for_metrics(model(**batch).detach().reshape(1)).cpu() for batch in loader]
        # each process generates for its share of the chunks
        preds = generate_pairs(acc.unwrap_model(model), self.val_ds, self.task, self.max_new_tokens,
                               (acc.process_index, acc.num_processes))
        preds = sorted(gather_object(preds) if acc.num_processes > 1 else preds)
        return torch.cat(losses).mean().item(), [p for _, p in preds]

    def report(self, model, loader, acc, step) -> dict:
        from .metrics import caption_metrics, vqa_metrics

        val_loss, preds = self.predict(model, loader, acc)
        self.predictions = preds  # the final report's, for the forgetting table of a continued run
        refs = self.val_ds.references
        scores = vqa_metrics(preds, refs) if self.task == "vqa" else caption_metrics(preds, refs)
        examples = [{"row": i, "question": self.val_ds.questions[i] if self.task == "vqa" else None,
                     "references": refs[i], "predicted": preds[i]} for i in range(min(len(preds), 48))]
        return {"task": self.task, "step": step, "val_loss": round(val_loss, 5), "num_val": len(refs),
                **{k: round(v, 5) for k, v in scores.items()}, "examples": examples}

    def save(self, model, model_dir: Path, run_dir: Path, result: dict) -> None:
        from .vlm import save_image_text_model

        save_image_text_model(model, model_dir)
        peft_part = getattr(model, model.peft_attr)
        if hasattr(peft_part, "peft_config"):  # the adapter as well as the merged model
            peft_part.save_pretrained(model_dir / "adapter")
        if self.continual:  # eval.json gets the forgetting table (result is written after this call)
            result.update(self.continual.report(model, self, self.predictions))
        continual.save_text_memory(run_dir, self.train_split, self.task,
                                   self.continual.run_dir if self.continual else None)


@torch.no_grad()
def generate_pairs(model, rows: TextRows, task: str, max_new_tokens: int, shard: tuple[int, int] = (0, 1),
                   pixels_only: bool = False) -> list[tuple[int, str]]:
    """(row, generated text) for the rows of ``rows`` in this process's share of the chunks of 64 (``shard``:
    process index, count); ``pixels_only``: from the images even where ``rows`` holds encoder features (another
    model's)."""
    was_training = model.training
    model.eval()
    # Questions of one length generate together (no padding): ordering by length first means a few
    # large batches instead of several small ones per chunk.
    order = sorted(range(len(rows)), key=lambda i: len(rows.questions[i]) if task == "vqa" else 0)
    preds = []
    for chunk, start in enumerate(range(0, len(order), 64)):
        if chunk % shard[1] != shard[0]:
            continue
        idx = order[start:start + 64]
        images = rows.pixels[rows.image_of[idx]]
        questions = [rows.questions[i] for i in idx] if task == "vqa" else None
        kw = {"features": rows.features[rows.image_of[idx]]} if rows.features is not None and not pixels_only else {}
        preds += list(zip(idx, model.generate(images, questions, max_new_tokens=max_new_tokens, **kw)))
    model.train(was_training)
    return preds


def generate_texts(model, rows: TextRows, task: str, max_new_tokens: int, pixels_only: bool = False) -> list[str]:
    """Every row's generated text, in row order (in this process)."""
    return [text for _, text in sorted(generate_pairs(model, rows, task, max_new_tokens, pixels_only=pixels_only))]


def make_task(cfg, splits):
    if "validation" not in splits or len(splits["validation"]) == 0:
        raise UserInputError("The dataset has no validation images; ingest it again so a split is made.")
    columns = set(splits["train"].column_names)
    spec = task_spec(cfg.task)
    if not spec.columns <= columns:
        raise UserInputError(f"This dataset was ingested for another task (its columns: {', '.join(sorted(columns))}); "
                             f"load it again with task '{cfg.task}'.")
    return spec.resolve("training")(cfg, splits)
