"""The default classification recipe (mmdemo/recipe.py): its rules, and the phases it adds to the loop."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from mmdemo import recipe
from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset
from mmdemo.errors import UserInputError
from mmdemo.training import train


def glyph(ch: str, seed: int, side: int = 32) -> Image.Image:
    """A light symbol on a dark ground, like an 8x8 digit scaled up (or dark ink on paper)."""
    rng = np.random.default_rng(seed)
    ink, paper = (255, 0) if seed % 2 else (0, 255)
    img = Image.new("L", (side, side), paper)
    d = ImageDraw.Draw(img)
    o = int(rng.integers(-3, 4))
    if ch == "7":
        d.line([(6 + o, 6), (26 + o, 6), (12 + o, 28)], fill=ink, width=4)
    else:
        d.line([(26 + o, 6), (6 + o, 6), (20 + o, 28)], fill=ink, width=4)  # the mirror image
    return img.convert("RGB")


def photo_crop(seed: int, side: int = 48) -> Image.Image:
    from skimage import data

    photo = (data.chelsea(), data.coffee(), data.astronaut())[seed % 3]
    rng = np.random.default_rng(seed)
    top, left = int(rng.integers(0, photo.shape[0] - 120)), int(rng.integers(0, photo.shape[1] - 120))
    return Image.fromarray(photo[top:top + 120, left:left + 120]).resize((side, side))


def test_epoch_rule_gives_small_datasets_more_passes_within_bounds():
    epochs = [recipe.classification_epochs(n, 16) for n in (16, 100, 300, 800, 5000, 100_000)]
    assert epochs == sorted(epochs, reverse=True)  # more images, fewer passes
    assert epochs[0] == recipe.MAX_EPOCHS and epochs[-1] == recipe.MIN_EPOCHS
    assert recipe.classification_epochs(800, 16) * 50 >= recipe.TARGET_STEPS  # 50 steps per epoch
    assert recipe.classification_epochs(300, 16) == 5 and recipe.classification_epochs(1600, 16) == 3


def test_epochs_follow_the_dataset_unless_given_and_config_records_the_recipe(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"num_train": 5000}))
    auto = TrainConfig(data=str(tmp_path), output_dir="o", recipe="lp-ft")
    assert (auto.recipe, auto.epochs, auto.learning_rate) == ("lp-ft", recipe.MIN_EPOCHS, recipe.LP_FT_LEARNING_RATE)
    (tmp_path / "summary.json").write_text(json.dumps({"num_train": 40}))
    assert TrainConfig(data=str(tmp_path), output_dir="o", recipe="lp-ft").epochs == recipe.MAX_EPOCHS
    assert TrainConfig(data=str(tmp_path), output_dir="o", recipe="lp-ft", epochs=2).epochs == 2
    assert TrainConfig(data=str(tmp_path), output_dir="o").recipe == "plain"  # auto: LP-FT is opt-in
    # The full fine-tune (the default method) follows the data too; the other methods keep their defaults.
    plain = TrainConfig(data=str(tmp_path), output_dir="o", recipe="plain")
    assert (plain.recipe, plain.epochs, plain.learning_rate) == ("plain", recipe.MAX_EPOCHS, 1e-3)
    head = TrainConfig(data=str(tmp_path), output_dir="o", method="head")
    lora = TrainConfig(data=str(tmp_path), output_dir="o", method="lora")
    assert (head.recipe, head.epochs, lora.epochs) == ("plain", 6, 5)
    assert TrainConfig(data="not-ingested", output_dir="o").epochs == 4  # no summary: the method's default
    with pytest.raises(UserInputError, match="hflip must be one of auto, on, off \\(got 'sometimes'\\)"):
        TrainConfig(data="d", output_dir="o", hflip="sometimes")
    with pytest.raises(UserInputError, match="recipe must be one of auto, lp-ft, plain \\(got 'lpft'\\)"):
        TrainConfig(data="d", output_dir="o", recipe="lpft")
    with pytest.raises(UserInputError, match="probe_guard must be one of auto, on, off"):
        TrainConfig(data="d", output_dir="o", probe_guard="yes please")


def test_random_crops_only_for_images_with_enough_pixels_of_their_own():
    from mmdemo.images import TRAIN_MARGIN, ImageTensors

    assert recipe.use_crops([(96, 96)] * 3, 128) and recipe.use_crops([(640, 480)] * 3, 160)  # 3/4 of the side
    assert not recipe.use_crops([(64, 80)] * 3, 128)  # upscaled 2 x: no crops
    assert not recipe.use_crops([(32, 32), (25, 25), (640, 480)], 128)  # upscaled digits / faces: no crops
    split = {"image": [photo_crop(i, side=40) for i in range(4)], "label": [0, 1, 0, 1]}
    cropped = ImageTensors(split, 32, [0, 1], train=True, hflip=False, crop=True)
    assert cropped.train and cropped.pixels.shape[-1] == round(32 * TRAIN_MARGIN)  # a margin to crop from
    # Neither crops nor flips: the training images are exactly what validation sees.
    plain = ImageTensors(split, 32, [0, 1], train=True, hflip=False, crop=False)
    val = ImageTensors(split, 32, [0, 1], train=False)
    assert not plain.train and torch.equal(plain[1][0], val[1][0])
    flipped = ImageTensors(split, 32, [0, 1], train=True, hflip=True, crop=False)
    assert flipped.train and flipped.pixels.shape[-1] == 32 and flipped[0][0].shape == (3, 32, 32)


def test_glyphs_too_small_for_crops_are_shifted_with_their_border_repeated():
    from mmdemo.images import ImageTensors

    assert recipe.shift_share(glyphs=True, crops=False) == recipe.SHIFT_SHARE
    assert recipe.shift_share(glyphs=True, crops=True) == 0 and recipe.shift_share(glyphs=False, crops=False) == 0
    split = {"image": [glyph(c, i) for i, c in enumerate("7r7r")], "label": [0, 1, 0, 1]}
    shifted = ImageTensors(split, 32, [0, 1], train=True, hflip=False, crop=False, shift=1 / 8)
    val = ImageTensors(split, 32, [0, 1], train=False)
    assert shifted.train and shifted.pixels.shape[-1] == 32  # no margin: the shift pads
    original = val[1][0]
    padded = torch.nn.functional.pad(original[None].float(), (4, 4, 4, 4), mode="replicate")[0].to(torch.uint8)
    offsets = set()
    torch.manual_seed(0)
    for _ in range(20):
        x = shifted[1][0]
        # Each draw is the image moved by at most 4 px (1/8 of 32) each way, its border repeated into the gap.
        found = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(x, padded[:, dy:dy + 32, dx:dx + 32])]
        assert found, "not a shift of the image"
        offsets.add(found[0])
    assert len(offsets) > 5  # the draws vary
    # Where crops apply, they replace the shifts.
    cropped = ImageTensors(split, 32, [0, 1], train=True, hflip=False, crop=True, shift=1 / 8)
    assert [type(t).__name__ for t in cropped.augment.transforms] == ["RandomResizedCrop"]


def test_a_full_fine_tune_gets_the_one_cycle_schedule_and_the_rest_cosine():
    from mmdemo.training import _scheduler

    assert TrainConfig(data="d", output_dir="o").lr_schedule == "one-cycle"
    assert TrainConfig(data="d", output_dir="o", method="head").lr_schedule == "cosine"
    assert TrainConfig(data="d", output_dir="o", method="lora", recipe="lp-ft").lr_schedule == "one-cycle"
    assert TrainConfig(data="d", output_dir="o", task="captioning").lr_schedule == "cosine"
    assert TrainConfig(data="d", output_dir="o", lr_schedule="cosine").lr_schedule == "cosine"  # as given
    with pytest.raises(UserInputError, match="lr_schedule must be one of auto, cosine, one-cycle"):
        TrainConfig(data="d", output_dir="o", lr_schedule="linear")

    def rates(cfg, steps=100):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.learning_rate)
        sched, lrs, betas = _scheduler(opt, cfg, steps), [], []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            betas.append(opt.param_groups[0]["betas"][0])
            opt.step()
            sched.step()
        return lrs, betas

    lrs, betas = rates(TrainConfig(data="d", output_dir="o"))
    assert lrs[0] == pytest.approx(1e-3 / 25) and max(lrs) == pytest.approx(1e-3, rel=1e-3)
    assert 25 <= lrs.index(max(lrs)) <= 31 and lrs[-1] < 1e-6  # 30% warming up, then down to almost 0
    assert betas[0] == pytest.approx(0.95) and min(betas) == pytest.approx(0.85, abs=1e-3)
    lrs, betas = rates(TrainConfig(data="d", output_dir="o", method="head"))
    assert lrs[0] == 0 and max(lrs) == pytest.approx(1e-2) and lrs.index(max(lrs)) == 10  # warmup_ratio 0.1
    assert set(betas) == {0.9}


def test_keep_best_only_where_the_validation_split_can_tell_the_best():
    assert recipe.use_keep_best("auto", recipe.KEEP_BEST_MIN_VAL) is True
    assert recipe.use_keep_best("auto", recipe.KEEP_BEST_MIN_VAL - 1) is False  # a small split picks by luck
    assert recipe.use_keep_best("on", 10) is True and recipe.use_keep_best("off", 10_000) is False
    # A config written when keep_best was a boolean still loads, as the switch it meant.
    assert TrainConfig(data="d", output_dir="o").keep_best == "auto"
    assert [TrainConfig(data="d", output_dir="o", keep_best=v).keep_best for v in (True, False)] == ["on", "off"]
    with pytest.raises(UserInputError, match="keep_best must be one of auto, on, off"):
        TrainConfig(data="d", output_dir="o", keep_best="best")


def test_image_side_follows_the_data_between_the_floor_and_the_models_own():
    assert recipe.image_side([(8, 8)] * 5, 160) == recipe.MIN_SIDE  # tiny glyphs: upscaled to the floor
    assert recipe.image_side([(100, 130), (120, 90), (500, 400)], 160) == 128  # median short side 100
    assert recipe.image_side([(640, 480)] * 3, 160) == 160  # large photos: the model's own side
    assert recipe.image_side([(640, 480)], 64) == 64 and recipe.image_side([], 160) == 160


def test_no_flip_for_glyphs_flip_for_photos_and_the_user_decides():
    glyphs = [glyph(c, i) for i in range(12) for c in "7r"]
    photos = [photo_crop(i) for i in range(9)]
    grey_photos = [p.convert("L").convert("RGB") for p in photos]
    assert recipe.glyph_like(glyphs)
    assert not recipe.glyph_like(photos) and not recipe.glyph_like(grey_photos)
    assert recipe.use_hflip("auto", glyphs) is False and recipe.use_hflip("auto", photos) is True
    assert recipe.use_hflip("on", glyphs) is True and recipe.use_hflip("off", photos) is False
    # Images too small for crops get no flips either, unless asked for.
    assert recipe.use_hflip("auto", photos, crops=False) is False and recipe.use_hflip("on", photos, crops=False)


def _conv_net():
    import timm

    return timm.create_model("test_resnet", pretrained=False, num_classes=2)


def test_head_fit_changes_only_the_head_and_separates_the_classes():
    torch.manual_seed(0)
    net = _conv_net()
    head = net.get_classifier()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    # Two classes a random network tells apart: bright and dark images.
    pixels = torch.cat([torch.randint(150, 256, (16, 3, 40, 40)), torch.randint(0, 100, (16, 3, 40, 40))]).to(torch.uint8)
    labels = torch.tensor([0] * 16 + [1] * 16)
    net.train()
    info = recipe.fit_head(net, head, pixels, labels, 32, lambda m, x: m(x.float() / 127.5 - 1))
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # BatchNorm statistics included: the feature pass ran in eval mode
    assert net.training  # the mode is given back
    assert info["head_train_accuracy"] == 1.0


def make_digits_like(root: Path, per_class: int = 10) -> Path:
    for c in "7r":
        for split, n in (("train", per_class), ("validation", 4)):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                glyph(c, hash((c, split, i)) % 10_000).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def glyph_dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("glyphs")
    return ingest_dataset(make_digits_like(root / "raw"), root / "ws").path


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lp_ft_fits_the_head_before_the_first_step_and_records_what_it_resolved(glyph_dataset, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(data=glyph_dataset, output_dir=str(run), base_model="test_resnet", pretrained=False,
                      epochs=2, batch_size=8, image_size=0, recipe="lp-ft"))
    kinds = [r["type"] for r in _records(run)]
    assert kinds[:3] == ["start", "phase", "train"]  # the head phase comes first, then everything trains
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    # 32 px glyphs are upscaled to the 128 px floor (test_resnet's own side is 160); glyphs get no flip.
    assert (cfg["recipe"], cfg["hflip"], cfg["image_size"]) == ("lp-ft", "off", recipe.MIN_SIDE)
    # A plain run has no head phase, keeps the flip the user asked for, and its input side follows the data
    # too; on 8 validation images it ends on the last evaluation, not the best (nothing saved for it).
    plain = tmp_path / "plain"
    train(TrainConfig(data=glyph_dataset, output_dir=str(plain), base_model="test_resnet", pretrained=False,
                      epochs=1, batch_size=8, recipe="plain", hflip="on"))
    assert "phase" not in [r["type"] for r in _records(plain)]
    cfg = yaml.safe_load((plain / "config.yaml").read_text())
    assert (cfg["hflip"], cfg["image_size"], cfg["keep_best"]) == ("on", recipe.MIN_SIDE, "off")
    # 32 px glyphs: no crops, random shifts instead (and the flips asked for).
    assert cfg["extra"]["random_crops"] is False and cfg["extra"]["random_shifts"] is True
    assert cfg["lr_schedule"] == "one-cycle"
    assert not (plain / recipe.BEST_FILE).exists()
    # A frozen backbone sees the images at the model's own side.
    head = tmp_path / "head"
    train(TrainConfig(data=glyph_dataset, output_dir=str(head), base_model="test_resnet", pretrained=False,
                      method="head", max_steps=1, batch_size=8))
    assert yaml.safe_load((head / "config.yaml").read_text())["image_size"] == 160


def make_bright_dark(root: Path) -> Path:
    """Two classes any network tells apart: bright and dark images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("validation", 6)):
        for c, (lo, hi) in (("bright", (150, 256)), ("dark", (0, 100))):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(lo, hi, (32, 32, 3)).astype(np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_the_best_evaluation_is_the_model_kept(tmp_path):
    dataset = ingest_dataset(make_bright_dark(tmp_path / "raw"), tmp_path / "ws").path
    run = tmp_path / "run"
    # The head phase separates the classes (evaluation 0); a far too large step then wrecks the network,
    # so the last evaluation is worse than the first and the model kept is the head phase's.
    result = train(TrainConfig(data=dataset, output_dir=str(run), base_model="test_resnet", pretrained=False,
                               epochs=2, batch_size=8, image_size=32, learning_rate=0.3, warmup_ratio=0.0,
                               recipe="lp-ft", keep_best="on"))
    records = _records(run)
    phase, evals = next(r for r in records if r["type"] == "phase"), [r for r in records if r["type"] == "eval"]
    assert phase["val_accuracy"] == 1.0 > evals[-1]["accuracy"] and [r["epoch"] for r in evals] == [1, 2]
    assert (result["accuracy"], result["step"]) == (1.0, 0)
    assert json.loads((run / "eval.json").read_text())["accuracy"] == 1.0
    from safetensors.torch import load_file

    from mmdemo.models import load_classifier

    kept, saved = load_file(run / recipe.BEST_FILE), load_classifier(run / "model").net.state_dict()
    assert sum(torch.equal(kept[f"net.{k}"], v) for k, v in saved.items() if f"net.{k}" in kept) == len(saved)


def test_early_layers_are_the_stem_and_the_stages_up_to_stride_four():
    import timm

    from mmdemo.models import build_classifier

    lite0 = build_classifier("efficientnet_lite0", ["a", "b"], pretrained=False)[0].net
    names = recipe.early_parameters(lite0)
    assert names[0] == "conv_stem.weight" and names[-1].startswith("blocks.1.")  # blocks.1: stride 4
    assert not any(n.startswith(("blocks.2", "conv_head", "classifier")) for n in names)
    resnet = recipe.early_parameters(timm.create_model("resnet18", pretrained=False, num_classes=2))
    assert resnet[0] == "conv1.weight" and {n.split(".")[0] for n in resnet} == {"conv1", "bn1", "layer1"}
    # A ViT's first features are at stride 16 and a network without stage information has none.
    assert recipe.early_parameters(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2)) == []
    assert recipe.early_parameters(torch.nn.Linear(2, 2)) == []
    assert [recipe.use_freeze_early(s, m, p) for s, m, p in [("auto", "full", True), ("auto", "full", False),
            ("auto", "lora", True), ("off", "full", True), ("on", "full", False)]] == [True, False, False, False, True]
    # Glyph-like images train their stem (auto); asked on, it stays frozen.
    assert [recipe.use_freeze_early(s, "full", True, glyphs=True) for s in ("auto", "on")] == [False, True]


def test_a_full_fine_tune_keeps_the_early_layers_pretrained_and_resumes(glyph_dataset, tmp_path):
    from safetensors import safe_open

    from mmdemo.models import build_classifier, load_classifier

    run = tmp_path / "run"
    cfg = dict(data=glyph_dataset, output_dir=str(run), base_model="efficientnet_lite0", image_size=64, batch_size=8,
               probe_guard="off", freeze_early="on")
    train(TrainConfig(**cfg, max_steps=2))
    assert yaml.safe_load((run / "config.yaml").read_text())["freeze_early"] == "on"
    # The checkpoint holds what trains; a second call resumes from it (the frozen layers rebuilt and checked).
    ckpt = run / (run / "latest").read_text().strip() / "model.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        assert not any(k.startswith("net.conv_stem.") for k in f.keys()) and "net.blocks.2.0.conv_pw.weight" in f.keys()
    result = train(TrainConfig(**cfg, max_steps=3))
    assert result["step"] == 3
    pretrained = build_classifier("efficientnet_lite0", ["7", "r"])[0].net.state_dict()
    tuned = load_classifier(run / "model").net.state_dict()
    assert torch.equal(tuned["conv_stem.weight"], pretrained["conv_stem.weight"])
    assert torch.equal(tuned["blocks.1.0.conv_pw.weight"], pretrained["blocks.1.0.conv_pw.weight"])
    assert not torch.equal(tuned["blocks.2.0.conv_pw.weight"], pretrained["blocks.2.0.conv_pw.weight"])
    # Left at auto, glyph-like images (these digit-like strokes) train everything.
    off = tmp_path / "off"
    train(TrainConfig(**{**cfg, "output_dir": str(off), "freeze_early": "auto"}, max_steps=1))
    assert yaml.safe_load((off / "config.yaml").read_text())["freeze_early"] == "off"
    assert not torch.equal(load_classifier(off / "model").net.state_dict()["conv_stem.weight"],
                           pretrained["conv_stem.weight"])


def test_the_probe_is_the_model_kept_where_it_beats_the_fine_tune_on_validation(tmp_path):
    from mmdemo.models import build_classifier, load_classifier

    dataset = ingest_dataset(make_bright_dark(tmp_path / "raw"), tmp_path / "ws").path
    pretrained = build_classifier("efficientnet_lite0", ["bright", "dark"])[0].net.state_dict()
    # A far too large step wrecks the fine-tune; the probe on the pretrained features tells bright from dark.
    wrecked = tmp_path / "wrecked"
    result = train(TrainConfig(data=dataset, output_dir=str(wrecked), image_size=64, batch_size=8, epochs=1,
                               learning_rate=1.0, warmup_ratio=0.0, lr_schedule="cosine"))
    records = _records(wrecked)
    probe = next(r for r in records if r.get("name") == "probe")
    assert probe["val_accuracy"] == 1.0 and result["kept"] == "linear_probe" and result["accuracy"] == 1.0
    assert result["finetuned_accuracy"] < 1.0 and json.loads((wrecked / "eval.json").read_text())["kept"] == "linear_probe"
    assert "the model saved is the probe" in json.loads((wrecked / "status.json").read_text())["message"]
    saved = load_classifier(wrecked / "model").net.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in pretrained.items() if not k.startswith("classifier."))
    assert yaml.safe_load((wrecked / "config.yaml").read_text())["probe_guard"] == "on"
    # Where the fine-tune is better on validation, it is the model kept; a tie keeps the probe (the simpler model).
    from mmdemo.data import load_splits
    from mmdemo.tasks import make_task

    task = make_task(TrainConfig(data=dataset, output_dir=str(wrecked), image_size=64), load_splits(dataset))
    with torch.no_grad():
        task.model.net.blocks[3][0].conv_pw.weight.mul_(2)
    from safetensors.torch import load_file, save_file

    probe_file = str(wrecked / recipe.PROBE_FILE)
    save_file(load_file(probe_file), probe_file, metadata={"val_accuracy": "0.9"})  # a probe at 0.9 on validation
    assert not task.keep_probe(task.model, {"accuracy": 0.95}, wrecked)
    assert not torch.equal(task.model.net.state_dict()["blocks.3.0.conv_pw.weight"], pretrained["blocks.3.0.conv_pw.weight"])
    assert task.keep_probe(task.model, {"accuracy": 0.9}, wrecked)
    assert all(torch.equal(task.model.net.state_dict()[k], v) for k, v in pretrained.items() if not k.startswith("classifier."))
    # Neither a head-only run, nor a continued one, nor one with the guard off fits a probe.
    assert [recipe.use_probe_guard(s, "plain", m, True, n, c) for s, m, n, c in [
        ("auto", "head", 100, False), ("auto", "full", 100, True), ("off", "full", 100, False),
        ("auto", "full", recipe.PROBE_MAX_TRAIN + 1, False), ("on", "lora", 10 ** 6, False)]] == [
        False, False, False, False, True]
    # Glyph-like images get none either unless asked: the pretrained features describe strokes poorly.
    assert [recipe.use_probe_guard(s, "plain", "full", True, 100, glyphs=True) for s in ("auto", "on")] == [False, True]
