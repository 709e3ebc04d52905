"""Fitting a run to its device's memory, rehearsed on the CPU with a simulated device (mmdemo/fit.py):
the dry run and the micro-batch it picks, out-of-memory recovery mid-run, the stop after three halvings,
the pre-launch VRAM check, and the job manager's launch of several processes."""

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset
from mmdemo.jobs import JobManager, new_run_config, resume_training, run_status, start_training, train_command
from mmdemo.memory import check_memory, vram_warning
from mmdemo.fit import PROBE_REPEATS, OutOfDeviceMemory, batch_length, split_batch
from mmdemo.training import train

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, per_class=12) -> Path:
    for c, colour in (("red", (230, 30, 30)), ("blue", (30, 30, 230))):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            k, row = i % 12, i // 12  # every image distinct, however many
            img = Image.new("RGB", (40, 40), (20 + 9 * k, 20 + 5 * row, 20))
            ImageDraw.Draw(img).rectangle((8 + k, 8 + row, 30, 30), fill=colour)
            img.save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("colours")
    return ingest_dataset(make_folder(root / "raw"), root / "ws").path


def cfg_for(dataset, out, simulated=None, **kw) -> TrainConfig:
    # "head": BatchNorm in eval mode, so a batch trained in pieces has exactly the gradient of the whole.
    base = dict(data=dataset, output_dir=str(out), base_model="test_resnet", pretrained=False, method="head",
                epochs=2, max_steps=4, batch_size=8, image_size=32, augment=False, learning_rate=1e-2,
                checkpoint_every_minutes=0, extra={"simulated_device": simulated} if simulated else {})
    return TrainConfig(**{**base, **kw})


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in records(run, "train")]


@pytest.fixture(scope="module")
def baseline(dataset, tmp_path_factory) -> list[float]:
    run = tmp_path_factory.mktemp("plain") / "run"
    train(cfg_for(dataset, run))
    assert not records(run, "fit")  # the CPU without a simulated device: nothing to fit
    return losses(run)


def test_split_batch_cuts_every_per_sample_part_and_nothing_else():
    batch = {"pixels": torch.arange(10).reshape(5, 2), "texts": list("abcde"), "scale": torch.tensor(2.0),
             "pair": [torch.zeros(5, 3), torch.ones(5)]}
    pieces = split_batch(batch, 2)
    assert [batch_length(p) for p in pieces] == [2, 3]  # nearly equal, all samples kept
    assert torch.equal(torch.cat([p["pixels"] for p in pieces]), batch["pixels"])
    assert sum((p["texts"] for p in pieces), []) == batch["texts"]
    assert all(p["scale"] is batch["scale"] for p in pieces) and pieces[1]["pair"][0].shape == (3, 3)
    x, y = torch.zeros(3, 4), torch.arange(3)
    assert [len(p[1]) for p in split_batch([x, y], 8)] == [1, 1, 1]  # never an empty piece


def test_a_batch_too_big_for_the_device_trains_in_pieces_with_the_same_losses(dataset, tmp_path, baseline):
    # 20 MB + 10 MB per sample in a 60 MB device: with the 0.85 margin, 3 samples fit and 8 do not.
    run = tmp_path / "run"
    train(cfg_for(dataset, run, {"budget_mb": 60, "base_mb": 20, "per_sample_mb": 10}))
    (fit,) = records(run, "fit")
    assert (fit["fits"], fit["micro_batch"], fit["pieces"]) == (False, 3, 3)
    assert 8 in fit["probes"] and 3 in fit["probes"] and 4 in fit["probes"]  # a binary search with real steps
    assert fit["eta_s"] > 0 and fit["step_s"] > 0
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed"
    assert "does not fit" in status["fit_warning"] and "batch_size of 3 or less" in status["fit_warning"]
    # Same effective batch, same data order, same steps: the same training.
    assert losses(run) == pytest.approx(baseline, abs=2e-4)


@pytest.fixture(scope="module")
def bigger(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("colours48")
    return ingest_dataset(make_folder(root / "raw", per_class=24), root / "ws").path


def test_batch_size_0_trains_the_methods_batch_in_the_largest_micro_batches_that_fit(bigger, tmp_path):
    # 20 MB + 10 MB per sample in 100 MB: with the 0.85 margin 6 samples fit, 7 do not; "head" defaults to 32.
    auto = cfg_for(bigger, tmp_path / "auto", {"budget_mb": 100, "base_mb": 20, "per_sample_mb": 10}, batch_size=0,
                   max_steps=1)
    assert auto.batch_size == 32 and auto.extra["auto_batch"] is True
    train(auto)
    (fit,) = records(tmp_path / "auto", "fit")
    assert (fit["auto"], fit["batch_size"], fit["micro_batch"], fit["pieces"]) == (True, 32, 6, 6)
    assert {32, 16, 8, 4, 6, 7} <= set(fit["probes"]) and "gradient accumulation" in fit["rule"]
    (start,) = records(tmp_path / "auto", "start")
    assert start["images_per_step"] == 32  # the effective batch is the method's
    status = json.loads((tmp_path / "auto" / "status.json").read_text())
    assert status["fit_warning"] == ""  # the plan, not a problem
    assert status["fit_message"].startswith("Automatic batch size: the method's batch of 32 trains as 6 "
                                            "micro-batches of 6, the largest that fits")
    # The same training as the batch of 32 in one pass on an unbounded device.
    train(cfg_for(bigger, tmp_path / "whole", batch_size=32, max_steps=1))
    assert losses(tmp_path / "auto") == pytest.approx(losses(tmp_path / "whole"), abs=2e-4)
    # A batch given explicitly, then, is not automatic, even from a config that was.
    assert "auto_batch" not in replace(auto, batch_size=8).extra


def test_out_of_memory_mid_run_halves_the_micro_batch_and_keeps_the_run(dataset, tmp_path, baseline):
    # A roomy device (the batch fits: one probe and the timed ones), then an error at the 3rd step's forward.
    run = tmp_path / "run"
    first_probes = 1 + PROBE_REPEATS
    train(cfg_for(dataset, run, {"budget_mb": 1000, "per_sample_mb": 1, "fail_at": [first_probes + 3]}))
    (fit,) = records(run, "fit")
    assert fit["fits"] and fit["probes"] == [8]
    (oom,) = records(run, "oom")
    assert (oom["action"], oom["step"], oom["micro_batch"], oom["pieces"]) == ("halved", 2, 4, 2)
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3, 4]  # no step lost, none repeated
    assert losses(run) == pytest.approx(baseline, abs=2e-4)
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


def test_three_halvings_then_a_stop_with_the_advice(dataset, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(OutOfDeviceMemory, match=r"Out of GPU memory.*smaller batch size.*after 3 halvings"):
        train(cfg_for(dataset, run, {"budget_mb": 1000, "per_sample_mb": 1, "fail_at": list(range(5, 40))}))
    ooms = records(run, "oom")
    assert [r["action"] for r in ooms] == ["halved"] * 3 + ["stop"] and [r.get("pieces") for r in ooms[:3]] == [2, 4, 8]
    with pytest.raises(OutOfDeviceMemory, match="Not even a batch of 1 fits"):
        train(cfg_for(dataset, tmp_path / "tiny", {"budget_mb": 10, "base_mb": 20, "per_sample_mb": 1}))


def test_out_of_memory_in_one_of_two_processes_stops_the_run_with_the_advice_and_a_batch(dataset, tmp_path):
    # torchrun through the app's own command; process 1 runs out at its 2nd step (after the plan's 3 passes).
    run = tmp_path / "run"
    cfg = cfg_for(dataset, run, {"budget_mb": 1000, "per_sample_mb": 1, "fail_at": [1 + PROBE_REPEATS + 2],
                                 "fail_rank": 1}, batch_size=4, num_processes=2)
    cfg.save(tmp_path / "config.yaml")
    out = subprocess.run(train_command(tmp_path / "config.yaml"), env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    status = json.loads((run / "status.json").read_text())
    # The cause, not its echo in process 0 (a gradient all-reduce whose peer is gone).
    assert status["status"] == "failed" and status["message"].startswith("Out of GPU memory"), status["message"]
    assert "process 1 of 2 on a micro-batch of 4" in status["message"]
    assert "Start a new run with batch_size 2" in status["message"]
    assert [r["step"] for r in records(run, "train")] == [1]


def test_the_pre_launch_check_sets_the_gpu_part_against_the_device(dataset, tmp_path):
    cfg = cfg_for(dataset, tmp_path / "r", {"budget_mb": 60, "per_sample_mb": 1}, method="full", batch_size=64)
    warning = check_memory(cfg, 24)
    assert warning.startswith("🔴 Will not fit") and "the simulated device has 0.1 GB free" in warning
    assert "One pass would fit with batch_size 16" in warning
    assert vram_warning(replace(cfg, batch_size=16), 24) == ""
    assert vram_warning(replace(cfg, extra={}), 24) == ""  # no GPU here, none simulated: nothing to say
    # batch_size 0 (full's 16): fitting it is the plan, said without the red mark.
    auto = check_memory(cfg_for(dataset, tmp_path / "a", {"budget_mb": 30, "per_sample_mb": 1}, method="full",
                                batch_size=0), 24)
    assert auto.startswith("Automatic batch size: the method's batch of 16 needs about") and "🔴" not in auto
    assert "largest micro-batches that fit" in auto and "One pass would fit with batch_size 8" in auto


def wait_for(run_dir, manager, done, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        snap = run_status(run_dir, manager)
        if done(snap):
            return snap
        time.sleep(0.2)
    raise AssertionError(f"timed out: {snap} {(run_dir / 'train.log').read_text()[-2000:]}")


def test_each_multi_process_launch_gets_a_free_rendezvous_port_of_its_own(tmp_path):
    (tmp_path / "c.yaml").write_text("num_processes: 2\n")
    commands = [train_command(tmp_path / "c.yaml", gpus=g) for g in (0, 0, 2, 2)]
    flags = ["--master_port"] * 2 + ["--main_process_port"] * 2  # torchrun on the CPU, accelerate on GPUs
    ports = [int(c[c.index(flag) + 1]) for c, flag in zip(commands, flags)]
    assert len(set(ports)) == 4, ports
    for port in ports:  # free: nothing holds it, so this launch can bind it
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    assert "--standalone" not in commands[0] and commands[0][commands[0].index("--master_addr") + 1] == "127.0.0.1"


def test_the_job_manager_trains_two_processes_and_stops_and_resumes_them(dataset, tmp_path):
    gpus = train_command(tmp_path / "c.yaml", gpus=2)
    assert gpus[1:5] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"] and gpus[5] == "2"
    assert train_command(tmp_path / "c.yaml", gpus=1) == [sys.executable, "-m", "mmdemo", "train", "--config",
                                                          str(tmp_path / "c.yaml")]
    # Two CPU processes through the app's own launch (torchrun here), the batch of 4 in 2 pieces on each.
    manager = JobManager(root=tmp_path)
    cfg = new_run_config(tmp_path / "ws", dataset, base_model="test_resnet", pretrained=False, epochs=6,
                         batch_size=4, image_size=32, num_processes=2, log_every=1, checkpoint_every_minutes=0,
                         extra={"simulated_device": {"budget_mb": 60, "base_mb": 20, "per_sample_mb": 10}})
    run_dir = Path(cfg.output_dir)
    start_training(cfg, manager)
    assert "torch.distributed.run" in train_command(run_dir / "config.yaml")
    snap = wait_for(run_dir, manager, lambda s: s["step"] >= 2)
    assert "2 micro-batches of 2" in snap["fit_warning"]
    manager.stop(run_dir)
    snap = wait_for(run_dir, manager, lambda s: s["status"] not in ("running", "stopping", "queued")
                    and not manager.is_alive(run_dir))
    assert snap["status"] == "stopped", snap
    resume_training(run_dir, manager)
    snap = wait_for(run_dir, manager, lambda s: s["status"] not in ("running", "stopping", "queued")
                    and not manager.is_alive(run_dir))
    assert snap["status"] == "completed" and snap["step"] == snap["total_steps"], snap
    starts = records(run_dir, "start")
    assert [s["num_processes"] for s in starts] == [2, 2] and [s["resumed"] for s in starts] == [False, True]
    assert all(r["pieces"] == 2 for r in records(run_dir, "fit"))
    assert len(records(run_dir, "end")[-1]["samples_per_rank"]) == 2
