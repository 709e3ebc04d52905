"""Dual encoders for image-text matching (task ``retrieval``): an image tower and a text tower that embed
into one space, trained contrastively; families of kind ``"dual-encoder"``.

- ``lit`` (``efficientnet_lite0+minilm``, offline): LiT-style, the EfficientNet-Lite0 image tower and the
  MiniLM-L6 sentence encoder (mean pooling) from their PyPI packages, each followed by a small MLP
  projection to a shared 256-d space.
- ``clip`` (``mmdemo.dualhf``): transformers ``CLIPModel`` / ``SiglipModel`` (any Hub id or folder).

Losses: the symmetric InfoNCE of CLIP with a learned temperature, or the pairwise sigmoid loss of SigLIP
(learned temperature and bias). Negatives are the other pairs of the batch, except that a caption shared
by two images of one batch ("a red circle") is a true match of both, never a negative of either.
Methods: ``frozen_towers`` (both towers frozen, their outputs computed once; only the projections and
the temperature train), ``locked_image`` (LiT: the image tower frozen, its features computed once),
``full``, ``lora`` (adapters on both towers; projections and temperature in full).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserInputError
from .families import register_family
from .models import Preprocess, lite0_encoder, lora_targets, prefers_channels_last
from .runs import META_FILE

TASK = "retrieval"
LIT_MODEL = "efficientnet_lite0+minilm"
LOSSES = ("infonce", "sigmoid")
METHODS = ("frozen_towers", "locked_image", "full", "lora")
TEXT_MAX_LENGTH = 64
EMBED_DIM = 256
TEXT_TRAINED_LAYERS = 2  # locked_image (LiT): the top MiniLM layers that train with the projections


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None, kind: str = "infonce") -> torch.Tensor:
    """The loss of a batch of (image, caption) pairs.

    Args:
        image_emb, text_emb: L2-normalised embeddings, B x D each; row i of both is pair i.
        positives: B x B booleans, ``positives[i, j]``: caption j is a true caption of image i (the diagonal
            is true). Off-diagonal true pairs are left out of InfoNCE's softmax and are positives of the
            sigmoid loss.
        scale: the temperature's inverse (already exponentiated); bias: the sigmoid loss's bias.
        kind: ``"infonce"`` (CLIP, symmetric) or ``"sigmoid"`` (SigLIP).
    """
    logits = scale * image_emb.float() @ text_emb.float().T
    if kind == "sigmoid":
        signs = positives.float() * 2 - 1
        return -F.logsigmoid(signs * (logits + (bias if bias is not None else 0))).sum() / len(logits)
    eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(positives & ~eye, float("-inf"))
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class DualEncoder(nn.Module):
    """What every dual-encoder family shares: the training forward (-> loss), embeddings, methods."""

    kind = "dual-encoder"
    fallback = False
    image_tower = text_tower = ""  # attribute names of the towers
    text_lora_targets: tuple[str, ...] = ()
    # frozen_towers trains the projections and the temperature; a projection that sits inside a tower (SigLIP's
    # text head) is named here, and text_tower_features stops before it.
    tower_heads: tuple[str, ...] = ()

    def __init__(self, preprocess: Preprocess, base_model: str, loss: str):
        super().__init__()
        self.preprocess, self.base_model, self.loss_kind = preprocess, base_model, loss
        self._channels_last = None

    # --- what a family implements
    def tower_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> the image tower's pooled output (what a locked tower computes once)."""
        raise NotImplementedError

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_tower_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids -> the text tower's pooled output (what a frozen tower computes once)."""
        raise NotImplementedError

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(exp(logit_scale), logit_bias or None)."""
        raise NotImplementedError

    @property
    def max_text_tokens(self) -> int:
        return TEXT_MAX_LENGTH

    # --- shared
    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        from .images import normalize

        if self._channels_last is None:
            self._channels_last = prefers_channels_last(self.get_submodule(self.image_tower))
        device = next(self.parameters()).device
        return normalize(images.to(device), self.preprocess.mean, self.preprocess.std, self._channels_last)

    def tokenize(self, texts: list[str]):
        enc = self.tokenizer(list(texts), padding=self.padding, truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    padding = True

    def check_query(self, text: str) -> None:
        """Refuses a text longer than the text tower reads (it would be cut silently)."""
        n = len(self.tokenizer(text, truncation=False).input_ids)
        if n > self.max_text_tokens:
            raise UserInputError(f"The query is {n} tokens long; this model's text tower reads at most "
                                 f"{self.max_text_tokens}. Shorten it (a few words describing the image work best).")

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """uint8 images -> the (frozen) image tower's output, computed once per distinct image."""
        return torch.cat([self.tower_features(self.pixels(images[i:i + chunk])).float().cpu()
                          for i in range(0, len(images), chunk)])

    @torch.no_grad()
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Token ids -> the (frozen) text tower's pooled output, computed once per distinct caption."""
        device = next(self.parameters()).device
        return torch.cat([self.text_tower_features(input_ids[i:i + chunk].to(device),
                                                   attention_mask[i:i + chunk].to(device)).float().cpu()
                          for i in range(0, len(input_ids), chunk)])

    def encode_image(self, images=None, image_features=None) -> torch.Tensor:
        if image_features is None:
            image_features = self.tower_features(self.pixels(images))
        return self.project_image(image_features.to(next(self.parameters()).device).float())

    def encode_text(self, input_ids=None, attention_mask=None, text_features=None) -> torch.Tensor:
        """Token ids (or the tower's pooled output, computed before) -> text embeddings (not normalised)."""
        if text_features is None:
            text_features = self.text_tower_features(input_ids, attention_mask)
        return self.project_text(text_features.to(next(self.parameters()).device).float())

    def forward(self, positives, input_ids=None, attention_mask=None, images=None, image_features=None,
                text_index=None, text_features=None):
        """A training batch -> its contrastive loss (see ``contrastive_loss``); ``text_index`` maps each pair
        to its row of ``input_ids`` / ``text_features`` (the batch's distinct captions) when given."""
        image_emb = F.normalize(self.encode_image(images, image_features), dim=-1)
        text_emb = F.normalize(self.encode_text(input_ids, attention_mask, text_features), dim=-1)
        if text_index is not None:
            text_emb = text_emb[text_index]
        scale, bias = self.scales()
        return contrastive_loss(image_emb, text_emb, positives, scale, bias, self.loss_kind)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """uint8 images -> L2-normalised embeddings (CPU float32)."""
        return torch.cat([F.normalize(self.encode_image(images[i:i + chunk]).float(), dim=-1).cpu()
                          for i in range(0, len(images), chunk)]) if len(images) else torch.empty(0, 0)

    @torch.no_grad()
    def embed_features(self, features: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        return torch.cat([F.normalize(self.encode_image(image_features=features[i:i + chunk]).float(), dim=-1).cpu()
                          for i in range(0, len(features), chunk)])

    @torch.no_grad()
    def embed_text_features(self, features: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        return torch.cat([F.normalize(self.encode_text(text_features=features[i:i + chunk]).float(), dim=-1).cpu()
                          for i in range(0, len(features), chunk)])

    @torch.no_grad()
    def embed_texts(self, texts: list[str], chunk: int = 256) -> torch.Tensor:
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(texts), chunk):
            ids, mask = self.tokenize(texts[i:i + chunk])
            out.append(F.normalize(self.encode_text(ids.to(device), mask.to(device)).float(), dim=-1).cpu())
        return torch.cat(out)

    def probabilities(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Per image, a distribution over the texts: the softmax of the scaled similarities (as CLIP's
        zero-shot classifier; for a sigmoid-trained model too, so that the labels' probabilities sum to one)."""
        scale, _ = self.scales()
        return (scale.detach().float().cpu() * image_emb @ text_emb.T).softmax(-1)

    def tower_modules(self) -> list[str]:
        return [self.image_tower, self.text_tower]

    def lora_targets_of(self, part: str, module: nn.Module) -> list[str]:
        if part == self.text_tower:
            return list(self.text_lora_targets)
        return lora_targets(module, "classifier")

    def apply_method(self, method: str, lora_r: int = 8, lora_alpha: int = 16) -> "DualEncoder":
        """``frozen_towers``: both towers frozen (the projections and the temperature train); ``locked_image``:
        the image tower frozen; ``full``: everything trains; ``lora``: adapters on both towers, the
        projections and the temperature in full."""
        if method not in METHODS:
            raise UserInputError(f"Unknown method '{method}' for {TASK}; use {', '.join(METHODS)}.")
        self.requires_grad_(method != "lora")
        if method == "frozen_towers":
            for part in self.tower_modules():
                self.get_submodule(part).requires_grad_(False)
            for head in self.tower_heads:
                self.get_submodule(head).requires_grad_(True)
        if method == "locked_image":
            self.get_submodule(self.image_tower).requires_grad_(False)
            self.lock_lower_text()
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            for part in self.tower_modules():
                inner = self.get_submodule(part)
                config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                    target_modules=self.lora_targets_of(part, inner))
                self.set_submodule(part, get_peft_model(inner, config))
            for name, p in self.named_parameters():
                if not any(name.startswith(t + ".") for t in self.tower_modules()) or self.is_head(name):
                    p.requires_grad_(True)
        return self

    def lock_lower_text(self) -> None:
        """locked_image: a family may also keep the lower part of its text tower fixed (a cost cut)."""

    def is_head(self, name: str) -> bool:
        """A parameter inside a tower that trains in full under LoRA (CLIP's projections live in the towers'
        parent, so none by default)."""
        return False

    def merged(self, part: str) -> nn.Module:
        """A tower with LoRA merged into a copy (the live model keeps its adapters)."""
        import copy

        inner = self.get_submodule(part)
        return copy.deepcopy(inner).merge_and_unload() if hasattr(inner, "merge_and_unload") else inner

    def save_adapters(self, model_dir: Path) -> None:
        for part in self.tower_modules():
            inner = self.get_submodule(part)
            if hasattr(inner, "peft_config"):
                inner.save_pretrained(Path(model_dir) / "adapter" / part)

    def meta(self) -> dict:
        from dataclasses import asdict

        return {"task": TASK, "family": self.family, "base_model": self.base_model, "loss": self.loss_kind,
                "text_max_length": self.max_text_tokens, "preprocess": asdict(self.preprocess)}

    def write_meta(self, model_dir: Path) -> None:
        (Path(model_dir) / META_FILE).write_text(json.dumps(self.meta(), indent=2))


def _mlp(dim: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * EMBED_DIM), nn.GELU(), nn.Linear(2 * EMBED_DIM, EMBED_DIM))


@register_family
class LiTDualEncoder(DualEncoder):
    """EfficientNet-Lite0 + MiniLM (mean pooled) + MLP projections; saved as its parts."""

    family = "lit"
    library = "mmdemo"  # a timm folder, a transformers folder and the projections: no single library
    image_tower, text_tower = "image_encoder", "text_encoder"
    text_lora_targets = ("query", "value")

    @classmethod
    def matches(cls, name: str) -> bool:
        return name == LIT_MODEL

    def __init__(self, image_encoder, text_encoder, tokenizer, image_size: int, loss: str = "infonce"):
        super().__init__(Preprocess(image_size, (0.5,) * 3, (0.5,) * 3), LIT_MODEL, loss)
        self.image_encoder, self.text_encoder, self.tokenizer = image_encoder, text_encoder, tokenizer
        self.image_proj = _mlp(image_encoder.num_features)
        self.text_proj = _mlp(text_encoder.config.hidden_size)
        # CLIP starts at temperature 0.07; SigLIP at scale 10 with bias -10 (most pairs are negatives).
        sigmoid = loss == "sigmoid"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0) if sigmoid else math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0 if sigmoid else 0.0))

    def tower_features(self, pixels):
        return self.image_encoder(pixels)  # the classifier is reset: pooled 1280-d features

    def lock_lower_text(self) -> None:
        # The word embeddings and the lower layers stay as pretrained: the backward pass and the optimizer
        # then cover a third of the tower, and a few hundred captions do not unlearn its vocabulary.
        self.text_encoder.embeddings.requires_grad_(False)
        for layer in self.text_encoder.encoder.layer[:-TEXT_TRAINED_LAYERS]:
            layer.requires_grad_(False)

    def project_image(self, features):
        return self.image_proj(features)

    def text_tower_features(self, input_ids, attention_mask):
        tokens = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * m).sum(1) / m.sum(1).clamp(min=1)  # mean pooling, as the sentence encoder was trained

    def project_text(self, features):
        return self.text_proj(features)

    def scales(self):
        return self.logit_scale.clamp(max=math.log(100)).exp(), (self.logit_bias if self.loss_kind == "sigmoid" else None)

    def save(self, model_dir: Path) -> None:
        """vision/ (timm), text/ (transformers BertModel + tokenizer), projection.safetensors, mmdemo.json."""
        from safetensors.torch import save_file
        from timm.models import save_for_hf

        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        save_for_hf(self.merged("image_encoder"), model_dir / "vision", safe_serialization=True)
        self.merged("text_encoder").save_pretrained(model_dir / "text")
        self.tokenizer.save_pretrained(model_dir / "text")
        state = {f"image_proj.{k}": v for k, v in self.image_proj.state_dict().items()}
        state.update({f"text_proj.{k}": v for k, v in self.text_proj.state_dict().items()},
                     logit_scale=self.logit_scale.data, logit_bias=self.logit_bias.data)
        save_file({k: v.detach().float().contiguous() for k, v in state.items()}, model_dir / "projection.safetensors")
        self.write_meta(model_dir)

    @classmethod
    def build(cls, name: str = LIT_MODEL, image_size: int = 0, pretrained: bool = True, loss: str = "",
              model_dir: Path | None = None) -> "LiTDualEncoder":
        from .vlm.composed import minilm_encoder

        text_encoder, tokenizer = minilm_encoder(model_dir, pretrained)
        model = cls(lite0_encoder(model_dir, pretrained), text_encoder, tokenizer, image_size or 128, loss or "infonce")
        if model_dir:
            from safetensors.torch import load_file

            state = load_file(model_dir / "projection.safetensors")
            model.image_proj.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("image_proj.")})
            model.text_proj.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("text_proj.")})
            model.logit_scale.data.copy_(state["logit_scale"])
            model.logit_bias.data.copy_(state["logit_bias"])
        return model

    @classmethod
    def load(cls, model_dir, meta: dict) -> "LiTDualEncoder":
        return cls.build(image_size=meta["preprocess"]["image_size"], loss=meta.get("loss", "infonce"),
                         model_dir=Path(model_dir))


def build_dual_encoder(base_model: str, image_size: int = 0, pretrained: bool = True, loss: str = "auto") -> DualEncoder:
    """A dual encoder to train: a registry name, a Hub / local CLIP or SigLIP, or a retrieval run / model
    folder (which continues training)."""
    from .families import resolve_family
    from .runs import model_dir_of

    name = (base_model or LIT_MODEL).strip()
    loss = "" if loss in ("", "auto") else loss
    model_dir = model_dir_of(name)  # a run or an mmdemo model folder (a bare CLIP folder is a base model)
    if model_dir is not None:
        meta = json.loads((model_dir / META_FILE).read_text())
        if meta.get("task") != TASK:
            raise UserInputError(f"base_model '{Path(name).name}' is not a {TASK} model; use {LIT_MODEL}, a CLIP / SigLIP "
                                 "model or a run of this task.")
        model = load_dual_encoder(model_dir)
        if loss:
            model.loss_kind = loss
        return model
    family = resolve_family("dual-encoder", name)
    if family is None:
        raise UserInputError(f"base_model for {TASK} must be {LIT_MODEL} (offline), a CLIP or SigLIP model (Hub id "
                             f"or folder) or a run of this task (got {name!r}).")
    return family.build(name, image_size, pretrained, loss)


def load_dual_encoder(model_dir) -> DualEncoder:
    """A saved dual encoder (a model folder with mmdemo.json of task retrieval)."""
    from .families import get_family

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META_FILE).read_text())
    return get_family(meta["family"]).load(model_dir, meta)
