"""Distillation: the loss, a teacher run distilled into a student through the real child, the refusals,
and the offline EfficientNet-Lite1 / Lite2 bases."""

import json
import math
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_engine import draw_shape, make_folder

from mmdemo import api
from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset, load_splits
from mmdemo.distill import distillation_loss
from mmdemo.errors import UserInputError
from mmdemo.images import normalize, resize_center_crop
from mmdemo.jobs import JobManager
from mmdemo.training import train

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "triangle")


def test_distillation_loss_matches_a_hand_computation():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    teacher = torch.tensor([[1.0, 0.5, 0.0], [0.0, 3.0, -2.0]])
    labels = torch.tensor([0, 2])
    t, alpha = 2.0, 0.3

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p, q = softmax([v / t for v in t_row]), softmax([v / t for v in s_row])
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kl /= 2
    ce = -(math.log(softmax(student[0].tolist())[0]) + math.log(softmax(student[1].tolist())[2])) / 2
    expected = alpha * t * t * kl + (1 - alpha) * ce
    assert distillation_loss(student, teacher, labels, t, alpha).item() == pytest.approx(expected, rel=1e-5)
    # T^2: the soft term at T=4 is 16x the KL of the T=4 distributions, not 1x.
    pure = distillation_loss(student, teacher, labels, 4.0, 1.0).item()
    kl4 = F.kl_div(F.log_softmax(student / 4, -1), F.softmax(teacher / 4, -1), reduction="batchmean").item()
    assert pure == pytest.approx(16 * kl4, rel=1e-5)
    # Unlabelled rows (label -1) count in the soft term only; an all-unlabelled batch has no hard term.
    assert distillation_loss(student, teacher, torch.tensor([-1, -1]), t, 0.0).item() == 0.0
    mixed = distillation_loss(student, teacher, torch.tensor([0, -1]), t, 0.0).item()
    assert mixed == pytest.approx(-math.log(softmax(student[0].tolist())[0]), rel=1e-5)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A workspace with a three-shape dataset and a finished teacher run (Lite0's pretrained features, head
    trained), made in process."""
    root = tmp_path_factory.mktemp("distill")
    wsp = root / "ws"
    ds = ingest_dataset(make_folder(root / "raw", classes=CLASSES, per_class=12), wsp)
    run_dir = wsp / "runs" / ("a" * 32)
    train(TrainConfig(data=ds.path, output_dir=str(run_dir), method="head", epochs=2, batch_size=16, image_size=64,
                      learning_rate=3e-2))
    return wsp, ds, run_dir


def test_a_teacher_run_distils_into_a_student_through_the_child(teacher_run, tmp_path):
    wsp, ds, teacher = teacher_run
    unlabelled = tmp_path / "more.zip"
    with zipfile.ZipFile(unlabelled, "w") as z:
        for i, kind in enumerate(CLASSES * 3):
            path = tmp_path / f"u{i}.png"
            draw_shape(kind, 5000 + i).save(path)
            z.write(path, f"u{i}.png")
    manager = JobManager(max_concurrent=1)
    # The student: Lite0's frozen features with a new head, which learns from the teacher in a few steps.
    out = api.distill(wsp, teacher.name, student="efficientnet_lite0", images=str(unlabelled), baseline=False,
                      manager=manager, method="head", epochs=2, batch_size=16, image_size=64, learning_rate=3e-2)
    run_dir = wsp / "runs" / out["run_id"]
    deadline = time.time() + 120
    while (state := api.status(wsp, out["run_id"], manager=manager)["status"]) in ("queued", "running"):
        assert time.time() < deadline, (run_dir / "train.log").read_text()
        time.sleep(0.5)
    assert state == "completed", (run_dir / "train.log").read_text()[-2000:]
    report = json.loads((run_dir / "eval.json").read_text())["distill"]
    assert report["unlabelled_images"] == 9 and report["temperature"] == 4.0
    teacher_row, student_row = report["rows"]
    assert teacher_row["model"] == "teacher" and teacher_row["accuracy"] >= 0.8
    assert student_row["params"] > 0 and student_row["latency_ms_p50"] > 0 and student_row["image_size"] == 64
    from mmdemo.continual import predict_labels
    from mmdemo.models import load_classifier

    splits = load_splits(ds.path)
    t_model, s_model = load_classifier(teacher / "model"), load_classifier(run_dir / "model")
    t_val, s_val = (predict_labels(m, splits["validation"], 64) for m in (t_model, s_model))
    assert student_row["agreement_with_teacher"] == pytest.approx(
        sum(a == b for a, b in zip(t_val, s_val)) / len(t_val), abs=1e-4)
    # Over every image: agreement against chance, the two models' prediction frequencies as if independent.
    t_pred = t_val + predict_labels(t_model, splits["train"], 64)
    s_pred = s_val + predict_labels(s_model, splits["train"], 64)
    chance = sum(t_pred.count(c) * s_pred.count(c) for c in CLASSES) / len(t_pred) ** 2
    agreement = sum(a == b for a, b in zip(t_pred, s_pred)) / len(t_pred)
    assert agreement > chance + 0.2, (agreement, chance)
    assert (run_dir / "distill.png").stat().st_size > 1000
    # The export names no local run: teacher and unlabelled images are this machine's.
    files = api.export(wsp, out["run_id"], tmp_path / "export")
    text = "".join((tmp_path / "export" / f).read_text() for f in files if f.endswith((".md", ".yaml", ".json")))
    assert str(teacher) not in text and "teacher: ''" in (tmp_path / "export" / "training_config.yaml").read_text()


def test_a_teacher_with_other_labels_or_not_your_own_is_refused(teacher_run, tmp_path):
    wsp, _, teacher = teacher_run
    other = ingest_dataset(make_folder(tmp_path / "raw", classes=("circle", "star")), wsp)
    with pytest.raises(UserInputError, match=r"teacher's labels \(circle, square, triangle\) are not the dataset's.*"
                                             r"the teacher lacks star"):
        api.start(wsp, other.dataset_id, teacher=teacher.name)
    before = set((wsp / "runs").iterdir())
    with pytest.raises(UserInputError, match="the teacher lacks star"):  # refused before the student alone is queued
        api.distill(wsp, teacher.name, dataset_id=other.dataset_id, baseline=True, manager=JobManager(max_concurrent=1))
    assert set((wsp / "runs").iterdir()) == before
    with pytest.raises(UserInputError, match="teacher must be a run id of yours.*folders on the server are not"):
        api.start(wsp, other.dataset_id, teacher=str(teacher))
    elsewhere = ingest_dataset(make_folder(tmp_path / "raw2", classes=CLASSES, per_class=4), tmp_path / "other-ws")
    with pytest.raises(UserInputError, match="Unknown run id"):  # another user's run id
        api.start(tmp_path / "other-ws", elsewhere.dataset_id, teacher=teacher.name)
    with pytest.raises(UserInputError, match="distill_alpha must be in"):
        TrainConfig(data="d", output_dir="o", teacher="t", distill_alpha=1.5)


@pytest.mark.parametrize("name,side", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_lite1_lite2_load_their_packages_weights_and_know_a_cat(name, side, tmp_path):
    import timm
    from timm.data import ImageNetInfo

    from mmdemo.models import _build_default, build_classifier, save_classifier

    clf, _ = build_classifier(name, ["a", "b"], pretrained=False)
    assert clf.preprocess.image_size == side and clf.base_model == name
    save_classifier(clf, tmp_path / "model")  # what export / push publish: a timm folder
    again = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True)
    assert again.num_classes == 2 and again.pretrained_cfg["input_size"][-1] == side
    info = ImageNetInfo()
    net = _build_default([info.index_to_description(i) for i in range(1000)], True, keep_head=True, variant=name)
    x = resize_center_crop(Image.open(ROOT / "assets/examples/cat.jpg"), side)[None]
    with torch.no_grad():
        top = net.eval()(normalize(x, net.preprocess.mean, net.preprocess.std)).topk(3).indices[0].tolist()
    assert any("cat" in net.labels[i] for i in top), [net.labels[i] for i in top]


def test_cli_distill_refuses_a_folder_that_is_no_run_and_a_dataset_with_other_labels(teacher_run, tmp_path):
    import os
    import subprocess
    import sys

    _, _, teacher = teacher_run
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    other = make_folder(tmp_path / "raw", classes=("circle", "star"), per_class=4)
    for args, message in (([str(tmp_path)], "is not a run directory"),
                          ([str(teacher), "--data", str(other), "--output-dir", str(tmp_path / "out")],
                           "the teacher lacks star")):
        done = subprocess.run([sys.executable, "-m", "mmdemo", "distill", *args], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 2 and message in done.stderr and not done.stdout, done.stderr[-800:]


def test_the_app_distill_endpoint_refuses_a_run_that_is_not_yours(app_url):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app_url, verbose=False)
    with pytest.raises(AppError, match="Unknown run id"):
        client.predict("f" * 32, api_name="/distill")
    with pytest.raises(AppError, match="teacher must be a run id of yours"):
        client.predict("/etc", api_name="/distill")


def test_the_memory_estimate_and_guard_count_the_teacher(teacher_run, monkeypatch):
    """A distilled run holds the frozen teacher beside the student: its fp32 weights and, on every batch, a
    no-grad forward at the student's batch and input size. The estimate adds both; the guard refuses a
    distillation (before the student alone is queued) that only the student alone would fit."""
    from mmdemo import jobs, memory
    from mmdemo.models import load_classifier

    wsp, ds, teacher = teacher_run
    settings = dict(data=ds.path, base_model="efficientnet_lite0", batch_size=16, image_size=160)
    alone = memory.estimate(TrainConfig(output_dir=str(wsp / "runs" / ("b" * 32)), **settings), 36)
    distilled = memory.estimate(TrainConfig(output_dir=str(wsp / "runs" / ("c" * 32)), teacher=str(teacher),
                                            **settings), 36)
    net = load_classifier(teacher / "model")
    weights = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    forward = memory.TEACHER_ACTIVATION_BYTES * 16 * 160 * 160
    assert distilled["parts"]["teacher"] == pytest.approx(weights + forward, rel=0.01)
    assert distilled["bytes"] - alone["bytes"] == distilled["parts"]["teacher"] and alone["parts"]["teacher"] == 0
    assert 150 * 2**20 < distilled["bytes"] - alone["bytes"] < 250 * 2**20  # 13.5 MB of weights + 168 MB forward
    # A continued run holds its previous model too; it runs it on every batch only when keep_old distils.
    continued = {keep: memory.estimate(TrainConfig(output_dir=str(wsp / "runs" / ("d" * 32)), keep_old=keep,
                                                   **{**settings, "base_model": str(teacher)}), 36)["parts"]["teacher"]
                 for keep in ("both", "replay")}
    assert continued["both"] == distilled["parts"]["teacher"]
    assert continued["replay"] == pytest.approx(weights, rel=0.01)
    assert memory.device_need(distilled) - memory.device_need(alone) == distilled["parts"]["teacher"]

    # The guard: a job limit between the two estimates lets the student alone start and refuses the distillation.
    monkeypatch.setenv("MMDEMO_JOB_MEMORY_LIMIT", f"{(alone['bytes'] + distilled['bytes']) // 2 // 2**20}mb")
    monkeypatch.setattr(memory.procs, "gpu_visible", lambda: False)
    jobs.check_run_memory(TrainConfig(output_dir=str(wsp / "runs" / ("b" * 32)), **settings))  # fits: no refusal
    before = set((wsp / "runs").iterdir())
    with pytest.raises(UserInputError, match=r"needs about .* GB of memory \(batch_size 16 at image_size 160, "
                                             r"0\.2 GB of it for the frozen teacher\), but one training job may use"):
        api.distill(wsp, teacher.name, baseline=True, manager=JobManager(max_concurrent=1), batch_size=16,
                    image_size=160)
    assert set((wsp / "runs").iterdir()) == before  # the student alone was not queued either
