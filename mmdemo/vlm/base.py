"""The interface every image-to-text family implements, and the names shared by them."""

from __future__ import annotations

import torch
from torch import nn

from ..images import normalize
from ..models import Preprocess, prefers_channels_last

DEFAULT_TEXT_MODEL = "efficientnet_lite0+minilm"


class ImageTextModel(nn.Module):
    """Common base: preprocessing, labels-free interface, saving metadata.

    A subclass registered with ``mmdemo.families.register_family`` is an image-to-text family: its class
    attributes are the spec (``family`` as mmdemo.json records it, the model card's ``library``, the
    ``lora_targets`` module names and ``peft_attr``, the sub-module that carries the PEFT adapter).
    """

    kind = "image-text"
    family = ""
    library = "transformers"
    lora_targets: tuple[str, ...] = ()
    peft_attr = "net"
    fallback = False

    @classmethod
    def matches(cls, name: str) -> bool:
        """Whether this family builds the model ``name`` (a registry name); Hub ids and folders are
        recognised by their config's model_type instead (``HFImageText``)."""
        return False

    @classmethod
    def from_name(cls, task: str, name: str, image_size: int, pretrained: bool) -> "ImageTextModel":
        """A new model for ``task`` from a name ``matches`` accepted."""
        raise NotImplementedError

    @classmethod
    def load(cls, model_dir, meta: dict, preprocess: Preprocess) -> "ImageTextModel":
        """A folder written by ``save`` (mmdemo.json's ``meta``, its preprocessing already parsed)."""
        raise NotImplementedError

    def __init__(self, task: str, preprocess: Preprocess, base_model: str):
        super().__init__()
        self.task, self.preprocess, self.base_model = task, preprocess, base_model
        self._channels_last = None  # decided on first use, once the modules exist

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the image encoder's input, on the model's device."""
        if self._channels_last is None:
            self._channels_last = prefers_channels_last(self)
        device = next(self.parameters()).device
        return normalize(images.to(device), self.preprocess.mean, self.preprocess.std, self._channels_last)

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

    def prompt_tuning_problem(self) -> str:
        """Why this model cannot be prompt-tuned ("" when it can)."""
        return (f"prompt_tuning is built for the offline {DEFAULT_TEXT_MODEL} decoder: peft's prompt tuning prepends "
                f"learned vectors to the decoder's input embeddings, and BLIP's forward takes no input embeddings while "
                f"GIT and chat models put the image tokens into that same sequence, which mmdemo does not shift for "
                f"prompts. Use lora, frozen_vision or full for '{self.base_model}'.")
