"""One typed, validated configuration per training run, saved as run_dir/config.yaml."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checks import as_bool, as_float, as_int, shown
from .errors import UserInputError

PARSERS = {"int": as_int, "float": as_float, "bool": as_bool}

TASKS = ("classification", "captioning", "vqa")
TASK_METHODS = {"classification": ("full", "head", "lora", "bitfit"),
                "captioning": ("frozen_vision", "full", "lora"), "vqa": ("frozen_vision", "full", "lora")}
METHODS = ("full", "head", "lora", "bitfit", "frozen_vision")
DEFAULT_MODELS = {"classification": "efficientnet_lite0", "captioning": "efficientnet_lite0+minilm",
                  "vqa": "efficientnet_lite0+minilm"}

# Per-method defaults, used where the user leaves a value at 0 / "".  A frozen backbone takes a
# larger step size; LoRA sits in between (its update is low rank and starts at zero).
METHOD_DEFAULTS = {
    "full": {"learning_rate": 1e-3, "epochs": 4, "batch_size": 16},
    "head": {"learning_rate": 1e-2, "epochs": 6, "batch_size": 32},
    "lora": {"learning_rate": 3e-3, "epochs": 5, "batch_size": 16},
    "bitfit": {"learning_rate": 5e-3, "epochs": 5, "batch_size": 16},
    # Text decoders: epochs 0 = enough epochs for about TEXT_TARGET_STEPS optimizer steps (resolved
    # when the dataset's size is known), since a small caption set needs many passes and a VQA set few.
    # Batch 16: on the VQA sample, 2 epochs of batch 16 reach 0.943 in 5 min on 2 CPU cores where 3 epochs
    # of batch 32 reached 0.912 in 7 (bench/RESULTS.md).
    "frozen_vision": {"learning_rate": 3e-4, "epochs": 0, "batch_size": 16},
}
TEXT_METHOD_DEFAULTS = {"full": {"learning_rate": 1e-4, "epochs": 0, "batch_size": 32},
                        "lora": {"learning_rate": 1e-3, "epochs": 0, "batch_size": 32}}
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


def auto_epochs(num_rows: int, batch_size: int) -> int:
    """Epochs that give about TEXT_TARGET_STEPS steps, between 2 and 40."""
    steps_per_epoch = max(1, num_rows // max(1, batch_size))
    return max(2, min(40, -(-TEXT_TARGET_STEPS // steps_per_epoch)))


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; 0 / "" fields take the method's default.

    ``image_size`` 0 means the base model's own input size (resolved when the model is built).

    Construction validates every field and raises one ``UserInputError`` listing all problems.
    """

    data: str
    output_dir: str
    task: str = "classification"
    base_model: str = ""
    method: str = ""
    pretrained: bool = True
    epochs: int = 0
    max_steps: int = 0
    batch_size: int = 0
    image_size: int = 0
    learning_rate: float = 0.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    label_smoothing: float = 0.1
    augment: bool = True
    early_stopping_patience: int = 0
    seed: int = 0
    log_every: int = 0  # 0: automatic (see training.log_interval)
    lora_r: int = 8
    lora_alpha: int = 16
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"
    num_workers: int = -1  # -1: automatic (see training.loader_workers)
    checkpoint_every_minutes: float = field(default=10.0, metadata={
        "help": "also save a checkpoint within an epoch after this many minutes (0 = only at epoch ends), "
                "so a killed run loses little when resumed"})
    checkpoint_every_steps: int = field(default=0, metadata={
        "help": "also save a checkpoint every this many optimizer steps (0 = off)"})
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        problems = self._problems()
        if problems:
            raise UserInputError("; ".join(problems))
        # Frozen dataclass: fill the defaults once, so config.yaml holds the resolved values.
        set_ = object.__setattr__
        if not self.method:
            set_(self, "method", TASK_METHODS[self.task][0])
        defaults = METHOD_DEFAULTS[self.method]
        if self.task != "classification":
            defaults = TEXT_METHOD_DEFAULTS.get(self.method, defaults)
        if not self.base_model:
            set_(self, "base_model", DEFAULT_MODELS[self.task])
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
        if self.num_workers < -1:
            p.append(f"num_workers must be -1 (automatic), 0 (load in the training process) or more "
                     f"(got {self.num_workers})")
        if self.learning_rate < 0:
            p.append(f"learning_rate must be > 0 (got {self.learning_rate})")
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
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            p.append(f"mixed_precision must be auto, no, fp16 or bf16 (got {self.mixed_precision!r})")
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
    def load(cls, path) -> "TrainConfig":
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserInputError(f"Could not read config {path.name}: {e}. Fix the YAML syntax.") from None
        if not isinstance(values, dict):
            raise UserInputError(f"Config {path.name} must be a YAML mapping of key: value lines.")
        return cls.from_dict(values)
