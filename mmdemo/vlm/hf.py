"""transformers families: BLIP, GIT and chat vision-language models (AutoModelForImageTextToText).

``HFImageText`` holds what they share; each family is a registered subclass that says which config
model_types it handles, which transformers class it loads, and how its sequences are laid out.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserInputError
from ..families import families, register_family
from ..models import OFFLINE_HINT, Preprocess, ensure_hub
from .base import DEFAULT_TEXT_MODEL, ImageTextModel


class HFImageText(ImageTextModel):
    """BLIP, GIT and chat vision-language models, driven through their own processors.

    Training sequences start where each family's ``generate`` starts, so a fine-tuned model decodes
    the way it was taught: BLIP after its ``[DEC]`` token (the tokenizer writes ``[CLS]`` there),
    GIT after ``[CLS]`` (VQA: ``[CLS] question answer [SEP]``), chat models after the template's
    assistant prompt. For VQA and chat models the loss covers the answer only.
    """

    max_text_tokens = 48
    model_types: tuple[str, ...] = ()  # the config model_types this family handles
    # GIT's loss skips a fixed number of image tokens (its config's): other sizes are resized to its own.
    resize_to_encoder = False

    def __init__(self, task, net, processor, base_model, preprocess):
        super().__init__(task, preprocess, base_model)
        self.net, self.processor = net, processor

    @classmethod
    def handles(cls, model_type: str) -> bool:
        return model_type in cls.model_types

    @classmethod
    def model_class(cls, task: str):
        """The transformers class that loads this family's checkpoints for ``task``."""
        raise NotImplementedError

    @classmethod
    def check_processor(cls, name: str, processor) -> None:
        """Raises UserInputError when ``processor`` lacks what this family prompts through."""

    @classmethod
    def load(cls, model_dir, meta, preprocess):
        model = HFImageText.build(meta["task"], str(model_dir), local=True)
        model.preprocess = preprocess
        return model

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def _vision_inputs(self, images) -> dict:
        """BLIP / GIT pixels; a size other than the encoder's own interpolates its position embeddings."""
        pixel_values = self.pixels(images)
        size = getattr(getattr(self.net.config, "vision_config", None), "image_size", None)
        if not isinstance(size, int) or pixel_values.shape[-1] == size:
            return {"pixel_values": pixel_values}
        if self.resize_to_encoder:
            return {"pixel_values": torch.nn.functional.interpolate(pixel_values, size=(size, size), mode="bilinear",
                                                                    antialias=True, align_corners=False)}
        return {"pixel_values": pixel_values, "interpolate_pos_encoding": True}

    def collate(self, items):
        images = torch.stack([it["pixels"] for it in items])
        questions = [it["question"] for it in items] if self.task == "vqa" else None
        texts = [it["answer"] if self.task == "vqa" else it["text"] for it in items]
        return self._collate(images, questions, texts)

    def _collate(self, images, questions, texts) -> dict:
        """The texts as the sequence the model learns to write after the image (captioning)."""
        enc = self._tokenize(texts)
        ids = self._start_ids(enc.input_ids)
        labels = ids.masked_fill(enc.attention_mask == 0, -100)
        return {"images": images, "input_ids": ids, "attention_mask": enc.attention_mask, "labels": labels}

    def _tokenize(self, texts):
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_tokens,
                              return_tensors="pt")

    def _start_ids(self, ids):
        return ids

    def forward(self, images=None, labels=None, **kw):
        if images is not None:  # BLIP / GIT; chat models get pixel_values from their processor
            kw.update(self._vision_inputs(images))
        return self.net(labels=labels, **kw).loss

    @torch.no_grad()
    def generate(self, images, questions=None, max_new_tokens=20, num_beams=1) -> list[str]:
        gen = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        return self._generate(images, questions, gen)

    def _generate(self, images, questions, gen) -> list[str]:
        tok = self.tokenizer
        pixel_values = self._pixel_values(images, gen)
        kw = {}
        if questions is not None:  # BLIP VQA: the question goes to its text encoder
            enc = tok(questions, padding=True, truncation=True, max_length=self.max_text_tokens,
                      return_tensors="pt").to(pixel_values.device)
            kw = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        out = self.net.generate(pixel_values=pixel_values, **kw, **gen)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    def _pixel_values(self, images, gen: dict):
        """The encoder's pixels; ``gen`` takes the other vision arguments (position interpolation)."""
        vision = self._vision_inputs(images)
        pixel_values = vision.pop("pixel_values")
        gen.update(vision)
        return pixel_values

    def save(self, model_dir: Path) -> None:
        self.net.save_pretrained(model_dir, safe_serialization=True)
        self.processor.save_pretrained(model_dir)

    @classmethod
    def build(cls, task: str, name: str, pretrained: bool = True, local: bool = False):
        from transformers import AutoConfig, AutoProcessor

        if not local:
            ensure_hub(name)
        try:
            config = AutoConfig.from_pretrained(name)
            family = _hf_family(config.model_type, name)
            model_cls = family.model_class(task)
            processor = AutoProcessor.from_pretrained(name)
        except UserInputError:
            raise
        except ImportError as e:  # e.g. SmolVLM's processor needs num2words
            raise UserInputError(f"'{name}' needs a package that is not installed: {e}") from None
        except (OSError, ValueError) as e:
            raise UserInputError(f"Could not load '{name}' as an image-to-text model ({type(e).__name__}: {e}). "
                                 f"{OFFLINE_HINT}") from None
        if not hasattr(processor, "image_processor"):
            raise UserInputError(f"'{name}' has no image processor (preprocessor_config.json); save the model's "
                                 f"processor with it, not only its tokenizer.")
        family.check_processor(name, processor)
        net = model_cls.from_pretrained(name) if pretrained else getattr(model_cls, "from_config", model_cls)(config)
        return family(task, net, processor, name, _processor_preprocess(processor))


@register_family
class BlipImageText(HFImageText):
    """BlipForConditionalGeneration (captioning) / BlipForQuestionAnswering (VQA)."""

    family, model_types = "blip", ("blip",)
    lora_targets = ("query", "value", "qkv")

    @classmethod
    def model_class(cls, task):
        import transformers as t

        return t.BlipForQuestionAnswering if task == "vqa" else t.BlipForConditionalGeneration

    def vision_modules(self):
        return ["net.vision_model"]

    def _start_ids(self, ids):
        ids = ids.clone()
        ids[:, 0] = self.net.config.text_config.bos_token_id  # what BLIP's generate starts from
        return ids

    def _collate(self, images, questions, texts):
        batch = super()._collate(images, None, texts)
        if questions is None:
            return batch
        q = self._tokenize(questions)  # the question goes to BLIP's text encoder, the answer to its decoder
        return {"images": images, "input_ids": q.input_ids, "attention_mask": q.attention_mask,
                "decoder_input_ids": batch["input_ids"], "decoder_attention_mask": batch["attention_mask"],
                "labels": batch["labels"]}


@register_family
class GitImageText(HFImageText):
    """GitForCausalLM: the question, for VQA, is the text prefix."""

    family, model_types = "git", ("git",)
    lora_targets = ("query", "value")
    resize_to_encoder = True

    @classmethod
    def model_class(cls, task):
        import transformers as t

        return t.GitForCausalLM

    def vision_modules(self):
        return ["net.git.image_encoder"]

    def _git_prompt(self, question: str) -> list[int]:
        # GIT answers after "[CLS] question" (no [SEP]): the layout of its own VQA checkpoints.
        tok = self.tokenizer
        return [tok.cls_token_id] + tok(question, add_special_tokens=False, truncation=True,
                                        max_length=self.max_text_tokens).input_ids

    def _collate(self, images, questions, texts):
        if questions is None:
            return super()._collate(images, questions, texts)
        return {"images": images, **self._collate_git_vqa(questions, texts)}

    def _collate_git_vqa(self, questions, answers):
        tok = self.tokenizer
        rows, targets = [], []
        for q, a in zip(questions, answers):
            prompt = self._git_prompt(q)
            answer = tok(a, add_special_tokens=False, truncation=True, max_length=16).input_ids + [tok.sep_token_id]
            rows.append(prompt + answer)
            targets.append([-100] * len(prompt) + answer)
        width = max(map(len, rows))

        def pad(seqs, value):
            return torch.tensor([s + [value] * (width - len(s)) for s in seqs])

        return {"input_ids": pad(rows, tok.pad_token_id), "attention_mask": pad([[1] * len(r) for r in rows], 0),
                "labels": pad(targets, -100)}

    def _generate(self, images, questions, gen):
        if questions is None:
            return super()._generate(images, questions, gen)
        return self._generate_git_vqa(self._pixel_values(images, gen), questions, gen)

    def _generate_git_vqa(self, pixel_values, questions, gen) -> list[str]:
        tok = self.tokenizer
        prompts = [self._git_prompt(q) for q in questions]
        results = [""] * len(prompts)
        # GIT's positions are absolute, so left padding is unsafe: prompts of one length share a batch.
        for length in sorted({len(p) for p in prompts}):
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            ids = torch.tensor([prompts[i] for i in idx], device=pixel_values.device)
            out = self.net.generate(pixel_values=pixel_values[idx], input_ids=ids, attention_mask=torch.ones_like(ids),
                                    **gen)
            for row, i in enumerate(idx):
                results[i] = tok.decode(out[row, length:], skip_special_tokens=True).strip()
        return results


@register_family
class ChatImageText(HFImageText):
    """Any AutoModelForImageTextToText with a chat template (e.g. SmolVLM), prompted through it."""

    family = "vlm"
    lora_targets = ("q_proj", "v_proj")
    fallback = True  # its model_types include BLIP's, GIT's and those of any more specific family

    @classmethod
    def handles(cls, model_type):
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    @classmethod
    def model_class(cls, task):
        import transformers as t

        return t.AutoModelForImageTextToText

    @classmethod
    def check_processor(cls, name, processor):
        if not getattr(processor, "chat_template", None):
            raise UserInputError(f"'{name}' has no chat template: mmdemo prompts chat vision-language models "
                                 f"through it. Pick an instruct / chat checkpoint, or a BLIP or GIT model.")

    def vision_modules(self):
        # The outermost image tower (SmolVLM / Idefics3 vision_model, LLaVA vision_tower).
        names = [n for n, _ in self.net.named_modules() if n.endswith(("vision_model", "vision_tower"))]
        return ["net." + n for n in names[:1]]

    def _pil(self, images):
        from PIL import Image

        return [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in images]

    def _prompt(self, question: str | None, answer: str | None = None) -> str:
        """The chat-template prompt (vlm family) for one example."""
        user = [{"type": "image"}, {"type": "text", "text": question or "Describe this image in a few words."}]
        messages = [{"role": "user", "content": user}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=answer is None)

    def _collate(self, images, questions, texts):
        return self._collate_chat(images, questions, texts)

    def _collate_chat(self, images, questions, answers):
        questions = questions or [None] * len(answers)
        prompts = [self._prompt(q) for q in questions]
        texts = [self._prompt(q, a) for q, a in zip(questions, answers)]
        enc = self.processor(images=[[im] for im in self._pil(images)], text=texts, padding=True,
                             padding_side="right", return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = torch.full_like(ids, -100)
        for row, (prompt, text) in enumerate(zip(prompts, texts)):
            end = int(mask[row].sum())
            if not text.startswith(prompt):  # an unusual template: learn every text token
                keep = mask[row, :end].bool() & (ids[row, :end] != getattr(self.net.config, "image_token_id", -1))
                labels[row, :end] = ids[row, :end].masked_fill(~keep, -100)
                continue
            # The loss covers what follows the generation prompt: the answer and the end of the turn.
            n = len(self.tokenizer(text[len(prompt):], add_special_tokens=False).input_ids)
            labels[row, end - n:end] = ids[row, end - n:end]
        return {**enc, "labels": labels}

    def _generate(self, images, questions, gen):
        return self._generate_chat(images, questions, gen)

    def _generate_chat(self, images, questions, gen) -> list[str]:
        prompts = [self._prompt(q) for q in (questions or [None] * len(images))]
        device = next(self.parameters()).device
        # Left padding: every row's answer then starts at the same position.
        enc = self.processor(images=[[im] for im in self._pil(images)], text=prompts, padding=True,
                             padding_side="left", return_tensors="pt").to(device)
        if self.tokenizer.pad_token_id is not None:
            gen["pad_token_id"] = self.tokenizer.pad_token_id
        out = self.net.generate(**enc, **gen)
        texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]


def _hf_family(model_type: str, name: str = "") -> type[HFImageText]:
    """The first registered transformers family that handles ``model_type`` (the chat family last)."""
    for family in families("image-text").values():
        if issubclass(family, HFImageText) and family.handles(model_type):
            return family
    raise UserInputError(f"'{name or model_type}' is a {model_type} model, which does not write text about images; "
                         f"pick BLIP, GIT, a chat vision-language model (e.g. SmolVLM) or '{DEFAULT_TEXT_MODEL}'.")


def _processor_preprocess(processor) -> Preprocess:
    ip = getattr(processor, "image_processor", processor)

    def first(sizes, *keys):  # sizes: a dict or transformers' SizeDict
        for key in keys:
            value = sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)
            if value:
                return int(value)
        return None

    # The encoder's own input: the crop where the processor centre-crops (CLIP, GIT), the tile of
    # models that tile large images (Idefics3, SmolVLM: their "size" is the whole tiled image), else the resize.
    crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
    side = (first(crop or {}, "height") or first(getattr(ip, "max_image_size", None) or {}, "longest_edge")
            or first(getattr(ip, "size", None) or {}, "height", "shortest_edge", "longest_edge") or 224)

    def triple(value):
        if value is None:
            return (0.5,) * 3
        return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)

    return Preprocess(side, triple(getattr(ip, "image_mean", None)), triple(getattr(ip, "image_std", None)))
