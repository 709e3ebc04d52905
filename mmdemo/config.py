"""One typed, validated configuration per training run, saved as run_dir/config.yaml."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checks import as_bool, as_float, as_int, shown
from .errors import UserInputError
from .recipe import (LP_FT_LEARNING_RATE, RECIPES, SWITCHES, epochs_for_dataset, follows_data, resolve_recipe,
                     vqa_method)
from .taskspec import TASK_SPECS
from .tracking import project_problem

PARSERS = {"int": as_int, "float": as_float, "bool": as_bool}

# The tasks, their methods (the first is the default), per-method defaults and base models (the first
# is the default) live in the task registry (mmdemo/taskspec.py); these are the views the CLI, the UI,
# the data checks and the Hub export read.
TASKS = tuple(TASK_SPECS)
TASK_METHODS = {name: spec.methods for name, spec in TASK_SPECS.items()}
METHODS = tuple(dict.fromkeys(m for spec in TASK_SPECS.values() for m in spec.methods))
BASE_MODELS = {name: spec.base_models for name, spec in TASK_SPECS.items()}
DEFAULT_MODELS = {name: spec.default_model for name, spec in TASK_SPECS.items()}
PRECISIONS = ("auto", "no", "fp16", "bf16")
LR_SCHEDULES = ("auto", "cosine", "one-cycle")
CONTRASTIVE_LOSSES = ("auto", "infonce", "sigmoid")
# What a run continued from a previous classification run does to keep its knowledge (mmdemo/continual.py).
KEEP_OLD = ("both", "replay", "distill", "off")
# Captioning / VQA continue with replay or off: "both" (the default) is replay there, distillation is refused.
TEXT_KEEP_OLD_TASKS = ("captioning", "vqa")
TEXT_TARGET_STEPS = 400
# Past this the loss of any recipe here diverges within a few steps.
MAX_LEARNING_RATE = 1.0


def _as_text(name: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    raise UserInputError(f"{name} must be text (got {shown(value)})")


def _as_mapping(name: str, value) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    raise UserInputError(f"{name} must be a mapping of key: value (got {shown(value)})")


# A method whose steps cost little targets more of them: answer_head trains a fusion head on encoder outputs
# computed once (about 11 ms a step). On the VQA sample's first 200 images 400 steps gave 0.924 and 960 steps
# 0.944, on the first 400 images 490 steps 0.981 and 1,078 steps 0.982 (bench/RESULTS.md).
TARGET_STEPS = {"answer_head": 1000}


def auto_epochs(num_rows: int, batch_size: int, method: str = "") -> int:
    """Epochs that give about TEXT_TARGET_STEPS steps (the method's TARGET_STEPS), between 2 and 40."""
    steps_per_epoch = max(1, num_rows // max(1, batch_size))
    return max(2, min(40, -(-TARGET_STEPS.get(method, TEXT_TARGET_STEPS) // steps_per_epoch)))


# extra's key for a batch_size left at 0: the method's default batch, trained in the micro-batches that fit.
AUTO_BATCH = "auto_batch"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; 0 / "" fields take the method's default.

    ``image_size`` 0 means the base model's own input size (resolved when the model is built).

    Construction validates every field and raises one ``UserInputError`` listing all problems.
    """

    data: str = field(metadata={"help": "a dataset: zip / folder / csv / jsonl, or an ingested dataset folder"})
    output_dir: str = field(metadata={"help": "the run directory to write"})
    task: str = field(default="classification", metadata={"help": "what the model learns", "choices": TASKS})
    base_model: str = field(default="", metadata={
        "help": "a registry name, timm name, Hub id, model folder or run directory ('' = the task's default)"})
    method: str = field(default="", metadata={"help": "what trains ('' = the task's first method)", "choices": METHODS})
    pretrained: bool = field(default=True, metadata={"help": "start from the base model's pretrained weights"})
    epochs: int = field(default=0, metadata={"help": "passes over the training split (0 = the method's default; "
                                                     "full fine-tune and recipe lp-ft: from the dataset's size)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0 = no limit)"})
    batch_size: int = field(default=0, metadata={"help": "images per step (0 = the method's default; on a GPU "
                                                         "trained in the largest micro-batches that fit)"})
    image_size: int = field(default=0, metadata={"help": "input side in pixels (0 = the base model's own; full "
                                                         "fine-tune and recipe lp-ft: from the images' resolution, "
                                                         "128 px up to the model's own)"})
    learning_rate: float = field(default=0.0, metadata={"help": "peak learning rate (0 = the method's default; recipe "
                                                               "lp-ft: 1e-3)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay, in [0, 1)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of the steps spent warming up, in [0, 1)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "classification label smoothing, in [0, 1)"})
    augment: bool = field(default=True, metadata={"help": "random crops and flips (classification; no crops for "
                                                           "images under two thirds of the input side, random shifts "
                                                           "instead for glyph-like ones, no flips per hflip)"})
    early_stopping_patience: int = field(default=0, metadata={
        "help": "evaluations without improvement before stopping (0 = off)"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and the data order"})
    log_every: int = field(default=0, metadata={  # 0: automatic (see training.log_interval)
        "help": "steps between metrics lines (0 = automatic: every step on the CPU, every 10 on a GPU)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    mixed_precision: str = field(default="auto", metadata={"help": "autocast precision (auto: bf16 / fp16 on a GPU, "
                                                                   "none on the CPU)", "choices": PRECISIONS})
    num_workers: int = field(default=-1, metadata={  # -1: automatic (see training.loader_workers)
        "help": "data loader workers (-1 = automatic, 0 = load in the training process)"})
    checkpoint_every_minutes: float = field(default=10.0, metadata={
        "help": "also save a checkpoint within an epoch after this many minutes (0 = only at epoch ends), "
                "so a killed run loses little when resumed"})
    checkpoint_every_steps: int = field(default=0, metadata={
        "help": "also save a checkpoint every this many optimizer steps (0 = off)"})
    contrastive_loss: str = field(default="auto", metadata={
        "help": "retrieval loss: infonce (CLIP), sigmoid (SigLIP) or auto (SigLIP models sigmoid, others infonce)",
        "choices": CONTRASTIVE_LOSSES})
    trackio: str = field(default="", metadata={
        "help": "also log this run's metrics to this trackio project, in trackio's local store ('' = off)"})
    recipe: str = field(default="auto", metadata={
        "help": "classification: lp-ft fits the new head on frozen features before everything trains, plain "
                "trains at once (auto: plain; lp-ft is opt-in); config.yaml records the one used",
        "choices": RECIPES})
    hflip: str = field(default="auto", metadata={
        "help": "random horizontal flips in the augmentation (auto: off for glyph-like images such as digits "
                "or text and for images too small for random crops, on otherwise)", "choices": SWITCHES})
    freeze_early: str = field(default="auto", metadata={
        "help": "classification: keep a CNN's stem and its stride-2 and stride-4 stages (edge and texture filters) at "
                "their pretrained weights, which spares their gradients (auto: on for a full fine-tune from pretrained "
                "weights, off for glyph-like images such as digits or text)",
        "choices": SWITCHES})
    probe_guard: str = field(default="auto", metadata={
        "help": "classification: also fit the pretrained network's linear probe before the first step, and end on "
                "it where it scores at least as high on validation as the fine-tune (auto: on for a plain full fine-tune from "
                "pretrained weights of up to 5,000 training images, not glyph-like ones)", "choices": SWITCHES})
    lr_schedule: str = field(default="auto", metadata={
        "help": "learning-rate schedule: cosine (warm-up_ratio of the steps warming up, then cosine to 0), one-cycle "
                "(0.3 of the steps warming up from 1/25 of the rate, cosine down to 1/25 000 of it, Adam's beta1 cycled between "
                "0.95 and 0.85) or auto (one-cycle for a full classification fine-tune, cosine otherwise)",
        "choices": LR_SCHEDULES})
    keep_best: str = field(default="auto", metadata={
        "help": "classification: end with the weights of the best validation evaluation, not the last (auto: on "
                "from 500 validation images, where the best is not a lucky draw of a small split)",
        "choices": SWITCHES})
    keep_old: str = field(default=KEEP_OLD[0], metadata={
        "help": "continuing a previous run: keep what it knew by replaying its memory of training images, distilling "
                "its outputs, both, or off (captioning / VQA: replay of its image + text rows, or off; both = replay)",
        "choices": KEEP_OLD})
    teacher: str = field(default="", metadata={
        "help": "classification: distil from this finished classification run (a run id of yours on the app, a run "
                "directory on the CLI): its soft labels train the student ('' = off; mmdemo/distill.py)"})
    distill_temperature: float = field(default=4.0, metadata={
        "help": "distillation: the softmax temperature of the teacher's and the student's outputs"})
    distill_alpha: float = field(default=0.5, metadata={
        "help": "distillation: the weight of the soft-label term, in [0, 1] (the hard-label loss gets 1 - alpha)"})
    distill_images: str = field(default="", metadata={
        "help": "distillation: a folder of unlabelled images the teacher labels too ('' = the training images only)"})
    distill_baseline: str = field(default="", metadata={
        "help": "distillation: a run of the student trained without the teacher, set beside it in the report"})
    num_processes: int = field(default=0, metadata={
        "help": "training processes started by the app (0 = one per visible GPU, one on the CPU); several "
                "train together with DDP (accelerate launch on GPUs, torchrun on the CPU)"})
    extra: dict = field(default_factory=dict, metadata={"help": "free-form settings kept with the run"})

    def __post_init__(self):
        problems = self._problems()
        if problems:
            raise UserInputError("; ".join(problems))
        # Frozen dataclass: fill the defaults once, so config.yaml holds the resolved values.
        set_ = object.__setattr__
        if not self.method and self.task == "vqa":  # a closed list of answers: the answer classifier
            set_(self, "method", vqa_method(self.data, self.base_model))
        if not self.method:
            set_(self, "method", TASK_METHODS[self.task][0])
        defaults = TASK_SPECS[self.task].method_defaults[self.method]
        if not self.base_model:
            set_(self, "base_model", DEFAULT_MODELS[self.task])
        if self.task in TEXT_KEEP_OLD_TASKS and self.keep_old == "both":  # no distillation for text: replay
            set_(self, "keep_old", "replay")
        set_(self, "recipe", resolve_recipe(self.recipe, self.method) if self.task == "classification" else "plain")
        data_rules = self.task == "classification" and follows_data(self.recipe, self.method)
        if self.lr_schedule == "auto":
            set_(self, "lr_schedule", "one-cycle" if data_rules else "cosine")
        if not self.epochs and data_rules:  # epochs from the dataset's size (mmdemo/recipe.py)
            set_(self, "epochs", epochs_for_dataset(self.data, self.batch_size or defaults["batch_size"]))
        if not self.learning_rate and self.recipe == "lp-ft":
            set_(self, "learning_rate", LP_FT_LEARNING_RATE)
        if not self.batch_size:  # kept with the run: on a GPU the child fits the default batch to the device
            set_(self, "extra", {**self.extra, AUTO_BATCH: True})
        elif self.extra.get(AUTO_BATCH) and self.batch_size != defaults["batch_size"]:  # a batch given since
            set_(self, "extra", {k: v for k, v in self.extra.items() if k != AUTO_BATCH})
        for name in ("learning_rate", "epochs", "batch_size"):
            if not getattr(self, name):
                set_(self, name, defaults[name])

    def _problems(self) -> list[str]:
        p = self._parse_types()
        if self.task not in TASKS:
            p.append(f"task must be one of {', '.join(TASKS)} (got {self.task!r})")
        methods = TASK_METHODS.get(self.task, METHODS)
        if self.method and self.method not in methods:
            p.append(f"method must be one of {', '.join(methods)} for {self.task} (got {self.method!r})")
        if not str(self.data):
            p.append("data must name an ingested dataset directory")
        for name in ("epochs", "max_steps", "batch_size", "image_size", "early_stopping_patience", "seed"):
            if int(getattr(self, name)) < 0:
                p.append(f"{name} must be 0 (default) or more (got {getattr(self, name)})")
        if not 0 <= self.num_processes <= 64:
            p.append(f"num_processes must be 0 (one per GPU) to 64 (got {self.num_processes})")
        if self.num_workers < -1:
            p.append(f"num_workers must be -1 (automatic), 0 (load in the training process) or more "
                     f"(got {self.num_workers})")
        if self.learning_rate < 0:
            p.append(f"learning_rate must be 0 (default) or more (got {self.learning_rate})")
        if self.learning_rate > MAX_LEARNING_RATE:
            p.append(f"learning_rate must be at most {MAX_LEARNING_RATE} (got {self.learning_rate}); "
                     "fine-tuning uses about 1e-5 to 1e-2")
        if self.checkpoint_every_minutes < 0 or self.checkpoint_every_steps < 0:
            p.append("checkpoint_every_minutes and checkpoint_every_steps must be 0 (off) or more")
        if self.image_size and not 32 <= self.image_size <= 1024:
            p.append(f"image_size must be between 32 and 1024 pixels (got {self.image_size})")
        if self.batch_size > 4096:
            p.append(f"batch_size must be at most 4096 (got {self.batch_size})")
        if not 0 <= self.weight_decay < 1:
            p.append(f"weight_decay must be in [0, 1) (got {self.weight_decay})")
        if not 0 <= self.warmup_ratio < 1:
            p.append(f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if not 0 <= self.label_smoothing < 1:
            p.append(f"label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        if self.log_every < 0:
            p.append(f"log_every must be 0 (automatic) or more (got {self.log_every})")
        if self.gradient_accumulation_steps < 1 or self.lora_r < 1:
            p.append("gradient_accumulation_steps and lora_r must be at least 1")
        if self.contrastive_loss not in CONTRASTIVE_LOSSES:
            p.append(f"contrastive_loss must be auto, infonce or sigmoid (got {self.contrastive_loss!r})")
        if self.recipe not in RECIPES:
            p.append(f"recipe must be one of {', '.join(RECIPES)} (got {self.recipe!r})")
        for name in ("hflip", "keep_best", "freeze_early", "probe_guard"):
            if getattr(self, name) not in SWITCHES:
                p.append(f"{name} must be one of {', '.join(SWITCHES)} (got {getattr(self, name)!r})")
        if self.lr_schedule not in LR_SCHEDULES:
            p.append(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got {self.lr_schedule!r})")
        if self.keep_old not in KEEP_OLD:
            p.append(f"keep_old must be one of {', '.join(KEEP_OLD)} (got {self.keep_old!r})")
        elif self.keep_old == "distill" and self.task in TEXT_KEEP_OLD_TASKS:
            p.append(f"keep_old 'distill' applies to classification runs; a continued {self.task} run keeps what it "
                     f"knew by replay (the default) or not at all (off)")
        if (self.distill_images or self.distill_baseline) and not self.teacher:
            p.append("distill_images and distill_baseline need a teacher run")
        if self.teacher and self.task != "classification":
            p.append(f"teacher (distillation) applies to classification runs only (got task {self.task!r})")
        if not 0 <= self.distill_alpha <= 1 or self.distill_temperature <= 0:
            p.append(f"distill_alpha must be in [0, 1] and distill_temperature above 0 (got {self.distill_alpha}, "
                     f"{self.distill_temperature})")
        if self.mixed_precision not in PRECISIONS:
            p.append(f"mixed_precision must be auto, no, fp16 or bf16 (got {self.mixed_precision!r})")
        if project_problem(self.trackio):
            p.append(project_problem(self.trackio))
        return p

    def _parse_types(self) -> list[str]:
        """Parses every field to its declared type ("3" -> 3, "false" -> False); a value that does not
        parse is a problem, and the field takes its default so that the range checks can still run."""
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                if f.type in PARSERS:
                    value = PARSERS[f.type](f.name, value)
                elif f.type == "str" and f.metadata.get("choices") == SWITCHES and isinstance(value, bool):
                    value = "on" if value else "off"  # a switch given as a boolean (configs written before it had auto)
                elif f.type == "str":
                    value = _as_text(f.name, value)
                elif f.type == "dict":
                    value = _as_mapping(f.name, value)
            except UserInputError as e:
                problems.append(str(e))
                value = "" if f.default is dataclasses.MISSING else f.default
                if f.default_factory is not dataclasses.MISSING:
                    value = f.default_factory()
            object.__setattr__(self, f.name, value)
        return problems

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        """Writes the resolved config as YAML (atomically: temp file + rename)."""
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserInputError(
                f"Unknown config keys: {', '.join(unknown)}. Known keys: {', '.join(sorted(known))}.")
        return cls(**values)

    @classmethod
    def load_values(cls, path) -> dict:
        """The key: value mapping of a config YAML file, unvalidated (the CLI merges its flags into it)."""
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserInputError(f"Could not read config {path.name}: {e}. Fix the YAML syntax.") from None
        if not isinstance(values, dict):
            raise UserInputError(f"Config {path.name} must be a YAML mapping of key: value lines.")
        return values

    @classmethod
    def load(cls, path) -> "TrainConfig":
        return cls.from_dict(cls.load_values(path))


def param_fields() -> list[dataclasses.Field]:
    """The training parameters a user sets (every TrainConfig field but ``extra``), in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if f.name != "extra"]


def param_type(f: dataclasses.Field) -> type:
    """The Python type of a field (the annotations are strings under ``from __future__ import annotations``)."""
    return {"str": str, "int": int, "float": float, "bool": bool, "dict": dict}[str(f.type)]


def form_params(values: dict) -> dict:
    """Form or API values for TrainConfig: unknown names refused, None and "" left out (so the field's
    default applies); TrainConfig itself parses the rest to the fields' types, naming any that do not parse."""
    known = {f.name for f in param_fields()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserInputError(f"Unknown training settings: {', '.join(unknown)}.")
    return {name: value for name, value in values.items()
            if value is not None and not (isinstance(value, str) and not value.strip())}
