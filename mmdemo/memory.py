"""A run's peak memory, estimated before it starts, against what the machine can give it.

    peak ~ base + weights + (gradients + AdamW states of the trainable ones)
           + batch x image_size^2 x a per-family activation factor + the decoded dataset
           + a frozen teacher's weights and its no-grad forward (distillation, continued runs)

The base (python, torch, the libraries, allocator slack) and the activation factors are fitted to the
peak RSS of short real runs on the CPU (bench/memory_estimate.py prints measured against estimated).
On a GPU the weights, states and activations live in VRAM: the same sum (plus CUDA's context) is compared
with the device's free memory (nvidia-smi; vram_warning), and only the base and the dataset with the
host's RAM. The training child then measures the real peak with a dry run of real steps (mmdemo/fit.py).
"""

from __future__ import annotations

from pathlib import Path

from . import procs, settings
from .errors import UserInputError
from .runs import META_FILE, MODEL_DIR, model_dir_of

MB = 2**20
# Fitted on 2 CPU cores, torch 2.14 (bench/memory_estimate.py): RSS of a child that has imported
# everything and built its model and data, less the weights and the dataset.
BASE_BYTES = {"classifier": 930 * MB, "composed": 940 * MB, "other": 1200 * MB}
# Bytes of activation memory per training sample and per input pixel (image_size^2). The composed
# captioner's frozen encoder runs once over the dataset (features cached, FEATURE_BYTES) and its
# decoder's cross-attention grows with the image tokens, (image_size / 32)^2.
ACTIVATION_BYTES = {"classifier": 1750.0, "composed": 490.0, "other": 2000.0}
# A frozen teacher (distillation's, or the previous model of a continued run) labels each training batch at
# the student's input size under no_grad: only a few feature maps are alive at once. Measured peak RSS of
# EfficientNet-Lite0 / Lite2 no-grad forwards (batch 16 / 32, 160 / 320 px): 370 to 410 bytes per sample-pixel.
TEACHER_ACTIVATION_BYTES = 410.0
FEATURE_BYTES = 1280 * 4  # per image token: EfficientNet-Lite0's last feature map, fp32
# (total, trainable when frozen_vision / head) parameters of the models the app offers, so that the
# estimate needs no model build in the server process.
KNOWN_PARAMS = {"efficientnet_lite0": 3.4e6, "efficientnet_lite1": 4.1e6, "efficientnet_lite2": 4.8e6,
                "resnet18": 11.2e6, "google/vit-base-patch16-224-in21k": 86e6,
                "efficientnet_lite0+minilm": 30.2e6, "Salesforce/blip-image-captioning-base": 247e6,
                "microsoft/git-base": 177e6, "Salesforce/blip-vqa-base": 385e6,
                "HuggingFaceTB/SmolVLM-256M-Instruct": 256e6}
VISION_SHARE = {"efficientnet_lite0+minilm": 0.11}  # the frozen encoder's share of the parameters
# frozen_encoders (image + text: the fusion head, 0.63 M of 26.6 M), frozen_towers (retrieval: the projections
# and the temperature, 1.12 M of 27.1 M) and locked_image (retrieval: MiniLM's top layers and the projections,
# 4.7 M of 27.1 M) as the default models' start records count them.
TRAINABLE_SHARE = {"full": 1.0, "head": 0.002, "lora": 0.05, "bitfit": 0.01, "dora": 0.05, "ia3": 0.01, "loha": 0.1,
                   "lokr": 0.01, "oft": 0.02, "adapter": 0.02, "vpt": 0.002, "frozen_encoders": 0.024,
                   "frozen_towers": 0.041, "locked_image": 0.17, "prompt_tuning": 0.0003}
DEFAULT_IMAGE_SIZE = {"efficientnet_lite0": 160, "efficientnet_lite1": 240, "efficientnet_lite2": 260,
                      "efficientnet_lite0+minilm": 128}
WARN_SHARE = 0.7  # warn above this share of the memory available, refuse above all of it


def estimate(cfg, num_images: int) -> dict:
    """The peak memory of ``cfg`` with ``num_images`` decoded images (train + validation), in bytes,
    with its parts."""
    family = _family(cfg)
    size = cfg.image_size or DEFAULT_IMAGE_SIZE.get(cfg.base_model, 224)
    total, trainable = _parameters(cfg)
    weights = 4 * total
    states = 12 * trainable  # fp32 gradient + AdamW's two moments
    activations = ACTIVATION_BYTES[family] * cfg.batch_size * size * size
    dataset = 3 * size * size * num_images  # uint8 tensors at image_size
    if family == "composed":
        dataset += num_images * (size // 32) ** 2 * FEATURE_BYTES
    parts = {"base": BASE_BYTES[family], "weights": weights, "gradients_and_optimizer": states,
             "activations": activations, "dataset": dataset, "teacher": 0}
    for model_dir, runs_forward in frozen_teachers(cfg):
        parts["teacher"] += _saved_bytes(model_dir) + (TEACHER_ACTIVATION_BYTES * cfg.batch_size * size * size
                                                       if runs_forward else 0)
    return {"bytes": int(sum(parts.values())), "parts": {k: int(v) for k, v in parts.items()},
            "image_size": size, "family": family}


def _family(cfg) -> str:
    if cfg.task == "classification":
        return "classifier" if cfg.base_model in KNOWN_PARAMS or "/" not in cfg.base_model else "other"
    return "composed" if cfg.base_model == "efficientnet_lite0+minilm" else "other"


def _parameters(cfg) -> tuple[float, float]:
    total = KNOWN_PARAMS.get(cfg.base_model) or _local_parameters(cfg.base_model) or _timm_parameters(cfg.base_model)
    if cfg.method == "frozen_vision":
        return total, total * (1 - VISION_SHARE.get(cfg.base_model, 0.3))
    return total, total * TRAINABLE_SHARE.get(cfg.method, 1.0)


def _local_parameters(base_model: str) -> float:
    # A previous run to continue from: its saved weights (fp32) say how big it is.
    model_dir = Path(base_model) / MODEL_DIR
    if not Path(base_model).is_absolute() or not model_dir.is_dir():
        return 0.0
    return _saved_bytes(model_dir) / 4


def _saved_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*.safetensors"))


def frozen_teachers(cfg) -> list[tuple[Path, bool]]:
    """The frozen models a run holds beside the one it trains, as (model folder, whether it runs a forward
    on every batch): distillation's teacher (``cfg.teacher``), and the previous model of a continued run
    (its base model a saved classifier), which labels batches when ``keep_old`` distils."""
    found = []
    if getattr(cfg, "teacher", ""):
        teacher = Path(cfg.teacher)
        found += [(d, True) for d in (teacher / MODEL_DIR, teacher) if (d / META_FILE).is_file()][:1]
    previous = model_dir_of(cfg.base_model) if cfg.task == "classification" else None
    if previous is not None:
        found.append((previous, cfg.keep_old in ("distill", "both")))
    return found


def _timm_parameters(name: str) -> float:
    """Counted on the meta device (no memory, no download); 0 where the name is no timm model."""
    try:
        import timm
        import torch

        with torch.device("meta"):
            net = timm.create_model(name, pretrained=False)
        return float(sum(p.numel() for p in net.parameters()))
    except Exception:  # noqa: BLE001 - a Hub id or an unknown name: the estimate leaves the weights out
        return 0.0


def check_memory(cfg, num_images: int) -> str:
    """Refuses (UserInputError) a run whose estimated peak exceeds the memory available to it, naming
    both and a batch size / image size that would fit; returns a warning when it is close, or when its
    GPU part exceeds the GPU's free memory (vram_warning), else ""."""
    est = estimate(cfg, num_images)
    available, where = available_for_job()
    if not available:
        return ""
    need, teacher = est["bytes"], est["parts"]["teacher"]
    teacher = f", {_gb(teacher)} of it for the frozen teacher" if teacher else ""
    if procs.gpu_visible():  # weights, states, activations and a teacher go to the GPU: the host holds the rest
        need, teacher = est["parts"]["base"] + est["parts"]["dataset"], ""
    if need > available:
        raise UserInputError(
            f"This run needs about {_gb(need)} of memory (batch_size {cfg.batch_size} at image_size "
            f"{est['image_size']}{teacher}), but {where} {_gb(available)}. {_what_fits(cfg, num_images, available)}")
    host = ""
    if need > WARN_SHARE * available:
        host = (f"This run needs about {_gb(need)} of memory and {where} {_gb(available)}: it may run "
                f"out. {_what_fits(cfg, num_images, WARN_SHARE * available, 'For headroom')}")
    return " ".join(w for w in (vram_warning(cfg, num_images, est), host) if w)


def available_for_job() -> tuple[int, str]:
    """The memory a new child can use and where it is: the machine's MemAvailable, capped by the
    child's own limit (MMDEMO_JOB_MEMORY_LIMIT)."""
    available, where = procs.available_memory_bytes(), "the machine has"
    limit = settings.job_settings()["memory_limit"]
    if limit and limit < available:
        available, where = limit, "one training job may use (MMDEMO_JOB_MEMORY_LIMIT)"
    return available, where


def _what_fits(cfg, num_images: int, budget: float, lead: str = "Try", need=lambda est: est["bytes"]) -> str:
    from dataclasses import replace

    size = estimate(cfg, num_images)["image_size"]
    for batch in (cfg.batch_size // 2, cfg.batch_size // 4, 8, 4, 1):
        if 1 <= batch < cfg.batch_size and need(estimate(replace(cfg, batch_size=batch), num_images)) <= budget:
            return f"{lead} batch_size {batch}, or a smaller image_size."
    for smaller in (size // 2, 224, 160, 128, 64):
        if 32 <= smaller < size and need(estimate(replace(cfg, batch_size=min(cfg.batch_size, 8), image_size=smaller),
                                                  num_images)) <= budget:
            return f"{lead} batch_size {min(cfg.batch_size, 8)} at image_size {smaller}."
    return "Even a small batch would not fit: pick a smaller model or the 'head' / 'lora' method."


# What CUDA itself takes on the device before the first tensor (context, cuBLAS / cuDNN workspaces).
CUDA_CONTEXT_BYTES = 600 * MB


def device_need(est: dict, simulated: bool = False) -> int:
    """The part of an estimate that lives in the GPU's memory: weights, gradients and optimizer states,
    activations, and CUDA's own context. The activation factors were fitted in fp32 on the CPU: under
    bf16 autocast they overstate a GPU's need, which leaves a margin."""
    parts = est["parts"]
    return int(parts["weights"] + parts["gradients_and_optimizer"] + parts["activations"] + parts["teacher"]
               + (0 if simulated else CUDA_CONTEXT_BYTES))


def device_free(cfg) -> tuple[int, str]:
    """The free memory of the GPU a run trains on (the least free one when several train together) and
    its name; (0, "") without one. A config's ``extra.simulated_device`` stands in for it (mmdemo/fit.py)."""
    simulated = (cfg.extra or {}).get("simulated_device")
    if simulated:
        try:
            return int(float(simulated["budget_mb"]) * MB), "the simulated device"
        except (KeyError, TypeError, ValueError):
            return 0, ""
    gpus = procs.gpu_memory()
    if not gpus:
        return 0, ""
    least = min(gpus, key=lambda g: g["free"])
    return least["free"], least["name"]


def vram_warning(cfg, num_images: int, est: dict | None = None) -> str:
    """A red warning when the run's estimated GPU memory exceeds the device's free memory (the child then
    trains each batch in micro-batches that fit, measured before its first step: mmdemo/fit.py), with
    the batch size that would fit in one pass; "" when it fits or there is no GPU."""
    free, name = device_free(cfg)
    if not free:
        return ""
    simulated = bool((cfg.extra or {}).get("simulated_device"))
    est = est or estimate(cfg, num_images)
    need = device_need(est, simulated)
    if need <= free:
        return ""
    fits = _what_fits(cfg, num_images, free, "One pass would fit with", lambda e: device_need(e, simulated))
    from .config import AUTO_BATCH

    if (cfg.extra or {}).get(AUTO_BATCH):  # batch_size 0: fitting the method's batch is the plan
        return (f"Automatic batch size: the method's batch of {cfg.batch_size} needs about {_gb(need)} of GPU memory "
                f"at image_size {est['image_size']} and {name} has {_gb(free)} free, so it will train in the largest "
                f"micro-batches that fit, measured before the first step (same effective batch). {fits}")
    return (f"🔴 Will not fit: this run needs about {_gb(need)} of GPU memory (batch_size {cfg.batch_size} at "
            f"image_size {est['image_size']}) and {name} has {_gb(free)} free. It will train each batch in "
            f"smaller micro-batches (same effective batch, slower). {fits}")


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def peak_memory_mb() -> float:
    """This process's peak memory so far: the GPU's peak allocation where one is used, else the peak RSS."""
    import resource
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / MB, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
