"""The interface every image-to-text family implements, and the names shared by them."""

from __future__ import annotations

import torch
from torch import nn

from ..images import normalize
from ..models import Preprocess

DEFAULT_TEXT_MODEL = "efficientnet_lite0+minilm"
LORA_TARGETS = {"composed": ["query", "value"], "blip": ["query", "value", "qkv"], "git": ["query", "value"],
                "vlm": ["q_proj", "v_proj"]}



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
