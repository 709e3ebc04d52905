"""The export of timm ViT runs (test_vit, trained at 64 px, not its own 160): a mergeable method (lora)
loads without mmdemo, strictly, with the run's predictions; the methods that add modules (adapter, vpt)
load their base network strictly, the card says plainly that it alone is not the model, and --merged is
refused with the reason."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_engine import make_folder, tiny_cfg

from mmdemo.data import ingest_dataset
from mmdemo.errors import UserInputError
from mmdemo.hub import export_run
from mmdemo.models import load_classifier
from mmdemo.training import train

SIDE = 64


@pytest.fixture(scope="module")
def vit_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    data = ingest_dataset(make_folder(root / "raw", per_class=4), root / "ws").path
    runs = {}
    for method in ("lora", "adapter", "vpt"):
        runs[method] = root / method
        train(tiny_cfg(data, runs[method], base_model="test_vit", method=method, max_steps=2, batch_size=4,
                       image_size=SIDE, augment=False, checkpoint_every_minutes=0))
    return runs


def pixels():
    return torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def run_logits(run: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_classifier(run / "model").eval()(pixels())


def timm_strict(folder: Path):
    """The folder as timm builds it from config.json alone, its weights loaded strictly (no resampling)."""
    import timm

    cfg = json.loads((folder / "config.json").read_text())
    net = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"],
                            **cfg.get("model_args", {}))
    net.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return net.eval()


def test_lora_vit_export_loads_strictly_with_timm_and_transformers_with_the_runs_predictions(vit_runs, tmp_path):
    import timm
    from transformers import AutoModelForImageClassification

    expected = run_logits(vit_runs["lora"])
    for merged in (False, True):
        out = tmp_path / f"export-{merged}"
        export_run(vit_runs["lora"], out, merged=merged)
        assert json.loads((out / "config.json").read_text())["model_args"]["img_size"] == [160, 160]
        with torch.no_grad():
            torch.testing.assert_close(timm_strict(out)(pixels()), expected, atol=1e-5, rtol=1e-5)
            local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
            torch.testing.assert_close(local(pixels()), expected, atol=1e-5, rtol=1e-5)
            wrapped = AutoModelForImageClassification.from_pretrained(out).eval()
            torch.testing.assert_close(wrapped(pixel_values=pixels()).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["adapter", "vpt"])
def test_added_method_export_says_its_base_alone_is_not_the_model_and_refuses_merging(vit_runs, tmp_path, method):
    run, out = vit_runs[method], tmp_path / "export"
    expected = run_logits(run)
    files = export_run(run, out)
    assert {"adapter/added.safetensors", "adapter/mmdemo_added.json", "model.safetensors"} <= set(files)
    with torch.no_grad():
        bare = timm_strict(out)(pixels())  # loads, strictly: the base network and its trained head
        assert not torch.allclose(bare, expected, atol=1e-3)  # ...which is not the run's model
        torch.testing.assert_close(load_classifier(out).eval()(pixels()), expected, atol=1e-6, rtol=1e-6)
    card = (out / "README.md").read_text()
    usage = card[card.index("## Use it"):]
    warning = f"Trained with `{method}`, which adds modules that timm and transformers cannot express"
    # The warning comes before any loader snippet, and names what the plain loaders give.
    assert warning in usage and usage.index(warning) < usage.index("```python")
    assert "do **not** reproduce this model's predictions" in usage and "load_classifier(snapshot_download(" in usage

    with pytest.raises(UserInputError, match=rf"trained with '{method}'.*cannot be merged.*without --merged"):
        export_run(run, tmp_path / "merged", merged=True)
    assert not (tmp_path / "merged").exists()


def test_onnx_export_of_an_added_method_run_holds_the_whole_model_and_keeps_adapter(vit_runs, tmp_path):
    from mmdemo.deploy import export_onnx_run

    lab = export_onnx_run(vit_runs["vpt"], tmp_path / "onnx", latency_runs=2)
    rows = {r["variant"]: r for r in lab["variants"]}
    # model.onnx is traced from the run's whole network (prompt tokens included), not the bare base.
    assert rows["onnx fp32"]["agreement"] == 1.0 and rows["onnx fp32"]["max_abs_logit_diff"] < 1e-3
    assert {"model.onnx", "adapter/added.safetensors"} <= set(lab["files"])
