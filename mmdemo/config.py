"""One typed, validated configuration per training run, saved as run_dir/config.yaml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserInputError

# The one list of tasks, methods and base models: the CLI, the UI, the data checks and the Hub export
# read them from here. A task's first method and first base model are its defaults.
TASKS = ("classification", "captioning", "vqa")
TASK_METHODS = {"classification": ("full", "head", "lora", "bitfit"),
                "captioning": ("frozen_vision", "full", "lora"), "vqa": ("frozen_vision", "full", "lora")}
METHODS = ("full", "head", "lora", "bitfit", "frozen_vision")
# The base models the Train tab suggests per task: the first works offline, the others need the Hub.
BASE_MODELS = {"classification": ("efficientnet_lite0", "resnet18", "google/vit-base-patch16-224-in21k"),
               "captioning": ("efficientnet_lite0+minilm", "Salesforce/blip-image-captioning-base", "microsoft/git-base"),
               "vqa": ("efficientnet_lite0+minilm", "Salesforce/blip-vqa-base", "HuggingFaceTB/SmolVLM-256M-Instruct")}
DEFAULT_MODELS = {task: models[0] for task, models in BASE_MODELS.items()}
PRECISIONS = ("auto", "no", "fp16", "bf16")

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

    data: str = field(metadata={"help": "a dataset: zip / folder / csv / jsonl, or an ingested dataset folder"})
    output_dir: str = field(metadata={"help": "the run directory to write"})
    task: str = field(default="classification", metadata={"help": "what the model learns", "choices": TASKS})
    base_model: str = field(default="", metadata={
        "help": "a registry name, timm name, Hub id, model folder or run directory ('' = the task's default)"})
    method: str = field(default="", metadata={"help": "what trains ('' = the task's first method)", "choices": METHODS})
    pretrained: bool = field(default=True, metadata={"help": "start from the base model's pretrained weights"})
    epochs: int = field(default=0, metadata={"help": "passes over the training split (0 = the method's default)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0 = no limit)"})
    batch_size: int = field(default=0, metadata={"help": "images per step (0 = the method's default)"})
    image_size: int = field(default=0, metadata={"help": "input side in pixels (0 = the base model's own)"})
    learning_rate: float = field(default=0.0, metadata={"help": "peak learning rate (0 = the method's default)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay, in [0, 1)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of the steps spent warming up, in [0, 1)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "classification label smoothing, in [0, 1)"})
    augment: bool = field(default=True, metadata={"help": "random crops and flips (classification)"})
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
    extra: dict = field(default_factory=dict, metadata={"help": "free-form settings kept with the run"})

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
        p = []
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
            p.append(f"learning_rate must be 0 (default) or more (got {self.learning_rate})")
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
        if self.mixed_precision not in PRECISIONS:
            p.append(f"mixed_precision must be auto, no, fp16 or bf16 (got {self.mixed_precision!r})")
        return p

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


def typed_params(values: dict) -> dict:
    """Form or API values -> TrainConfig's types; None and "" are left out, so the field's default applies."""
    types = {f.name: param_type(f) for f in param_fields()}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise UserInputError(f"Unknown training settings: {', '.join(unknown)}.")
    typed = {}
    for name, value in values.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        try:
            typed[name] = types[name](value)
        except (TypeError, ValueError):
            raise UserInputError(f"{name} must be a number (got {str(value)[:40]!r}).") from None
    return typed
