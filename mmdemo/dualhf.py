"""transformers dual encoders (family ``clip``): ``CLIPModel`` and ``SiglipModel``, from a Hub id or a folder.

A saved run is the model's own folder (``save_pretrained`` plus its tokenizer and image processor), so it
loads with ``AutoModel`` and the ``zero-shot-image-classification`` pipeline without mmdemo.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from .dualenc import TASK, DualEncoder
from .errors import UserInputError
from .families import register_family

MODEL_TYPES = ("clip", "siglip")


@register_family
class HFDualEncoder(DualEncoder):
    family = "clip"
    library = "transformers"
    fallback = True  # any Hub id or folder that is not a registry name
    image_tower, text_tower = "net.vision_model", "net.text_model"
    text_lora_targets = ("q_proj", "v_proj")

    @classmethod
    def matches(cls, name: str) -> bool:
        return True

    def __init__(self, net, tokenizer, image_processor, base_model: str, loss: str = ""):
        from .models import _processor_preprocess

        self.model_type = net.config.model_type
        super().__init__(_processor_preprocess(image_processor), base_model,
                         loss or ("sigmoid" if self.model_type == "siglip" else "infonce"))
        self.net, self.tokenizer, self.image_processor = net, tokenizer, image_processor
        # SigLIP was trained on captions padded to the full length (its text pooling reads the last token).
        self.padding = "max_length" if self.model_type == "siglip" else True

    @property
    def tower_heads(self) -> tuple[str, ...]:  # SigLIP's text projection is its text tower's head
        return ("net.text_model.head",) if self.model_type == "siglip" else ()

    @property
    def max_text_tokens(self) -> int:
        return int(self.net.config.text_config.max_position_embeddings)

    def lora_targets_of(self, part, module):
        return list(self.text_lora_targets)

    def tower_features(self, pixels):
        return self.net.vision_model(pixel_values=pixels).pooler_output

    def project_image(self, features):
        return self.net.visual_projection(features) if self.model_type == "clip" else features

    def text_tower_features(self, input_ids, attention_mask):
        out = self.net.text_model(input_ids=input_ids, attention_mask=attention_mask)
        # SigLIP's pooled output is its head over the last token's state: the state, before the head.
        return out.pooler_output if self.model_type == "clip" else out.last_hidden_state[:, -1, :]

    def project_text(self, features):
        return self.net.text_projection(features) if self.model_type == "clip" else self.net.text_model.head(features)

    def scales(self):
        scale = self.net.logit_scale.clamp(max=math.log(100)).exp()
        return scale, getattr(self.net, "logit_bias", None) if self.loss_kind == "sigmoid" else None

    def save(self, model_dir: Path) -> None:
        """The transformers folder (merged LoRA), tokenizer, image processor, mmdemo.json."""
        model_dir = Path(model_dir)
        net = self.net
        if any(hasattr(self.get_submodule(part), "merge_and_unload") for part in self.tower_modules()):
            net = copy.copy(self.net)  # a shallow copy with merged copies of the adapted towers
            for part in self.tower_modules():
                net._modules[part.split(".")[-1]] = self.merged(part)
        net.save_pretrained(model_dir)
        self.tokenizer.save_pretrained(model_dir)
        self.image_processor.save_pretrained(model_dir)
        self.write_meta(model_dir)

    @classmethod
    def build(cls, name: str, image_size: int = 0, pretrained: bool = True, loss: str = "",
              model_dir: Path | None = None) -> "HFDualEncoder":
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        from .models import ensure_hub
        from .refs import local_dir

        source = str(model_dir or name)
        if local_dir(source) is None:
            ensure_hub(source)
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise UserInputError(f"Could not load '{name}' as a transformers model ({type(e).__name__}); for {TASK} "
                                 "use efficientnet_lite0+minilm (offline), a CLIP or SigLIP Hub id, or a run of "
                                 "this task.") from None
        if config.model_type not in MODEL_TYPES:
            raise UserInputError(f"'{name}' is a {config.model_type} model; {TASK} takes a dual encoder: CLIP or "
                                 "SigLIP (e.g. openai/clip-vit-base-patch32), or efficientnet_lite0+minilm.")
        net = AutoModel.from_pretrained(source) if pretrained or model_dir else AutoModel.from_config(config)
        return cls(net, AutoTokenizer.from_pretrained(source), AutoImageProcessor.from_pretrained(source), name, loss)

    @classmethod
    def load(cls, model_dir, meta: dict) -> "HFDualEncoder":
        return cls.build(meta.get("base_model", ""), loss=meta.get("loss", ""), model_dir=Path(model_dir))
