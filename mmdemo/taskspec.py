"""The task registry: one ``TaskSpec`` per task name, plain data that imports neither torch nor the data stack.

A spec names its implementation by reference ("module:attribute"), resolved on first use, so the UI, the
CLI and config validation can read the task list, methods and defaults without loading a model library.
Adding a task: write its module (ingest function, training task, predictor loader) and add one
``register_task(TaskSpec(...))`` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from .errors import UserInputError


@dataclass(frozen=True)
class TaskSpec:
    """What the engine needs to know about one task.

    Attributes:
        name: the task's name in configs, dataset summaries and mmdemo.json.
        columns: dataset columns a training run needs (a dataset ingested for another task lacks them).
        methods: the training methods it accepts; the first one is the default.
        method_defaults: method -> learning_rate / epochs / batch_size used where the user leaves 0.
        base_models: the base models the Train tab suggests; the first is the default when none is given
            (an offline one); names with a Hub owner need the Hub.
        tab: the UI tab that predicts with a model of this task.
        hub_example: a Hub model id suggested when there is no model yet ("" when the task has an
            offline predictor before any run).
        pipeline_tag, hub_tag, title: the model card's Hub pipeline tag, tag and display name.
        ingest: "module:function" called as ``function(source, work, task, *, val_fraction, seed, max_side)``.
        training: "module:class" built as ``class(cfg, splits)`` (loss, report, save).
        predictor: "module:function" called as ``function(key, task)``: a model for inference ("" key: the
            task's offline predictor, a folder: a saved model, else a Hub id).
    """

    name: str
    columns: frozenset[str]
    methods: tuple[str, ...]
    method_defaults: dict = field(hash=False)
    base_models: tuple[str, ...]
    tab: str
    hub_example: str
    pipeline_tag: str
    hub_tag: str
    title: str
    ingest: str
    training: str
    predictor: str

    @property
    def default_model(self) -> str:
        return self.base_models[0]

    def resolve(self, attribute: str):
        """The object one of the reference fields ("ingest", "training", "predictor") names."""
        module, _, name = getattr(self, attribute).partition(":")
        return getattr(importlib.import_module(module), name)


TASK_SPECS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASK_SPECS:
        raise ValueError(f"task {spec.name!r} is registered twice")
    TASK_SPECS[spec.name] = spec
    return spec


def task_spec(name: str) -> TaskSpec:
    """The spec of ``name``; an unknown name is the user's to fix."""
    try:
        return TASK_SPECS[name]
    except KeyError:
        raise UserInputError(f"task must be one of {', '.join(TASK_SPECS)} (got {name!r})") from None


# A frozen backbone takes a larger step size; LoRA sits in between (its update is low rank and starts at
# zero). Text decoders: epochs 0 = enough epochs for about config.TEXT_TARGET_STEPS optimizer steps
# (resolved when the dataset's size is known), since a small caption set needs many passes and a VQA set
# few. frozen_vision trains with batch 16: on the VQA sample, 2 epochs of batch 16 reach 0.943 in 5 min on
# 2 CPU cores where 3 epochs of batch 32 reached 0.912 in 7 (bench/RESULTS.md).
# prompt_tuning trains 20 input vectors only, and takes a large step size like other prompt methods.
_TEXT_METHOD_DEFAULTS = {"frozen_vision": {"learning_rate": 3e-4, "epochs": 0, "batch_size": 16},
                         "full": {"learning_rate": 1e-4, "epochs": 0, "batch_size": 32},
                         "lora": {"learning_rate": 1e-3, "epochs": 0, "batch_size": 32},
                         "prompt_tuning": {"learning_rate": 3e-2, "epochs": 0, "batch_size": 16}}
_TEXT = dict(methods=("frozen_vision", "full", "lora", "prompt_tuning"), method_defaults=_TEXT_METHOD_DEFAULTS,
             pipeline_tag="image-text-to-text",
             ingest="mmdemo.data.text:ingest_text", training="mmdemo.tasks:TextTask",
             predictor="mmdemo.vlm:load_text_predictor")

# The methods of mmdemo/peft_methods.py (its module docstring says what each adapts). IA3 and prompts start
# from scales of one and few parameters: a larger step size; the low-rank and adapter updates take LoRA's.
PEFT_METHOD_DEFAULTS = {m: {"learning_rate": lr, "epochs": 5, "batch_size": 16} for m, lr in (
    ("dora", 3e-3), ("ia3", 1e-2), ("loha", 3e-3), ("lokr", 3e-3), ("oft", 3e-3), ("adapter", 3e-3), ("vpt", 1e-2))}

register_task(TaskSpec(
    "classification", frozenset({"label"}), ("full", "head", "lora", "bitfit", *PEFT_METHOD_DEFAULTS),
    {"full": {"learning_rate": 1e-3, "epochs": 4, "batch_size": 16},
     "head": {"learning_rate": 1e-2, "epochs": 6, "batch_size": 32},
     "lora": {"learning_rate": 3e-3, "epochs": 5, "batch_size": 16},
     "bitfit": {"learning_rate": 5e-3, "epochs": 5, "batch_size": 16},
     **PEFT_METHOD_DEFAULTS},
    base_models=("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18",
                 "google/vit-base-patch16-224-in21k"), tab="Classify", hub_example="", pipeline_tag="image-classification",
    hub_tag="image-classification", title="Image Classification",
    ingest="mmdemo.data.classification:ingest_classification", training="mmdemo.tasks:ClassificationTask",
    predictor="mmdemo.inference:load_classifier_predictor"))
register_task(TaskSpec("captioning", frozenset({"captions"}), tab="Caption",
                       base_models=("efficientnet_lite0+minilm", "Salesforce/blip-image-captioning-base",
                                    "microsoft/git-base"), hub_tag="image-captioning",
                       hub_example="Salesforce/blip-image-captioning-base", title="Image Captioning", **_TEXT))
# VQA also has answer_head (mmdemo/vlm/answers.py): a classifier over the training answers on frozen fused
# encoders, the default where the answers form a closed list (recipe.vqa_method); its head trains on encoder
# outputs computed once, so its epochs are cheap (0: the text rule's 400 steps).
_VQA = {**_TEXT, "methods": (*_TEXT["methods"], "answer_head"),
        "method_defaults": {**_TEXT_METHOD_DEFAULTS,
                            "answer_head": {"learning_rate": 2e-3, "epochs": 0, "batch_size": 32}}}
register_task(TaskSpec("vqa", frozenset({"question", "answers"}), tab="Ask",
                       base_models=("efficientnet_lite0+minilm", "Salesforce/blip-vqa-base",
                                    "HuggingFaceTB/SmolVLM-256M-Instruct"), hub_tag="visual-question-answering",
                       hub_example="Salesforce/blip-vqa-base", title="Visual Question Answering", **_VQA))
# Frozen encoders: the head trains on features computed once, so many cheap epochs (12: on the sample the
# 20-epoch curve passed 0.97 after about 8, and 12 end at 0.98 to 0.99); full and LoRA run both encoders in
# every step (bench/image_text.py, bench/RESULTS.md). The Hub has no image + text classification pipeline: the
# card takes the nearest known one, and the task is its tag.
register_task(TaskSpec(
    "image_text_classification", frozenset({"text", "label"}), ("frozen_encoders", "full", "lora"),
    {"frozen_encoders": {"learning_rate": 2e-3, "epochs": 12, "batch_size": 32},
     "full": {"learning_rate": 1e-4, "epochs": 6, "batch_size": 16},
     "lora": {"learning_rate": 1e-3, "epochs": 6, "batch_size": 16}},
    base_models=("efficientnet_lite0+minilm", "efficientnet_lite0+minilm-cross", "openai/clip-vit-base-patch32",
                 "timm/resnet50.a1_in1k+bert-base-uncased"), tab="Classify", hub_example="",
    pipeline_tag="image-classification", hub_tag="image-text-classification",
    title="Image + Text Classification", ingest="mmdemo.imagetext:ingest_image_text",
    training="mmdemo.imagetext:ImageTextClassificationTask", predictor="mmdemo.imagetext:load_image_text_predictor"))
# Image-text matching: the captioning layout, a dual encoder (mmdemo/dualenc.py). frozen_towers trains the
# projections and the temperature on both towers' outputs computed once, so its epochs cost little (on the
# sample: t2i R@1 1.0, caption zero-shot 0.98 after 20 epochs, where locked_image's 5 gave 0.94);
# locked_image (LiT) trains the text tower's top layers too, on image features computed once; full and LoRA
# run the image tower in every step. Bigger batches give more in-batch negatives (bench/RESULTS.md).
register_task(TaskSpec(
    "retrieval", frozenset({"captions"}), ("frozen_towers", "locked_image", "full", "lora"),
    {"frozen_towers": {"learning_rate": 1e-3, "epochs": 20, "batch_size": 64},
     "locked_image": {"learning_rate": 3e-4, "epochs": 5, "batch_size": 64},
     "full": {"learning_rate": 1e-4, "epochs": 6, "batch_size": 32},
     "lora": {"learning_rate": 1e-3, "epochs": 8, "batch_size": 32}},
    base_models=("efficientnet_lite0+minilm", "openai/clip-vit-base-patch32", "google/siglip-base-patch16-224"),
    tab="Search", hub_example="openai/clip-vit-base-patch32", pipeline_tag="zero-shot-image-classification",
    hub_tag="image-text-retrieval", title="Image-Text Retrieval", ingest="mmdemo.data.text:ingest_text",
    training="mmdemo.retrieval:RetrievalTask", predictor="mmdemo.retrieval:load_retrieval_predictor"))
