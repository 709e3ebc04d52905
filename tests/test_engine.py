"""The engine without the UI: config, models and methods, training, stop / resume, CLI, torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset, load_splits
from mmdemo.errors import UserInputError
from mmdemo.images import normalize, resize_center_crop
from mmdemo.inference import classify, classify_batch, load_predictor
from mmdemo.jobs import JobManager, list_runs, new_run_config, run_status, start_training
from mmdemo.runs import find_run
from mmdemo.models import apply_method, build_classifier, count_parameters, load_classifier
from mmdemo.training import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def draw_shape(kind: str, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    bg = tuple(int(v) for v in torch.randint(0, 120, (3,), generator=g))
    img = Image.new("RGB", (48, 48), bg)
    d = ImageDraw.Draw(img)
    o = int(torch.randint(-4, 5, (1,), generator=g))
    if kind == "circle":
        d.ellipse((12 + o, 12 + o, 36 + o, 36 + o), fill=(250, 250, 250))
    elif kind == "square":
        d.rectangle((12 + o, 12 + o, 36 + o, 36 + o), fill=(250, 250, 250))
    else:
        d.polygon([(24 + o, 8), (8, 40), (40, 40)], fill=(250, 250, 250))
    return img


def make_folder(root: Path, classes=("circle", "square"), per_class=12) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(c, hash((c, i)) % 10_000).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("shapes")
    return ingest_dataset(make_folder(root / "raw"), root / "ws").path


def tiny_cfg(dataset, out, **kw) -> TrainConfig:
    base = dict(data=dataset, output_dir=str(out), base_model="test_resnet", pretrained=False, epochs=1,
                batch_size=8, image_size=64)
    return TrainConfig(**{**base, **kw})


# --- config -----------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(UserInputError, match=r"method must be one of .*; epochs must be 0 \(default\) or more.*"
                                             r"learning_rate must be 0 \(default\) or more"):
        TrainConfig(data="d", output_dir="o", method="magic", epochs=-1, learning_rate=-1)


def test_config_fills_per_method_defaults_and_round_trips(tmp_path):
    full, head = TrainConfig(data="d", output_dir="o"), TrainConfig(data="d", output_dir="o", method="head")
    assert full.base_model == "efficientnet_lite0" and full.epochs > 0 and full.batch_size > 0
    assert head.learning_rate > full.learning_rate  # a frozen backbone takes bigger steps
    full.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml") == full
    (tmp_path / "bad.yaml").write_text("data: d\noutput_dir: o\nepoch: 3\n")
    with pytest.raises(UserInputError, match="Unknown config keys: epoch"):
        TrainConfig.load(tmp_path / "bad.yaml")


# --- models and methods ----------------------------------------------------------------------


def test_offline_default_loads_strictly_and_knows_a_cat():
    labels = classify(Image.open(ROOT / "assets/examples/cat.jpg"))
    assert len(labels) == 5 and abs(sum(labels.values()) - 1) < 0.1
    top = max(labels, key=labels.get)
    assert "cat" in top, labels


def test_a_batch_classifies_each_image_as_alone_would():
    paths = [ROOT / "assets/examples" / name for name in ("cat.jpg", "coffee.jpg", "rocket.jpg", "circle.png")]
    images = [Image.open(p) for p in paths]
    batched = classify_batch(images, top_k=3)
    for image, labels in zip(images, batched):
        alone = classify(image, top_k=3)
        assert list(labels) == list(alone)
        assert all(abs(labels[k] - alone[k]) < 1e-4 for k in alone)
    assert "cat" in next(iter(batched[0])), batched[0]
    with pytest.raises(UserInputError, match="No image given"):
        classify_batch([images[0], None])


def test_channels_last_input_changes_speed_not_results():
    clf = load_predictor(None, "classification")
    assert clf.channels_last_input  # efficientnet_lite0 is a CNN
    vit, _ = build_classifier("test_vit", ["a", "b"], pretrained=False)
    assert not vit.channels_last_input  # a ViT has one (patch) convolution
    pre = clf.preprocess
    x = resize_center_crop(Image.open(ROOT / "assets/examples/cat.jpg"), pre.image_size)[None].repeat(2, 1, 1, 1)
    with torch.no_grad():
        plain, last = (clf(normalize(x, pre.mean, pre.std, fmt)) for fmt in (False, True))
    assert normalize(x, pre.mean, pre.std, True).is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(plain, last, atol=1e-4), (plain - last).abs().max()


def test_unknown_model_says_what_is_available_offline():
    with pytest.raises(UserInputError, match="Available offline: 'efficientnet_lite0'"):
        build_classifier("no-such-model-anywhere-xyz", ["a", "b"])
    with pytest.raises(UserInputError, match="Could not fetch 'resnet18'.*Available offline"):
        build_classifier("resnet18", ["a", "b"], pretrained=True)


@pytest.mark.parametrize("method", ["full", "head", "bitfit", "lora"])
def test_each_method_trains_only_what_it_should(method):
    clf, _ = build_classifier("efficientnet_lite0", ["a", "b", "c"], pretrained=False)
    total = count_parameters(clf)[1]
    head = 1280 * 3 + 3
    apply_method(clf, method)
    trainable, _ = count_parameters(clf)
    names = [n for n, p in clf.named_parameters() if p.requires_grad]
    if method == "full":
        assert trainable == total
    elif method == "head":
        assert trainable == head and all("classifier" in n for n in names)
    elif method == "bitfit":
        assert head < trainable < 0.02 * total and all(n.endswith("bias") or "classifier" in n for n in names)
    else:
        assert all("lora_" in n or "modules_to_save" in n for n in names)
        assert head < trainable < 0.25 * total


# --- training, run directory, stop, resume ---------------------------------------------------


def test_training_writes_a_self_describing_run_directory(dataset, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_cfg(dataset, run, epochs=2))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["base_model"] == "test_resnet" and cfg["method"] == "full" and cfg["image_size"] == 64
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == json.loads((run / "status.json").read_text())["total_steps"]
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [1, 2]
    assert {"model.safetensors", "config.json", "mmdemo.json"} <= {p.name for p in (run / "model").iterdir()}
    meta = json.loads((run / "model/mmdemo.json").read_text())
    assert meta["id2label"] == {"0": "circle", "1": "square"}
    report = json.loads((run / "eval.json").read_text())
    assert report["accuracy"] == result["accuracy"] and set(report["per_class"]) == {"circle", "square"}
    assert sum(map(sum, report["confusion_matrix"])) == report["num_val"]
    assert (run / "confusion_matrix.png").stat().st_size > 1000
    assert (run / (run / "latest").read_text()).is_dir() and not list(run.glob(".*tmp*"))
    # What was saved predicts like the model that was trained.
    reloaded = load_classifier(run / "model")
    assert reloaded.labels == ["circle", "square"] and reloaded.preprocess.image_size == 64


def test_a_metrics_line_every_n_steps_gives_the_mean_loss_since_the_last(dataset, tmp_path):
    every_step, every_two = tmp_path / "one", tmp_path / "two"
    for run, log_every in ((every_step, 1), (every_two, 2)):
        train(tiny_cfg(dataset, run, epochs=2, max_steps=3, log_every=log_every, augment=False))
    def train_lines(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    ones, twos = train_lines(every_step), train_lines(every_two)
    assert [r["step"] for r in ones] == [1, 2, 3] and [r["step"] for r in twos] == [2, 3]  # and the last
    # Same seed, same steps: the line for steps 1-2 holds their mean, the last line step 3 alone.
    assert twos[0]["loss"] == pytest.approx((ones[0]["loss"] + ones[1]["loss"]) / 2, abs=1e-4)
    assert twos[1]["loss"] == pytest.approx(ones[2]["loss"], abs=1e-4)
    start = json.loads((every_two / "metrics.jsonl").read_text().splitlines()[0])
    assert start["num_workers"] == 0  # automatic: no loader workers on the CPU
    with pytest.raises(UserInputError, match=r"num_workers must be -1 \(automatic\).*log_every must be 0 \(automatic\)"):
        TrainConfig(data="d", output_dir="o", log_every=-1, num_workers=-2)


def test_default_recipe_learns_the_shapes(dataset, tmp_path):
    run = tmp_path / "run"
    result = train(TrainConfig(data=dataset, output_dir=str(run), epochs=3, image_size=96))
    assert result["accuracy"] >= 0.8, result
    # The reported accuracy is the saved model's, as inference runs it (eval mode: BatchNorm statistics).
    validation = load_splits(dataset)["validation"]
    names = validation.features["label"].names
    tops = [max((labels := classify(r["image"], run)), key=labels.get) for r in validation]
    hits = [top == names[r["label"]] for top, r in zip(tops, validation)]
    assert sum(hits) / len(hits) == pytest.approx(result["accuracy"], abs=1e-6)


def test_stop_at_a_step_boundary_then_resume_to_the_end(dataset, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(dataset, run, epochs=4)

    def stop_after_two_steps():
        while True:
            text = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
            if text.count('"type": "train"') >= 2:
                (run / "STOP").touch()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_after_two_steps, daemon=True)
    watcher.start()
    train(cfg)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped" and (run / "model/model.safetensors").exists()
    stopped_at = json.loads((run / (run / "latest").read_text() / "state.json").read_text())["step"]
    assert 2 <= stopped_at < status["total_steps"]
    classify(Image.new("RGB", (40, 40)), run)  # the stopped run's model is usable

    train(cfg)  # same run directory: resumes from the checkpoint
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r["type"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] == stopped_at
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert max(r["step"] for r in records if r["type"] == "train") == status["total_steps"]


@pytest.mark.parametrize("method", ["head", "lora", "bitfit"])
def test_peft_methods_train_save_and_load(dataset, tmp_path, method):
    run = tmp_path / method
    train(tiny_cfg(dataset, run, method=method, max_steps=2))
    if method == "lora":
        assert (run / "model/adapter/adapter_config.json").exists()
    assert set(classify(Image.new("RGB", (40, 40)), run)) == {"circle", "square"}


def test_tiny_transformers_model_from_a_local_folder(dataset, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    base = tmp_path / "tiny-vit"
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=5)
    ViTForImageClassification(config).save_pretrained(base)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(base)
    run = tmp_path / "run"
    train(tiny_cfg(dataset, run, base_model=str(base), image_size=0, method="lora", max_steps=2))
    assert yaml.safe_load((run / "config.yaml").read_text())["image_size"] == 32
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(run / "model"))
    assert {r["label"] for r in pipe(Image.new("RGB", (50, 50)))} == {"circle", "square"}


def test_continue_a_previous_run_extending_its_labels(dataset, tmp_path):
    first = tmp_path / "first"
    train(tiny_cfg(dataset, first, max_steps=2))
    more = make_folder(tmp_path / "more", classes=("circle", "triangle"), per_class=6)
    data2 = ingest_dataset(more, tmp_path / "ws2").path
    second = tmp_path / "second"
    train(tiny_cfg(data2, second, base_model=str(first), image_size=0, max_steps=2))
    assert load_classifier(second / "model").labels == ["circle", "square", "triangle"]


# --- jobs: child processes --------------------------------------------------------------------


def test_job_manager_runs_lists_and_survives_a_killed_child(dataset, tmp_path):
    manager = JobManager(max_concurrent=1)
    wsp = tmp_path / "ws"
    killed = start_training(new_run_config(wsp, dataset, base_model="test_resnet", pretrained=False, epochs=50,
                                           batch_size=4, image_size=64), manager)
    queued = start_training(new_run_config(wsp, dataset, base_model="test_resnet", pretrained=False, max_steps=2,
                                           batch_size=8, image_size=64), manager)
    assert run_status(find_run(wsp, queued), manager)["status"] == "queued"
    assert "position 1" in run_status(find_run(wsp, queued), manager)["message"]
    deadline = time.time() + 120
    while run_status(find_run(wsp, killed), manager)["step"] < 1:
        assert time.time() < deadline, (find_run(wsp, killed) / "train.log").read_text()
        time.sleep(0.2)
    os.kill(json.loads((find_run(wsp, killed) / "status.json").read_text())["pid"], signal.SIGKILL)
    while run_status(find_run(wsp, queued), manager)["status"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.3)
    dead = run_status(find_run(wsp, killed), manager)
    assert dead["status"] == "failed" and "exited unexpectedly" in dead["message"] and "Resume" in dead["message"]
    assert run_status(find_run(wsp, queued), manager)["status"] == "completed"
    assert {r["run_id"] for r in list_runs(wsp)} == {killed, queued}
    with pytest.raises(UserInputError, match="Unknown run id"):
        find_run(wsp, "../" + killed)


# --- CLI and multi-process --------------------------------------------------------------------


def test_cli_train_and_predict(tmp_path):
    raw = make_folder(tmp_path / "raw", per_class=6)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmdemo", "train", "--task", "classification", "--data", str(raw), "--output-dir",
           str(run), "--base-model", "test_resnet", "--no-pretrained", "--max-steps", "2", "--batch-size", "4",
           "--image-size", "64"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["output_dir"] == str(run)
    pred = subprocess.run([sys.executable, "-m", "mmdemo", "predict", "--checkpoint", str(run), "--task",
                           "classification", str(raw / "circle/0.png"), str(raw / "square/1.png")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in pred.stdout.strip().splitlines()]
    assert pred.returncode == 0, pred.stderr[-2000:]
    assert [Path(x["image"]).name for x in lines] == ["0.png", "1.png"]
    assert all(set(x["labels"]) == {"circle", "square"} for x in lines)
    # Batches of 2 with an unreadable file in the middle: one line per image, in order, the same labels.
    (tmp_path / "notes.png").write_text("not an image")
    images = [str(raw / "circle/0.png"), str(tmp_path / "notes.png"), str(raw / "square/1.png"), str(raw / "circle/2.png")]
    batched = subprocess.run([sys.executable, "-m", "mmdemo", "predict", "--checkpoint", str(run), "--batch-size", "2",
                              *images], env=ENV, capture_output=True, text=True, timeout=300)
    assert batched.returncode == 1  # one image could not be read
    rows = [json.loads(line) for line in batched.stdout.strip().splitlines()]
    assert [r["image"] for r in rows] == images
    assert "cannot read" in rows[1]["error"] and "notes.png" in rows[1]["error"]
    for row, alone in zip((rows[0], rows[2]), lines):
        assert row["labels"].keys() == alone["labels"].keys()
        assert all(abs(row["labels"][k] - alone["labels"][k]) < 1e-4 for k in alone["labels"])
    bad = subprocess.run([sys.executable, "-m", "mmdemo", "train", "--data", str(raw), "--output-dir", str(tmp_path / "x"),
                          "--epochs", "-3"], env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "epochs must be 0 (default) or more" in bad.stderr


def test_torchrun_two_processes_share_the_work(dataset, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    run = tmp_path / "run"
    cfg = tiny_cfg(dataset, run, epochs=2, max_steps=3, batch_size=4)  # 2 steps per epoch of 2 x 4
    cfg.save(tmp_path / "cfg.yaml")
    out = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "mmdemo", "train", "--config", str(tmp_path / "cfg.yaml")],
                         env=ENV, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["num_processes"] == 2
    end = records[-1]
    assert end["type"] == "end" and len(end["samples_per_rank"]) == 2 and end["samples_per_rank"] == [3 * 4, 3 * 4]
    assert (run / "model/model.safetensors").exists()


def test_a_negative_hub_answer_is_asked_again_after_its_time_to_live(monkeypatch):
    import mmdemo.models as models

    now = time.monotonic()
    monkeypatch.setattr(models, "_hub_answer", (True, now - 61))
    assert models.hub_reachable() is True  # a "yes" is kept longer than a minute
    monkeypatch.setattr(models, "_hub_answer", (True, now - models.HUB_REACHABLE_TTL_S[True] - 1))
    assert models.hub_reachable() is False  # asked again: the tests run offline
    monkeypatch.setattr(models, "_hub_answer", (False, now - models.HUB_REACHABLE_TTL_S[False] + 30))
    assert models.hub_reachable() is False and models._hub_answer[1] == now - models.HUB_REACHABLE_TTL_S[False] + 30
    monkeypatch.setattr(models, "_hub_answer", (False, now - models.HUB_REACHABLE_TTL_S[False] - 1))
    assert models.hub_reachable() is False and models._hub_answer[1] > now
