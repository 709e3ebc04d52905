"""Checkpoints of runs with frozen parameters keep only what trains: an image + text run with frozen encoders
stopped mid-run writes a small checkpoint, which with the rebuilt encoders is the stopped model, and resumes to
the end; a run where everything trains still checkpoints the whole model."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset, load_splits
from mmdemo.training import train

from test_itc import COLOURS, _png, _rows_zip

TASK = "image_text_classification"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 images, two rows each (a colour question and a fixed yes / no one): enough for a few steps."""
    tmp = tmp_path_factory.mktemp("ckpt")
    images = {f"images/{c}{i}.png": _png(rgb, i) for c, rgb in COLOURS.items() for i in range(4)}
    rows = [(f"images/{c}{i}.png", q, a) for c in COLOURS for i in range(4)
            for q, a in (("what color is it?", c), ("is it a shape?", "yes"))]
    return ingest_dataset(_rows_zip(tmp, rows, images), tmp / "ws", task=TASK).path


def _stop_after(run: Path, steps: int) -> threading.Thread:
    def watch():
        while True:
            text = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
            if text.count('"type": "train"') >= steps:
                (run / "STOP").touch()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def _weights_kind(path: Path) -> str | None:
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("weights")


def test_a_frozen_encoders_run_checkpoints_its_head_and_resumes(dataset, tmp_path):
    from mmdemo.checkpoints import load_weights
    from mmdemo.fusion import FusedClassifier
    from mmdemo.tasks import make_task

    run = tmp_path / "run"
    cfg = TrainConfig(data=dataset, output_dir=str(run), task=TASK, epochs=3, batch_size=4)
    assert cfg.method == "frozen_encoders"
    _stop_after(run, 2)
    train(cfg)
    assert json.loads((run / "status.json").read_text())["status"] == "stopped"
    checkpoint = run / (run / "latest").read_text()
    weights = checkpoint / "model.safetensors"
    stopped_at = json.loads((checkpoint / "state.json").read_text())["step"]
    # Only the fusion head and the buffers: a few MB, not the encoders' ~107 MB.
    assert _weights_kind(weights) == "trained-only" and weights.stat().st_size < 8 * 2**20
    assert (checkpoint / "optimizer.pt").stat().st_size < 8 * 2**20

    # The checkpoint on a freshly built model (encoders from the registry packages) is the stopped model.
    rebuilt = make_task(TrainConfig.load(run / "config.yaml"), load_splits(dataset)).model
    with safe_open(str(weights), "pt") as f:
        saved = set(f.keys())
    params = dict(rebuilt.named_parameters())
    assert {n for n in saved if n in params} == {n for n, p in params.items() if p.requires_grad}
    assert all(n.startswith("head.") for n in saved if n in params)  # no encoder weight, only their buffers
    load_weights(rebuilt, weights, "cpu")
    stopped = FusedClassifier.load(run / "model").state_dict()
    mine = rebuilt.state_dict()
    assert set(stopped) <= set(mine)
    assert all(torch.allclose(mine[k].float(), v.float(), atol=1e-6) for k, v in stopped.items())

    train(cfg)  # the same run directory: resumes from the trained-only checkpoint
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r["type"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] == stopped_at
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and max(r["step"] for r in records if r["type"] == "train") == status["total_steps"]
    assert (run / "model" / "vision" / "model.safetensors").is_file()  # model/ still holds every part
    if (run / "best.safetensors").exists():
        assert _weights_kind(run / "best.safetensors") == "trained-only"


def test_a_run_where_everything_trains_checkpoints_the_whole_model(tmp_path):
    from mmdemo.checkpoints import load_weights, save_weights

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    save_weights(model, tmp_path / "all.safetensors")
    assert _weights_kind(tmp_path / "all.safetensors") is None
    model[0].requires_grad_(False)
    save_weights(model, tmp_path / "part.safetensors")
    with safe_open(str(tmp_path / "part.safetensors"), "pt") as f:
        assert set(f.keys()) == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
                                 "2.weight", "2.bias"}
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    other[0].load_state_dict(model[0].state_dict())  # the frozen part, as a rebuild from the base gives it
    other[0].requires_grad_(False)
    load_weights(other, tmp_path / "part.safetensors", "cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    other[0].requires_grad_(True)  # a part that trains but is missing from the file: refused, not silently kept
    other[2].requires_grad_(False)
    save_weights(other, tmp_path / "other.safetensors")
    with pytest.raises(RuntimeError, match="does not match"):
        load_weights(model.requires_grad_(True), tmp_path / "other.safetensors", "cpu")
    changed = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    changed[0].requires_grad_(False)  # its frozen layer is not the saved model's: refused, not resumed
    with pytest.raises(RuntimeError, match="other frozen weights"):
        load_weights(changed, tmp_path / "part.safetensors", "cpu")


def test_a_head_only_classifier_stops_and_resumes_from_its_trained_weights(tmp_path):
    """A frozen backbone initialised from the seed (pretrained=False) is rebuilt the same on resume: the
    checksum of its frozen weights matches and the run completes."""
    shapes = ingest_dataset(Path(__file__).resolve().parents[1] / "assets" / "sample_shapes.zip", tmp_path / "ws").path
    run = tmp_path / "head"
    cfg = TrainConfig(data=shapes, output_dir=str(run), base_model="test_resnet", pretrained=False, method="head",
                      epochs=1, batch_size=16, image_size=64)
    _stop_after(run, 2)
    train(cfg)
    checkpoint = run / (run / "latest").read_text()
    assert _weights_kind(checkpoint / "model.safetensors") == "trained-only"
    train(cfg)
    starts = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True]
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


def test_the_frozen_checksum_is_kept_until_a_frozen_weight_changes():
    """Computed once per model (a frozen-encoder run checkpoints every epoch), yet an in-place write or a new
    tensor in a frozen parameter gives the new sum."""
    from mmdemo.checkpoints import _frozen_checksum

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)

    def fresh():
        return float(sum(p.detach().double().abs().sum().item() for p in model[0].parameters()))

    first = _frozen_checksum(model)
    assert first == pytest.approx(fresh()) and _frozen_checksum(model) == first
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert _frozen_checksum(model) == pytest.approx(fresh()) != first
    model[0].bias = torch.nn.Parameter(torch.full((4,), 5.0), requires_grad=False)
    assert _frozen_checksum(model) == pytest.approx(fresh())
    with torch.no_grad():
        model[1].weight.add_(1.0)  # a trained weight: not part of the sum
    assert _frozen_checksum(model) == pytest.approx(fresh())
