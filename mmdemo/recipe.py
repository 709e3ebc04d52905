"""The default classification recipe: decisions taken from the data, and the phases they add to the loop.

Pure decisions (no torch at import): the number of epochs from the dataset's size, the input side from
the images' own resolution, whether random crops and horizontal flips are safe augmentations (not for tiny
upscaled images; no flips for digits, letters or other glyphs, which get random shifts instead of crops),
whether the best evaluation is kept (only on a validation split big enough to tell), and which recipe a method gets. Phases (torch, called by the loop): fitting a new head on
frozen features before everything trains (LP-FT), and keeping the weights of the best evaluation.

The figures that chose these rules are in bench/RESULTS.md (``bench/recipes.py``).
"""

from __future__ import annotations

import math
from pathlib import Path

RECIPES = ("auto", "lp-ft", "plain")
SWITCHES = ("auto", "on", "off")
# Optimizer steps a small dataset should get at least, and the epochs the rule stays between: below
# about 100 steps a few hundred images are underfitted; past 5 epochs at 128 px a run costs more than the
# naive fine-tune it must beat (5 epochs at 128 px, bench/recipes.py).
TARGET_STEPS = 100
MIN_EPOCHS, MAX_EPOCHS = 3, 5
# Tiny images (8 px digits, 25 px faces) still need a few pixels per stride-32 cell: upscaled to 128 px
# (a 4 x 4 final feature map). At 96 px the full fine-tune lost to the naive one at 128 on digits (0.81 vs
# 0.88) and the frozen features' probe on faces (0.971 vs 1.0) (bench/RESULTS.md).
MIN_SIDE = 128
# Glyph-like: near-grey (mean channel spread below this, 0..255) and most pixels at the ink or paper
# extremes of each image's range.
GREY_SPREAD, EXTREME_SHARE = 8.0, 0.5
BEST_FILE = "best.safetensors"
# Images with a median shorter side under this share of the training side (upscaled more than 1.5 x) get no
# random crops: with them the 64 px shapes at 128 px scored 0.967 / 1.0 on two seeds, 1.0 / 0.978 with flips
# only and 1.0 on three seeds with neither (bench/RESULTS.md).
CROP_MIN_SHARE = 2 / 3
# Glyph-like images too small for random crops (upscaled digits, letters) are shifted instead, up to this share of
# the side each way (the classic augmentation of handwritten digits): on bench/recipes.py's 8 px digits at 128 px the
# default scored 0.850 with shifts and 0.828 without (twelve seeds each; the naive fine-tune 0.835), at the same
# CPU time. Faces (25 px, not glyph-like) gained nothing from them (0.990 vs 0.995 on three seeds).
SHIFT_SHARE = 1 / 8
# A full fine-tune keeps the layers before the stride-8 features at their pretrained weights: the stem and the
# stages at a reduction of at most this (generic edge and texture filters, where a CNN spends most of its
# backward pass: their inputs are the largest). Lite0, batch 16 at 128 px, one thread: a step 0.58 -> 0.42 s.
FREEZE_MAX_REDUCTION = 4
# A plain full fine-tune of a small dataset also fits the pretrained network's linear probe (``fit_head``) before
# its first step and ends on it where the probe scores at least as high on validation (a tie: the simpler model): a
# fine-tune that drifts from good pretrained features on a few hundred images can lose to them (bench/recipes.py's
# faces: a seed at 0.957 where the probe is perfect; its validation 0.967 against the probe's 1.0; another at
# 0.986 on test that tied the probe on validation). The probe costs a forward pass over the
# training and validation images, about a tenth of a 5-epoch run; past this many images it rarely wins.
PROBE_MAX_TRAIN = 5000
PROBE_FILE = "probe.safetensors"
# Validation images from which keeping the best evaluation (rather than the last) is the automatic choice.
# Below this, one image is more than 0.2 points and the best of several evaluations is mostly the luckiest:
# on bench/recipes.py's 30 to 100-image validation splits the best kept scored 0.95 on validation where the
# test split gave 0.815.
KEEP_BEST_MIN_VAL = 500
# LP-FT's second phase where no learning rate is given. 3e-4 lost to 1e-3 on three of four datasets of
# bench/recipes.py (photos 0.856 vs 0.931, digits 0.64 vs 0.77); the first epoch after the head phase still
# drops validation accuracy (digits 0.82 -> 0.45), which points at BatchNorm statistics, not the rate.
LP_FT_LEARNING_RATE = 1e-3


# VQA: the closed-answer method (mmdemo/vlm/answers.py), the default where the answers form a closed list: at
# most this many distinct answers among the training questions, and at least this share of the validation
# questions answered by one of them. On 400 easy-VQA images it reached 0.982 VQA accuracy in 28 s of CPU where
# the generative frozen_vision reached 0.913 in 326 s (bench/RESULTS.md).
ANSWER_METHOD = "answer_head"
MAX_CLOSED_ANSWERS = 1000
MIN_ANSWER_COVERAGE = 0.95


def top_answer(answers) -> str:
    """A question's most common answer (its first, among equally common ones)."""
    from collections import Counter

    return Counter(answers).most_common(1)[0][0]


def answer_vocabulary(answer_lists) -> list[str]:
    """The answers of a training split as the classes: each row's most common answer, grouped by its
    normalised form (VQA's normalisation: case, articles, number words), shown in its most frequent
    spelling; sorted by frequency, then alphabetically."""
    from collections import Counter

    from .metrics import normalize_answer

    counts, spellings = Counter(), {}
    for answers in answer_lists:
        if not answers:
            continue
        top = top_answer(answers)
        key = normalize_answer(top)
        counts[key] += 1
        spellings.setdefault(key, Counter())[top] += 1
    order = sorted(counts, key=lambda k: (-counts[k], k))
    return [spellings[k].most_common(1)[0][0] for k in order]


def closed_answers(train_answers, val_answers) -> dict:
    """Whether VQA answers form a closed list: {"closed", "answers" (distinct training answers, ``answer_vocabulary``),
    "coverage" (the share of validation questions whose most common answer is one of them)}. Answers are compared
    after VQA's normalisation; ``*_answers``: one list of answers per question."""
    from .metrics import normalize_answer

    known = {normalize_answer(a) for a in answer_vocabulary(train_answers)}
    val = [normalize_answer(top_answer(a)) for a in val_answers if a]
    coverage = sum(a in known for a in val) / len(val) if val else 0.0
    return {"closed": bool(known) and len(known) <= MAX_CLOSED_ANSWERS and coverage >= MIN_ANSWER_COVERAGE,
            "answers": len(known), "coverage": round(coverage, 4)}


def vqa_method(data, base_model: str = "") -> str:
    """The VQA method for an ingested dataset folder when none is given: ANSWER_METHOD where its answers form a
    closed list (``closed_answers``) and the base model is the offline default, or where the base model is a
    closed-answer run (continued with its own method); "" (the task's first method, the generative default)
    otherwise or where the dataset cannot be read."""
    import json

    from .runs import META_FILE, model_dir_of
    from .taskspec import task_spec

    if base_model and base_model.strip() != task_spec("vqa").default_model:
        model_dir = model_dir_of(base_model.strip())
        try:
            family = json.loads((model_dir / META_FILE).read_text()).get("family") if model_dir else None
        except (OSError, ValueError):
            family = None
        return ANSWER_METHOD if family == "answer-head" else ""
    try:
        import datasets

        splits = datasets.load_from_disk(str(Path(data) / "data"))
        train, val = splits["train"]["answers"], splits["validation"]["answers"]
    except Exception:  # not an ingested VQA folder (yet): the loop reports what is wrong with it
        return ""
    return ANSWER_METHOD if closed_answers(train, val)["closed"] else ""


def classification_epochs(num_train: int, batch_size: int) -> int:
    """Epochs that give about TARGET_STEPS optimizer steps, between MIN_EPOCHS and MAX_EPOCHS."""
    steps_per_epoch = max(1, math.ceil(num_train / max(1, batch_size)))
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))


def epochs_for_dataset(data, batch_size: int) -> int:
    """``classification_epochs`` for an ingested dataset folder; 0 where its summary cannot be read."""
    import json

    try:
        num_train = int(json.loads((Path(data) / "summary.json").read_text())["num_train"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return classification_epochs(num_train, batch_size) if num_train > 0 else 0


def median_side(sizes) -> int | None:
    """The median shorter side of images of ``sizes`` ((width, height) pairs); None for no images."""
    sides = sorted(min(w, h) for w, h in sizes)
    return sides[len(sides) // 2] if sides else None


def image_side(sizes, native: int) -> int:
    """The input side for images of ``sizes`` ((width, height) pairs): their median shorter side
    rounded up to a multiple of 32, at least MIN_SIDE, at most the model's own ``native`` side."""
    median = median_side(sizes)
    if median is None:
        return native
    return min(native, max(MIN_SIDE, 32 * math.ceil(median / 32)))


def glyph_like(images) -> bool:
    """Whether images look like glyphs (digits, letters, symbols on a plain ground), where a mirror
    image is another or no symbol: near-grey, and most pixels at the extremes of each image's range.

    Args:
        images: PIL images (a sample of the training split is enough).
    """
    import numpy as np

    spreads, shares = [], []
    for image in images:
        a = np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.float32)
        spreads.append(float(np.abs(a - a.mean(2, keepdims=True)).mean()))
        grey = a.mean(2)
        lo, hi = float(grey.min()), float(grey.max())
        if hi - lo < 1:
            continue  # a flat image says nothing
        n = (grey - lo) / (hi - lo)
        shares.append(float(((n < 0.15) | (n > 0.85)).mean()))
    if not shares:
        return False
    return float(np.median(spreads)) < GREY_SPREAD and float(np.median(shares)) > EXTREME_SHARE


def use_hflip(setting: str, images, crops: bool = True, glyphs: bool | None = None) -> bool:
    """The flip switch resolved: "on" / "off" as given, "auto" off for glyph-like images and for images too
    small for random crops (``crops`` False, ``use_crops``): without flips the 64 px shapes at 128 px scored
    1.0 on three seeds (0.978 to 1.0 with them) and the 25 px faces 0.986 (0.981) (bench/RESULTS.md). ``glyphs``:
    ``glyph_like(images)`` where the caller has it already."""
    if setting in ("on", "off"):
        return setting == "on"
    return crops and not (glyph_like(images) if glyphs is None else glyphs)


def use_freeze_early(setting: str, method: str, pretrained: bool = True, glyphs: bool = False) -> bool:
    """The freeze_early switch resolved for a full fine-tune (the other methods freeze more already): "on" /
    "off" as given, "auto" on from pretrained weights (a network trained from scratch needs its stem trained)
    except for glyph-like images (``glyph_like``: strokes on a plain ground, far from the natural textures the
    stem's filters were trained on): on bench/recipes.py's digits the default scored 0.823 with them trained and
    0.804 with them frozen (six seeds each; the naive fine-tune 0.840)."""
    if method != "full":
        return False
    if setting in ("on", "off"):
        return setting == "on"
    return pretrained and not glyphs


def use_probe_guard(setting: str, recipe: str, method: str, pretrained: bool, num_train: int,
                    continued: bool = False, distilled: bool = False, glyphs: bool = False) -> bool:
    """The probe_guard switch resolved: never for a continued run (its head knows more classes than this data), a
    distilled one (the teacher's knowledge is what it is for) nor a network with no pretrained features; "on" /
    "off" as given; "auto" on for a plain full fine-tune of up to PROBE_MAX_TRAIN training images, except for
    glyph-like ones (``glyph_like``), whose strokes the pretrained features describe poorly (the reason their early
    layers train): on bench/recipes.py's digits the probe scored 0.635 where the fine-tune scored 0.85, and it
    cost 4 of the run's 59 CPU seconds."""
    if continued or distilled or not pretrained:
        return False
    if setting in ("on", "off"):
        return setting == "on"
    return recipe == "plain" and method == "full" and num_train <= PROBE_MAX_TRAIN and not glyphs


def resolve_recipe(recipe: str, method: str) -> str:
    """"auto": plain for now. LP-FT is opt-in: on bench/recipes.py's four datasets it beat the naive full
    fine-tune on faces and photos but lost on digits (0.77 vs 0.895) and shapes (0.978 vs 1.0)."""
    return "plain" if recipe == "auto" else recipe


def use_crops(sizes, side: int) -> bool:
    """Whether random resized crops suit images of ``sizes`` ((width, height) pairs) trained at ``side``: not
    where their median shorter side is under CROP_MIN_SHARE of it (8 px digits, 25 px faces or 64 px shapes
    upscaled to 128 px), whose few real pixels a crop of half the image cuts into (a digit's stroke, an eye)."""
    median = median_side(sizes)
    return median is None or median >= CROP_MIN_SHARE * side


def shift_share(glyphs: bool, crops: bool) -> float:
    """The random shifts' reach (a share of the side) for training images: SHIFT_SHARE for glyph-like images
    (``glyph_like``) that get no random crops (``use_crops``), 0 (none) for others."""
    return SHIFT_SHARE if glyphs and not crops else 0.0


def use_keep_best(setting: str, num_val: int) -> bool:
    """The keep-best switch resolved: "on" / "off" as given, "auto" on from KEEP_BEST_MIN_VAL validation
    images, where the best evaluation is a better pick than the last one and not a lucky draw."""
    if setting in ("on", "off"):
        return setting == "on"
    return num_val >= KEEP_BEST_MIN_VAL


def follows_data(recipe: str, method: str) -> bool:
    """Whether a classification run's epochs and input side left at 0 come from the data (the rules above):
    where the whole network trains (the full method, and LP-FT whatever the method), since it adapts to the
    images' own scale; a frozen or adapted backbone keeps the model's own side and the method's epochs."""
    return recipe == "lp-ft" or method == "full"


def sample(items, k: int = 64) -> list:
    """Up to ``k`` items spread evenly over a sequence (every class of a class-ordered split)."""
    n = len(items)
    step = max(1, n // k)
    return [items[i] for i in range(0, n, step)][:k]


# ---------------------------------------------------------------------------------------------
# Phases (torch)


def fit_head(model, head, pixels, labels, image_size: int, forward, *, batch_size: int = 64,
             weight_decay: float = 0.0, iterations: int = 100) -> dict:
    """The first phase of LP-FT: the new head fitted on the frozen network's features of the training
    images (centre crops, no augmentation), by full-batch L-BFGS on the cross-entropy plus an L2 penalty
    of 1 / (2 N) (a logistic regression with C = 1). Only the head's parameters change.

    Args:
        model: the network (eval mode is set for the feature pass and restored after).
        head: its final ``nn.Linear``; its input is captured by a forward hook.
        pixels: uint8 N x 3 x S x S training images (S >= image_size: centre-cropped here).
        labels: their model output indices.
        forward: ``forward(model, uint8 batch)``: runs the model on a batch (normalisation included).
        batch_size: images per feature pass (the run's own: what fits its memory).
    Returns:
        {"head_train_accuracy", "head_loss", "head_seconds"}; {} (the head untouched) where the features
        are not finite numbers, a network the loop then reports as diverged.
    """
    import time

    import torch
    import torch.nn.functional as F

    t0 = time.time()
    device = head.weight.device
    was_training = model.training
    captured = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach().float()))
    off = (pixels.shape[-1] - image_size) // 2
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(pixels), batch_size):
                x = pixels[i:i + batch_size, :, off:off + image_size, off:off + image_size].to(device)
                forward(model, x)
    finally:
        hook.remove()
        model.train(was_training)
    feats, y = torch.cat(captured), labels.to(device)
    if not torch.isfinite(feats).all():
        return {}
    weight = head.weight.detach().float().clone().zero_().requires_grad_(True)
    bias = torch.zeros(head.out_features, device=device, requires_grad=True)
    penalty = 1.0 / (2 * len(y)) + weight_decay
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(feats @ weight.T + bias, y) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.copy_(bias.to(head.bias.dtype))
        logits = feats @ weight.T + bias
        accuracy = (logits.argmax(-1) == y).float().mean().item()
        loss = F.cross_entropy(logits, y).item()
    return {"head_train_accuracy": round(accuracy, 5), "head_loss": round(loss, 5),
            "head_seconds": round(time.time() - t0, 2)}


def early_parameters(net) -> list[str]:
    """Names of the parameters of ``net``'s stem and of its stages at a reduction of at most
    FREEZE_MAX_REDUCTION: those that come, in the network's order, up to the last such stage where the network
    describes its stages (timm's ``feature_info``); none for others (transformers models, a ViT's patches at 16)."""
    info = getattr(net, "feature_info", None)
    if not isinstance(info, list):
        return []
    early = [f.get("module") for f in info if isinstance(f, dict) and f.get("reduction", 1 << 30) <= FREEZE_MAX_REDUCTION]
    if not early or not early[-1]:
        return []
    last, names, inside = early[-1], [], False
    for name, _ in net.named_parameters():
        if name == last or name.startswith(last + "."):
            inside = True
        elif inside:  # past the last early stage
            return names
        names.append(name)
    return names if inside else []


def freeze_early(net) -> int:
    """Stops the gradients of ``early_parameters(net)``; returns how many parameters that holds."""
    names = set(early_parameters(net))
    count = 0
    for name, p in net.named_parameters():
        if name in names:
            p.requires_grad_(False)
            count += p.numel()
    return count


def save_best(run_dir: Path, model) -> None:
    """The model's weights as the best so far (temp file + rename: a kill leaves the previous one); with
    frozen parameters only what trains, as in a checkpoint."""
    from .checkpoints import save_weights

    tmp = Path(run_dir) / f".{BEST_FILE}.tmp"
    save_weights(model, tmp)
    tmp.replace(Path(run_dir) / BEST_FILE)


def load_best(run_dir: Path, model, device) -> bool:
    """Loads the best weights into ``model``; False where none were saved."""
    from .checkpoints import load_weights

    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return False
    load_weights(model, path, str(device))
    return True
