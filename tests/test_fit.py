"""Fitting a run to its device's memory, rehearsed on the CPU with a simulated device (mmdemo/fit.py):
the dry run and the micro-batch it picks, out-of-memory recovery mid-run, the stop after three halvings,
the pre-launch VRAM check, and the job manager's launch of several processes."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset
from mmdemo.fit import PROBE_REPEATS, OutOfDeviceMemory, batch_length, split_batch
from mmdemo.training import train

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, per_class=12) -> Path:
    for c, colour in (("red", (230, 30, 30)), ("blue", (30, 30, 230))):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (40, 40), (20 + 9 * i, 20, 20))
            ImageDraw.Draw(img).rectangle((8 + i, 8, 30, 30), fill=colour)
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
