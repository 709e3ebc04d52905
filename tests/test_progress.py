"""Progress that stays true: resume after a kill (step, ETA, metrics), stopping, periodic checkpoints,
a diverged loss, strict JSON, human durations, start warnings and the CLI's progress output."""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmdemo import jobs
from mmdemo.config import TrainConfig
from mmdemo.data import load_summary
from mmdemo.errors import UserInputError
from mmdemo.jobs import resume_training, run_status, start_warnings
from mmdemo.runs import read_metrics
from mmdemo.progress import dumps, eta_seconds, format_duration
from mmdemo.training import LossDiverged, train
from tests import test_engine
from tests.test_engine import ENV, make_folder
from tests.test_sessions import wait_until

dataset = test_engine.dataset  # the shapes dataset fixture


def tiny_cfg(dataset, out, **kw) -> TrainConfig:
    return test_engine.tiny_cfg(dataset, out, **{"batch_size": 4, "log_every": 1, **kw})


def latest_step(run: Path) -> int:
    latest = run / "latest"
    return json.loads((run / latest.read_text().strip() / "state.json").read_text())["step"] if latest.exists() else 0


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds, text", [
    (0, "0 s"), (45.4, "45 s"), (60, "1 min"), (130, "2 min 10 s"), (3599.6, "1 h"), (3600 + 300, "1 h 5 min"),
    (8 * 86400 + 3600 + 59, "8 d 1 h"), (86400 * 2 - 1, "2 d"), (None, ""), (math.inf, "")])
def test_durations_read_as_people_write_them(seconds, text):
    assert format_duration(seconds) == text


def test_eta_uses_the_pace_of_the_given_points_only():
    assert eta_seconds([(100.0, 10), (110.0, 20)], 120) == 100.0
    assert eta_seconds([(100.0, 10)], 120) is None


def test_json_outputs_are_strict():
    text = dumps({"loss": float("nan"), "scores": [1.0, float("inf")]})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == {
        "loss": None, "scores": [1.0, None]}


# --- resume after a kill: step, ETA and metrics of the resumed run ---------------------------------


def test_resume_after_a_kill_shows_the_resumed_runs_step_eta_and_metrics(dataset, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(dataset, run, epochs=40, checkpoint_every_steps=2)
    run.mkdir()
    cfg.save(run / "config.yaml")

    # 1. A first run stopped after its first step: status.json holds its final numbers.
    def stop_at_first_step(record):
        if record["type"] == "train":
            (run / "STOP").touch()

    train(cfg, on_record=stop_at_first_step)
    assert json.loads((run / "status.json").read_text())["metrics"]["accuracy"] is not None

    # 2. Resumed in a child that is killed a few steps past its last checkpoint (every 2 steps, within
    #    the epoch): the records go on past the checkpoint that a resume restarts from.
    child = jobs._launch(run)
    try:
        wait_until(lambda: latest_step(run) >= 3 and max(r["step"] for r in read_metrics(run) if r["type"] == "train")
                   >= latest_step(run) + 1, 120, "a checkpoint within the epoch and a step after it", interval=0.02)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    killed_at = max(r["step"] for r in read_metrics(run) if r["type"] == "train")
    resume_from = latest_step(run)
    assert resume_from < killed_at
    assert run_status(run)["status"] == "failed"

    # 3. Resumed again, in this process: what the status says during the resumed run's first step.
    seen = {}

    def look_then_stop(record):
        if record["type"] == "train" and not seen:
            seen.update(run_status(run), record=record, stop_state=None)
            (run / "STOP").touch()
            seen["stop_state"] = run_status(run)["status"]
            with pytest.raises(UserInputError, match="still stopping: wait for it to save"):
                resume_training(run, None)

    train(cfg, on_record=look_then_stop)
    assert seen["record"]["step"] == resume_from + 1
    assert seen["status"] == "running" and seen["step"] == resume_from + 1  # not the frozen killed_at
    assert seen["metrics"] == {}  # not the first run's final numbers
    start = [r for r in read_metrics(run) if r["type"] == "start"][-1]
    # The ETA counts the resumed run's steps only: its start and its one step.
    assert seen["eta_s"] == eta_seconds([(start["time"], resume_from), (seen["record"]["time"], resume_from + 1)],
                                        seen["total_steps"])
    assert seen["stop_state"] == "stopping"
    final = run_status(run)
    assert final["status"] == "stopped" and final["step"] == resume_from + 1
    steps = [s for s, _ in final["train_loss"]]
    assert steps == sorted(steps) and steps[-1] == resume_from + 1 and len(steps) == len(set(steps))


def test_a_completed_run_is_not_resumed(dataset, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(dataset, run, max_steps=2))
    created = (run / "config.yaml").stat().st_mtime
    with pytest.raises(UserInputError, match="already completed; start a new run, or continue from it by choosing "
                                             "it as the base model"):
        resume_training(run, None)
    train(tiny_cfg(dataset, run, max_steps=2))  # a resume rewrites nothing of the run's config
    assert (run / "config.yaml").stat().st_mtime == created


def test_checkpoints_within_an_epoch_every_n_steps(dataset, tmp_path):
    run = tmp_path / "run"
    saved = []

    def note_checkpoints(record):
        if (run / "latest").exists():
            saved.append((run / "latest").read_text().strip())

    train(tiny_cfg(dataset, run, checkpoint_every_steps=2), on_record=note_checkpoints)
    assert "checkpoint-2" in saved and "checkpoint-4" in saved  # the epoch has 5 steps
    assert (run / "latest").read_text() == "checkpoint-5"


# --- a diverged loss ----------------------------------------------------------------------------


def test_a_loss_that_is_not_a_number_fails_the_run_with_advice(dataset, tmp_path):
    """A real model whose loss is NaN from its first step: a ViT with zero-initialised weights has
    all-zero hidden states, which a LayerNorm without epsilon divides by their zero variance."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    base = tmp_path / "zero-vit"
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=2, layer_norm_eps=0.0)
    model = ViTForImageClassification(config)
    for p in model.parameters():
        p.data.zero_()
    model.save_pretrained(base)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(base)
    run = tmp_path / "run"
    with pytest.raises(LossDiverged, match=r"The loss diverged \(nan\) at step 1: lower the learning rate, e\.g\. to "):
        train(tiny_cfg(dataset, run, base_model=str(base), image_size=0, learning_rate=0.5, epochs=3))
    status = run_status(run)
    assert status["status"] == "failed" and "e.g. to 0.05" in status["message"]
    assert not (run / "model").exists()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c} in metrics.jsonl"))


def test_config_bounds_the_learning_rate_and_checkpoint_intervals():
    with pytest.raises(UserInputError, match=r"learning_rate must be at most 1\.0 \(got 5\.0\)"):
        TrainConfig(data="d", output_dir="o", learning_rate=5.0)
    with pytest.raises(UserInputError, match="checkpoint_every_minutes and checkpoint_every_steps must be 0"):
        TrainConfig(data="d", output_dir="o", checkpoint_every_minutes=-1)


def test_absurd_settings_warn_before_they_start(dataset):
    summary = load_summary(dataset)
    absurd = TrainConfig(data=dataset, output_dir="-", epochs=100000)
    warnings = start_warnings(summary, absurd, gpu=False)
    assert any("epochs=100000 is far more than fine-tuning needs" in w for w in warnings)
    assert any(re.search(r"takes about \d+ d( \d+ h)?:", w) for w in warnings), warnings
    assert start_warnings(summary, TrainConfig(data=dataset, output_dir="-", epochs=3), gpu=False) == []


# --- the CLI's progress output -------------------------------------------------------------------


def cli_train(tmp_path, name, *flags):
    raw = tmp_path / "raw.zip"
    if not raw.exists():
        import shutil

        shutil.make_archive(str(tmp_path / "raw"), "zip", make_folder(tmp_path / "raw", per_class=6))
    cmd = [sys.executable, "-m", "mmdemo", "train", "--data", str(raw), "--output-dir", str(tmp_path / name),
           "--base-model", "test_resnet", "--no-pretrained", "--epochs", "2", "--batch-size", "2", "--image-size", "64",
           "--log-every", "1", *flags]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_cli_prints_progress_evaluations_and_a_summary(tmp_path):
    out = cli_train(tmp_path, "plain")
    lines = out.stderr.splitlines()
    # Not a terminal: plain lines (no bar redraws), one per evaluation, then the summary.
    assert any(re.fullmatch(r"step \d+/10 · loss [\d.e+-]+ .*ETA .*", line) for line in lines), out.stderr
    assert any(re.fullmatch(r"step 10/10 · loss .*", line) for line in lines)
    assert len([line for line in lines if re.match(r"epoch \d · step \d+ · .*accuracy", line)]) == 2
    assert re.search(r"^completed in .+: 10 steps (· best at step \d+ )?· .*accuracy [\d.]+ .*· model in ", out.stderr,
                     re.M)
    assert "\r" not in out.stderr and "Generating" not in out.stderr and "Downloading" not in out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    # The kept model's step: the last one, or the best evaluation's (keep_best).
    assert summary["output_dir"] == str(tmp_path / "plain") and summary["step"] in (5, 10)

    quiet = cli_train(tmp_path, "quiet", "--quiet")
    assert "step" not in quiet.stderr and "completed in" not in quiet.stderr
    assert json.loads(quiet.stdout.strip().splitlines()[-1])["output_dir"] == str(tmp_path / "quiet")

    records = [json.loads(line) for line in cli_train(tmp_path, "json", "--json").stdout.strip().splitlines()]
    kinds = [r["type"] for r in records]
    assert kinds[0] == "start" and kinds[-2:] == ["end", "summary"] and kinds.count("eval") == 2
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 11))
    assert records[-1]["status"] == "completed" and records[-1]["output_dir"] == str(tmp_path / "json")

