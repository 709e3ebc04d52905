"""The fused image + text classifier (family ``fused``), offline: EfficientNet-Lite0 image features and
MiniLM sentence features (both from PyPI packages), joined by a small fusion head.

Two fusions, named by the base model:
- ``efficientnet_lite0+minilm`` (late fusion, the default): the pooled image feature and the mean-pooled
  text embedding, each projected to one width, concatenated with their product (the interaction term
  lets a yes / no question compare what it asks with what the image shows), then an MLP.
- ``efficientnet_lite0+minilm-cross`` (cross-attention): the text tokens attend to the cells of the
  image feature map (one attention block), then mean pooling over the text plus the pooled image, MLP.

With the Hub (or local folders from the CLI), the encoders can be any pair ``IMAGE+TEXT``: IMAGE a timm
name or a transformers vision model, TEXT a transformers text model (``timm/resnet50.a1_in1k+bert-base-uncased``),
or one CLIP / SigLIP dual encoder id (``openai/clip-vit-base-patch32``: its two towers), joined by late
fusion. A transformer image encoder's tokens stand in for the feature map's cells.

Each fusion has a learned null embedding per modality. Training replaces one input of a share of the rows
by its null (modality dropout), so the model also learns what to predict from one input alone; the
evaluation's ablation (image only, text only) then measures what each input contributes. A zeroed input
instead would be a point the head never saw, and its accuracy would say little about the other input.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import UserInputError
from .families import register_family
from .models import Preprocess, lite0_encoder, lora_targets, prefers_channels_last
from .runs import META_FILE, meta_labels, model_dir_of

LATE_MODEL = "efficientnet_lite0+minilm"
PAIR = "+"  # IMAGE+TEXT: never part of a Hub id or a timm name
CROSS_MODEL = "efficientnet_lite0+minilm-cross"
OFFLINE_CHOICES = (f"Available offline: {LATE_MODEL} (late fusion), {CROSS_MODEL} (cross-attention), or a run of "
                   f"this task.")
FUSIONS = {LATE_MODEL: "late", CROSS_MODEL: "cross"}
TASK = "image_text_classification"
MODALITY_DROPOUT = 0.15  # share of training rows that lose one input (half the image, half the text)
TEXT_MAX_LENGTH = 64
WIDTH = 256


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1)


class LateFusion(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, num_labels: int, grid: int, width: int = WIDTH):
        super().__init__()
        self.image = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, width))
        self.text = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, width))
        self.null_image = nn.Parameter(torch.zeros(width))
        self.null_text = nn.Parameter(torch.zeros(width))
        self.head = nn.Sequential(nn.LayerNorm(3 * width), nn.Linear(3 * width, width), nn.GELU(), nn.Dropout(0.1),
                                  nn.Linear(width, num_labels))

    def forward(self, fmap, tokens, mask, drop_image, drop_text):
        i = self.image(fmap.mean((2, 3)))
        t = self.text(_masked_mean(tokens, mask))
        i = torch.where(drop_image[:, None], self.null_image.to(i.dtype), i)
        t = torch.where(drop_text[:, None], self.null_text.to(t.dtype), t)
        return self.head(torch.cat([i, t, i * t], -1))


class CrossFusion(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, num_labels: int, grid: int, width: int = WIDTH, heads: int = 4):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(image_dim, width), nn.LayerNorm(width))
        self.pos = nn.Parameter(torch.zeros(1, grid, width))  # "left" and "right" survive the flattening
        self.text = nn.Sequential(nn.Linear(text_dim, width), nn.LayerNorm(width))
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.null_image = nn.Parameter(torch.zeros(1, 1, width))
        self.null_text = nn.Parameter(torch.zeros(1, 1, width))
        self.head = nn.Sequential(nn.LayerNorm(2 * width), nn.Linear(2 * width, width), nn.GELU(), nn.Dropout(0.1),
                                  nn.Linear(width, num_labels))

    def forward(self, fmap, tokens, mask, drop_image, drop_text):
        cells = self.image(fmap.flatten(2).transpose(1, 2))
        if cells.shape[1] == self.pos.shape[1]:
            cells = cells + self.pos
        q = self.text(tokens)
        # A dropped image is a memory of null cells (attention over identical keys returns the null value).
        cells = torch.where(drop_image[:, None, None], self.null_image.expand_as(cells).to(cells.dtype), cells)
        q = torch.where(drop_text[:, None, None], self.null_text.expand_as(q).to(q.dtype), q)
        a, _ = self.attn(q, cells, cells, need_weights=False)
        h = self.norm1(q + a)
        h = self.norm2(h + self.ffn(h))
        return self.head(torch.cat([_masked_mean(h, mask), cells.mean(1)], -1))


FUSION_HEADS = {"late": LateFusion, "cross": CrossFusion}


@register_family
class FusedClassifier(nn.Module):
    """Image encoder + text encoder + fusion head -> logits over ``labels``."""

    kind = "image-text-classifier"
    family = "fused"
    # Two ecosystem models plus a fusion head: no single library loads it.
    library = "mmdemo"
    fallback = False
    text_lora_targets = ("query", "key", "value")

    @classmethod
    def matches(cls, name: str) -> bool:
        from .refs import is_hub_id, local_dir

        return name in FUSIONS or PAIR in name or is_hub_id(name) or local_dir(name) is not None

    @classmethod
    def lora_targets(cls, part: str, module: nn.Module) -> list[str]:
        """LoRA targets of one encoder: the text encoder's attention projections (BERT's query / key /
        value, CLIP's and SigLIP's q / k / v_proj), the image encoder's linears and ungrouped 1x1 convolutions."""
        if part != "text_encoder":
            return lora_targets(module, "classifier")
        names = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)}
        return [t for t in (*cls.text_lora_targets, "q_proj", "k_proj", "v_proj") if t in names]

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, tokenizer, labels: list[str], fusion: str,
                 image_size: int, base_model: str, preprocess: Preprocess | None = None, vision_library: str = "timm"):
        super().__init__()
        self.image_encoder, self.text_encoder, self.tokenizer = image_encoder, text_encoder, tokenizer
        self.labels, self.fusion, self.base_model = list(labels), fusion, base_model
        self.vision_library = vision_library  # "timm" (forward_features) or "transformers" (last_hidden_state)
        self.preprocess = preprocess or Preprocess(image_size, (0.5,) * 3, (0.5,) * 3)
        grid = (self.preprocess.image_size // 32) ** 2
        self.head = FUSION_HEADS[fusion](_image_dim(image_encoder, vision_library), text_encoder.config.hidden_size,
                                         len(labels), grid)
        self._channels_last = None

    def encoder_modules(self) -> list[str]:
        return ["image_encoder", "text_encoder"]

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        from .images import normalize

        if self._channels_last is None:
            self._channels_last = prefers_channels_last(self.image_encoder)
        device = next(self.parameters()).device
        return normalize(images.to(device), self.preprocess.mean, self.preprocess.std, self._channels_last)

    def tokenize(self, texts: list[str], max_length: int = TEXT_MAX_LENGTH):
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the image encoder's feature maps (B x C x h x w; a transformer's N tokens as
        B x C x N x 1)."""
        pixels = self.pixels(images)
        if self.vision_library == "transformers":
            x = self.image_encoder(pixel_values=pixels).last_hidden_state
        else:
            x = self.image_encoder.forward_features(pixels)
        return x.transpose(1, 2).unsqueeze(-1) if x.dim() == 3 else x

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids -> the text encoder's token states (B x L x hidden)."""
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen image encoder's output for uint8 images, computed once per distinct image."""
        return torch.cat([self.encode_image(images[i:i + 64]).half().cpu() for i in range(0, len(images), 64)])

    @torch.no_grad()
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen text encoder's token states, computed once per distinct text."""
        device = next(self.parameters()).device
        return torch.cat([self.encode_text(input_ids[i:i + 64].to(device), attention_mask[i:i + 64].to(device)).half().cpu()
                          for i in range(0, len(input_ids), 64)])

    def forward(self, attention_mask, images=None, image_features=None, input_ids=None, text_features=None,
                drop_image=None, drop_text=None):
        device = attention_mask.device
        fmap = image_features.float() if image_features is not None else self.encode_image(images)
        tokens = text_features.float() if text_features is not None else self.encode_text(input_ids, attention_mask)
        n = len(attention_mask)
        none = torch.zeros(n, dtype=torch.bool, device=device)
        return self.head(fmap, tokens, attention_mask,
                         none if drop_image is None else drop_image, none if drop_text is None else drop_text)

    def meta(self) -> dict:
        from dataclasses import asdict

        return {"task": TASK, "family": self.family, "base_model": self.base_model, "fusion": self.fusion,
                "vision_library": self.vision_library, "vision_class": _class_name(self.image_encoder),
                "text_class": _class_name(self.text_encoder),
                "id2label": {str(i): label for i, label in enumerate(self.labels)},
                "label2id": {label: i for i, label in enumerate(self.labels)},
                "text_max_length": TEXT_MAX_LENGTH, "preprocess": asdict(self.preprocess)}

    def save(self, model_dir: Path) -> None:
        """vision/ (timm, or transformers with its image processor), text/ (transformers + tokenizer),
        fusion.safetensors, mmdemo.json."""
        import copy

        from safetensors.torch import save_file
        from timm.models import save_for_hf

        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        image_encoder, text_encoder = self.image_encoder, self.text_encoder
        # LoRA is merged into copies: the live model keeps its adapters (a stop may be followed by more training).
        if hasattr(image_encoder, "merge_and_unload"):
            image_encoder = copy.deepcopy(image_encoder).merge_and_unload()
        if hasattr(text_encoder, "merge_and_unload"):
            text_encoder = copy.deepcopy(text_encoder).merge_and_unload()
        if self.vision_library == "transformers":
            image_encoder.save_pretrained(model_dir / "vision")
            _image_processor(self.preprocess).save_pretrained(model_dir / "vision")
        else:
            save_for_hf(image_encoder, model_dir / "vision", safe_serialization=True)
        text_encoder.save_pretrained(model_dir / "text")
        self.tokenizer.save_pretrained(model_dir / "text")
        save_file({k: v.detach().float().contiguous() for k, v in self.head.state_dict().items()},
                  model_dir / "fusion.safetensors")
        (model_dir / META_FILE).write_text(json.dumps(self.meta(), indent=2))

    @classmethod
    def build(cls, labels: list[str], base_model: str = LATE_MODEL, image_size: int = 0, pretrained: bool = True,
              model_dir: Path | None = None, fusion: str | None = None) -> "FusedClassifier":
        if base_model not in FUSIONS and not model_dir:
            return _build_towers(cls, labels, base_model, image_size, pretrained)
        from .vlm.composed import minilm_encoder

        image_encoder = lite0_encoder(model_dir, pretrained)
        text_encoder, tokenizer = minilm_encoder(model_dir, pretrained)
        model = cls(image_encoder, text_encoder, tokenizer, labels,
                    fusion or FUSIONS[base_model], image_size or 128, base_model)
        if model_dir:
            _load_head(model, model_dir)
        return model

    @classmethod
    def load(cls, model_dir) -> "FusedClassifier":
        model_dir = Path(model_dir)
        meta = json.loads((model_dir / META_FILE).read_text())
        labels = meta_labels(meta)
        if meta.get("base_model") in FUSIONS:
            return cls.build(labels, meta["base_model"], meta["preprocess"]["image_size"], model_dir=model_dir,
                             fusion=meta["fusion"])
        # Encoders from the Hub (or folders): each part reloads from its own saved folder.
        import transformers
        from transformers import AutoTokenizer

        def pretrained(part: str, folder: str):  # the class it was saved as (SigLIP's towers have no AutoModel)
            return getattr(transformers, meta.get(part) or "AutoModel").from_pretrained(model_dir / folder)

        if meta.get("vision_library") == "transformers":
            image_encoder = pretrained("vision_class", "vision")
        else:
            import timm

            image_encoder = timm.create_model(f"local-dir:{model_dir / 'vision'}", pretrained=True)
            image_encoder.reset_classifier(0)
        model = cls(image_encoder, pretrained("text_class", "text"),
                    AutoTokenizer.from_pretrained(model_dir / "text"), labels, meta["fusion"], 0, meta["base_model"],
                    Preprocess(**meta["preprocess"]), meta.get("vision_library", "timm"))
        _load_head(model, model_dir)
        return model


def _class_name(module: nn.Module) -> str:
    inner = module.get_base_model() if hasattr(module, "get_base_model") else module
    return type(inner).__name__


def _load_head(model: FusedClassifier, model_dir: Path) -> None:
    from safetensors.torch import load_file

    model.head.load_state_dict(load_file(Path(model_dir) / "fusion.safetensors"))


def _image_dim(encoder: nn.Module, library: str) -> int:
    if library == "timm":
        return encoder.num_features
    config = encoder.config
    return config.hidden_sizes[-1] if getattr(config, "hidden_sizes", None) else config.hidden_size


def _image_processor(pre: Preprocess):
    from transformers import CLIPImageProcessor  # what AutoImageProcessor reads back

    side = pre.image_size
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                              image_mean=list(pre.mean), image_std=list(pre.std))


# The towers of the dual encoders people fine-tune classifiers from; each loads alone from the full checkpoint.
DUAL_TOWERS = {"clip": ("CLIPVisionModel", "CLIPTextModel"), "siglip": ("SiglipVisionModel", "SiglipTextModel"),
               "siglip2": ("Siglip2VisionModel", "Siglip2TextModel")}


def _tower_source(name: str) -> tuple[str, bool]:
    """(what from_pretrained / create_model reads, whether it is a local folder)."""
    from .models import hub_reachable
    from .refs import local_dir

    path = local_dir(name)
    if path is not None:
        return str(path), True
    if not hub_reachable():
        raise UserInputError(f"Could not fetch '{name}': the Hugging Face Hub is unreachable from this machine "
                             f"(offline mode or no network). {OFFLINE_CHOICES}")
    return name, False


def _build_towers(cls, labels, base_model: str, image_size: int, pretrained: bool) -> FusedClassifier:
    """A fused classifier over Hub / folder encoders: ``IMAGE+TEXT`` or one CLIP / SigLIP dual encoder."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from .models import _processor_preprocess

    import timm

    name = base_model.strip()
    if PAIR not in name and timm.is_model(name):
        raise UserInputError(f"base_model '{name}' is an image model only: give IMAGE{PAIR}TEXT (e.g. "
                             f"{name}{PAIR}bert-base-uncased) or a CLIP / SigLIP id. {OFFLINE_CHOICES}")
    try:
        if PAIR in name:
            image_name, text_name = (part.strip() for part in name.split(PAIR, 1))
            image_encoder, preprocess, library = _image_tower(image_name, pretrained)
            text_src, _ = _tower_source(text_name)
            text_encoder = AutoModel.from_pretrained(text_src) if pretrained else \
                AutoModel.from_config(AutoConfig.from_pretrained(text_src))
            tokenizer = AutoTokenizer.from_pretrained(text_src)
        else:
            src, _ = _tower_source(name)
            config = AutoConfig.from_pretrained(src)
            if config.model_type not in DUAL_TOWERS:
                raise UserInputError(
                    f"base_model '{name}' is a {config.model_type} model, not a CLIP / SigLIP dual encoder. For "
                    f"separate encoders give IMAGE{PAIR}TEXT (e.g. timm/resnet50.a1_in1k{PAIR}bert-base-uncased), or "
                    f"use {LATE_MODEL}.")
            vision_cls, text_cls = (getattr(transformers, c) for c in DUAL_TOWERS[config.model_type])
            load = (lambda c: c.from_pretrained(src)) if pretrained else \
                (lambda c: c._from_config(getattr(config, "vision_config" if c is vision_cls else "text_config")))
            image_encoder, text_encoder = load(vision_cls), load(text_cls)
            from transformers import AutoImageProcessor

            preprocess, library = _processor_preprocess(AutoImageProcessor.from_pretrained(src)), "transformers"
            tokenizer = AutoTokenizer.from_pretrained(src)
    except UserInputError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise UserInputError(f"Could not load the encoders of base_model '{Path(name).name}' ({type(e).__name__}): "
                             f"give IMAGE{PAIR}TEXT (a timm or transformers image model and a transformers text "
                             f"model), a CLIP / SigLIP id, or {LATE_MODEL} (offline).") from None
    if library == "timm" and image_size and not hasattr(image_encoder, "patch_embed"):
        preprocess.image_size = image_size  # a convolutional encoder takes any size; a ViT keeps its own
    return cls(image_encoder, text_encoder, tokenizer, labels, "late", 0, name, preprocess, library)


def _image_tower(name: str, pretrained: bool):
    """(encoder without classifier, its preprocessing, "timm" | "transformers") for a timm name or a
    transformers vision model (id or folder)."""
    import timm

    from .models import _processor_preprocess, _timm_preprocess

    src, local = _tower_source(name)
    is_timm = (Path(src) / "config.json").is_file() and "architecture" in json.loads((Path(src) / "config.json").read_text()) \
        if local else (name.startswith("hf-hub:") or name.startswith("timm/") or timm.is_model(name))
    if is_timm:
        if local:
            src = f"local-dir:{src}"
        elif name.startswith("timm/"):
            src = f"hf-hub:{name}"
        encoder = timm.create_model(src, pretrained=pretrained or local, num_classes=0)
        return encoder, _timm_preprocess(encoder), "timm"
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    encoder = AutoModel.from_pretrained(src) if pretrained or local else AutoModel.from_config(AutoConfig.from_pretrained(src))
    return encoder, _processor_preprocess(AutoImageProcessor.from_pretrained(src)), "transformers"


def build_fused_model(base_model: str, labels: list[str], image_size: int = 0,
                      pretrained: bool = True) -> FusedClassifier:
    """A new fused classifier from a registry name, or one saved before (a run or model folder: its
    encoders and head continue training when the labels are the same)."""
    from .families import resolve_family
    from .refs import local_dir

    name = (base_model or LATE_MODEL).strip()
    path = local_dir(name)
    model_dir = model_dir_of(name)
    if model_dir is not None:  # a run or a saved mmdemo model
        meta = json.loads((model_dir / META_FILE).read_text())
        if meta.get("task") != TASK:
            raise UserInputError(f"base_model '{path.name}' is not an {TASK} model; use {LATE_MODEL}, {CROSS_MODEL} "
                                 f"or a run of this task.")
        model = FusedClassifier.load(model_dir)
        if model.labels != list(labels):
            # The encoders continue; a new head for the new label set.
            model = FusedClassifier(model.image_encoder, model.text_encoder, model.tokenizer, labels, model.fusion, 0,
                                    model.base_model, model.preprocess, model.vision_library)
        return model
    family = resolve_family("image-text-classifier", name)
    if family is None:
        raise UserInputError(f"base_model for {TASK} must be {LATE_MODEL} (late fusion), {CROSS_MODEL} "
                             f"(cross-attention), IMAGE{PAIR}TEXT Hub encoders, a CLIP / SigLIP id or a run of this "
                             f"task (got {name!r}).")
    return family.build(labels, name, image_size, pretrained)


def apply_fused_method(model: FusedClassifier, method: str, lora_r: int = 8, lora_alpha: int = 16) -> FusedClassifier:
    """``frozen_encoders``: only the fusion head trains; ``full``: everything; ``lora``: adapters on both
    encoders (the family's targets) plus the head in full."""
    model.requires_grad_(method == "full")
    if method == "full":
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        for part in model.encoder_modules():
            inner = getattr(model, part)
            config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                target_modules=model.lora_targets(part, inner))
            setattr(model, part, get_peft_model(inner, config))
    elif method != "frozen_encoders":
        raise UserInputError(f"Unknown method '{method}' for {TASK}; use frozen_encoders, full or lora.")
    model.head.requires_grad_(True)
    return model


def load_fused_model(model_dir) -> FusedClassifier:
    return FusedClassifier.load(model_dir)

