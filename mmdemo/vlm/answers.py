"""Closed-answer VQA (the ``answer_head`` method, family ``answer-head``): a classifier over the answers of
the training questions instead of a text decoder.

Many VQA datasets ask a fixed kind of question whose answers come from a short list (colours, shapes,
yes / no, counts). There a late-fusion classifier over frozen encoders (``mmdemo.fusion``'s
``efficientnet_lite0+minilm``: the pooled image feature and the mean-pooled question embedding, joined by
an MLP) answers better and at a fraction of the cost of generating the answer token by token: both
encoders' outputs are computed once per distinct image and question, and only the fusion head trains.
It can only give answers it saw in training; ``mmdemo.recipe.vqa_method`` picks it by default where the
validation questions' answers are (nearly) all among the training answers, the generative
``frozen_vision`` otherwise.

The model keeps the image-to-text interface (``collate``, a loss from ``forward``, ``generate`` returning
strings), so the text task's loop, evaluation (VQA accuracy), the Ask tab and ``mmdemo.answer`` use it
like any other VQA model. Saved, it is a fused classifier folder (vision/, text/, fusion.safetensors)
whose mmdemo.json says task ``vqa``, family ``answer-head``; ``id2label`` holds the answers.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..families import register_family
from ..metrics import normalize_answer
from ..recipe import answer_vocabulary  # noqa: F401 (the classes of a training split; re-exported)
from .base import DEFAULT_TEXT_MODEL, ImageTextModel

IGNORE = -100  # a question whose answer is not among the model's: no loss, and counted wrong by the VQA metric
# Distinct question texts whose encoder output is kept in memory (about 16 tokens x 384 halves each: 12 kB).
TEXT_CACHE_ROWS = 100_000


@register_family
class AnswerClassifier(ImageTextModel):
    """A fused image + question classifier (``net``, a ``mmdemo.fusion.FusedClassifier``) whose labels are
    answers."""

    family = "answer-head"
    library = "mmdemo"
    peft_attr = "net"

    @classmethod
    def matches(cls, name: str) -> bool:
        return False  # built by the answer_head method from the fused encoders, never from a name alone

    @classmethod
    def load(cls, model_dir, meta: dict, preprocess) -> "AnswerClassifier":
        from ..fusion import FusedClassifier

        return cls(FusedClassifier.load(model_dir), meta["base_model"])

    def __init__(self, net, base_model: str):
        super().__init__("vqa", net.preprocess, base_model)
        self.net = net
        self._reindex()
        self._text_cache: dict[str, torch.Tensor] = {}

    def _reindex(self) -> None:
        self._index = {normalize_answer(a): i for i, a in enumerate(self.net.labels)}

    @property
    def answers(self) -> list[str]:
        return self.net.labels

    def vision_modules(self) -> list[str]:
        """Both encoders: the method trains the fusion head only (and they keep their BatchNorm statistics)."""
        return ["net.image_encoder", "net.text_encoder"]

    def prompt_tuning_problem(self) -> str:
        return "A closed-answer run has no text decoder to prompt: continue it with answer_head."

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.image_features(images)

    def answer_index(self, answer: str) -> int:
        return self._index.get(normalize_answer(answer), IGNORE)

    def collate(self, items):
        key = "features" if "features" in items[0] else "pixels"
        questions = [it["question"] for it in items]
        input_ids, attention_mask = self.net.tokenize(questions)
        batch = {"image_features" if key == "features" else "images": torch.stack([it[key] for it in items]),
                 "input_ids": input_ids, "attention_mask": attention_mask, "questions": questions}
        if "answer" in items[0]:
            batch["labels"] = torch.tensor([self.answer_index(it["answer"]) for it in items], dtype=torch.long)
        return batch

    def _question_states(self, questions, input_ids, attention_mask) -> torch.Tensor | None:
        """The frozen text encoder's token states for a batch, from the cache where it has them (None where the
        text encoder trains)."""
        encoder = self.net.text_encoder
        if questions is None or any(p.requires_grad for p in encoder.parameters()) or encoder.training:
            return None
        missing = [i for i, q in enumerate(questions) if q not in self._text_cache]
        fresh = {}
        if missing:  # encoded once; kept while the cache has room, else for this batch only
            states = self.net.text_features(input_ids[missing], attention_mask[missing])
            fresh = {questions[i]: states[row, :int(attention_mask[i].sum())] for row, i in enumerate(missing)}
            self._text_cache.update(islice(fresh.items(), max(0, TEXT_CACHE_ROWS - len(self._text_cache))))
        out = torch.zeros(len(questions), input_ids.shape[1], encoder.config.hidden_size, dtype=torch.float16)
        for i, q in enumerate(questions):
            states = self._text_cache.get(q)
            states = fresh[q] if states is None else states
            out[i, :len(states)] = states
        return out.to(attention_mask.device)

    def logits(self, attention_mask, input_ids, images=None, image_features=None, questions=None) -> torch.Tensor:
        tokens = self._question_states(questions, input_ids, attention_mask)
        return self.net(attention_mask, images=images, image_features=image_features,
                        input_ids=None if tokens is not None else input_ids, text_features=tokens)

    def forward(self, attention_mask, input_ids, labels, images=None, image_features=None, questions=None):
        logits = self.logits(attention_mask, input_ids, images, image_features, questions).float()
        if not (labels != IGNORE).any():  # no question of this batch has a known answer
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=IGNORE)

    @torch.no_grad()
    def scores(self, images, questions, features=None) -> torch.Tensor:
        """Answer probabilities (rows: the questions; columns: ``answers``)."""
        input_ids, attention_mask = self.net.tokenize(list(questions))
        device = next(self.parameters()).device
        kw = {"image_features": features.to(device)} if features is not None else {"images": images}
        return self.logits(attention_mask.to(device), input_ids.to(device), questions=list(questions),
                           **kw).float().softmax(-1).cpu()

    def generate(self, images, questions=None, max_new_tokens=10, num_beams=1, features=None) -> list[str]:
        """The most probable answer to each question (``max_new_tokens`` and ``num_beams`` do not apply: the
        answer is one of ``answers``)."""
        if not questions:
            raise UserInputError("A closed-answer VQA model answers questions: give one per image.")
        was_training = self.training
        self.eval()
        try:
            return [self.answers[i] for i in self.scores(images, questions, features).argmax(-1).tolist()]
        finally:
            self.train(was_training)

    def meta(self) -> dict:
        return {**self.net.meta(), **super().meta(), "answers": len(self.answers)}

    def save(self, model_dir: Path) -> None:
        self.net.save(model_dir)  # its mmdemo.json is rewritten with this model's meta by save_image_text_model

    def with_answers(self, answers: list[str]) -> "AnswerClassifier":
        """This model for ``answers``: its own first, then the new ones, whose rows of the last layer start
        fresh (a continued run on data with answers it has not seen)."""
        new = [a for a in answers if normalize_answer(a) not in self._index]
        if not new:
            return self
        last = self.net.head.head[-1]
        grown = torch.nn.Linear(last.in_features, last.out_features + len(new))
        with torch.no_grad():
            grown.weight[:last.out_features] = last.weight
            grown.bias[:last.out_features] = last.bias
        self.net.head.head[-1] = grown
        self.net.labels = self.answers + new
        self._reindex()
        return self


def build_answer_model(base_model: str, answers: list[str], image_size: int = 0,
                       pretrained: bool = True) -> AnswerClassifier:
    """The ``answer_head`` model: from the fused encoders of ``base_model`` (``efficientnet_lite0+minilm``, its
    cross-attention variant, IMAGE+TEXT Hub encoders or a CLIP / SigLIP id), or a closed-answer run continued
    (its answers first, new ones added); encoders frozen, the fusion head trains."""
    from ..fusion import CROSS_MODEL, LATE_MODEL, build_fused_model
    from ..refs import local_dir
    from ..runs import model_dir_of
    from ..taskspec import task_spec

    if not answers:
        raise UserInputError("The training questions have no answers: answer_head learns to pick one of them.")
    name = (base_model or DEFAULT_TEXT_MODEL).strip()
    path = local_dir(name)
    if path is not None:
        from . import load_image_text_model

        model_dir = model_dir_of(name)
        model = load_image_text_model(model_dir, expect_task="vqa") if model_dir is not None else None
        if not isinstance(model, AnswerClassifier):
            raise UserInputError(f"answer_head continues only a closed-answer (answer_head) VQA run; '{path.name}' is "
                                 f"not one. Start from {LATE_MODEL}, or continue that run with its own method.")
        model = model.with_answers(answers)
    elif name in task_spec("vqa").base_models and name != LATE_MODEL:
        raise UserInputError(f"answer_head trains a classifier over the answers on {LATE_MODEL}'s encoders (or "
                             f"{CROSS_MODEL}, IMAGE+TEXT Hub encoders, a CLIP / SigLIP id); '{name}' generates its "
                             "answers: use frozen_vision, full or lora with it.")
    else:
        model = AnswerClassifier(build_fused_model(name, answers, image_size, pretrained), name)
    model.requires_grad_(False)
    model.net.head.requires_grad_(True)
    return model
