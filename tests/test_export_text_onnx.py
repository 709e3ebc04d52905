"""The composed captioner (Lite0 + MiniLM) exported to ONNX: a real VQA run's encoder and decoder files,
generation in onnxruntime against the PyTorch model's, the lab rows, a prompt-tuned decoder, the card's snippet
run without mmdemo or torch."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_continual_text import COMMON, write_text_dataset
from test_export_onnx import app_export, run_card_snippet
from test_vlm import picture

from mmdemo.config import TrainConfig
from mmdemo.deploy.export import EXAMPLE_QUESTION, export_onnx_run
from mmdemo.deploy.lab import session
from mmdemo.deploy.runtime import generate_onnx, preprocess
from mmdemo.deploy.text import export_text_fp32
from mmdemo.images import resize_center_crop
from mmdemo.training import train
from mmdemo.vlm import apply_text_method, load_image_text_model

RUN_ID = "7e" * 16
QUESTIONS = ["what color?", "what is the color of the thing in the picture?"]  # two lengths: two batches


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-onnx")
    data = write_text_dataset(root / "ws" / "data", "vqa", "color", n_val=6)
    run = root / "ws" / "runs" / RUN_ID  # a run of workspace ws, as the app's job manager lays it out
    # One step at a tiny learning rate: the fresh decoder's own words (a few steps teach it to stop at once, and
    # empty answers would agree whatever the graphs computed).
    train(TrainConfig(task="vqa", data=data, output_dir=str(run), method="frozen_vision", max_steps=1,
                      learning_rate=1e-7, **COMMON))
    return run


@pytest.fixture(scope="module")
def exported(vqa_run):
    return app_export(vqa_run, calibration_images=8, latency_runs=2)


def onnx_answers(folder: Path, model, images, questions):
    pixels = np.concatenate([preprocess(im, asdict(model.preprocess)) for im in images])
    tok = model.tokenizer
    ids = generate_onnx(session(folder / "encoder.onnx"), session(folder / "decoder.onnx"), pixels,
                        model.prompt_ids(questions, len(images)), tok.sep_token_id, tok.pad_token_id, 8)
    return [tok.decode(i, skip_special_tokens=True).strip() for i in ids]


def torch_answers(model, images, questions, max_new_tokens=8):
    pixels = torch.stack([resize_center_crop(im, model.preprocess.image_size) for im in images])
    return model.generate(pixels, questions, max_new_tokens=max_new_tokens)


def test_vqa_exports_encoder_and_decoder_whose_generation_is_torchs(exported, vqa_run):
    out, lab = exported
    assert {"encoder.onnx", "decoder.onnx", "encoder_int8.onnx", "decoder_int8.onnx", "encoder_fp16.onnx",
            "decoder_fp16.onnx", "export.json", "mmdemo.json", "text/tokenizer.json", "README.md"} <= set(lab["files"])
    rows = {r["variant"]: r for r in lab["variants"]}
    assert set(rows) == {"torch fp32", "onnx fp32", "onnx int8", "onnx fp16"}
    assert (lab["task"], lab["metric"], lab["num_val"], lab["kv_cache"]) == ("vqa", "vqa_accuracy", 6, False)
    assert rows["onnx fp32"]["agreement"] == 1.0 and rows["onnx fp32"]["delta_points"] == 0.0
    assert rows["onnx fp32"]["accuracy"] == rows["torch fp32"]["accuracy"]
    assert rows["onnx fp32"]["exact_match"] == rows["torch fp32"]["exact_match"]
    for row in rows.values():
        assert not row.get("error"), row
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["agreement"] <= 1.0
        assert row["latency_ms_p95"] >= row["latency_ms_p50"] > 0
    assert lab["quantization"]["int8"]["decoder"]["mode"] == "dynamic"
    assert lab["quantization"]["int8"]["encoder"]["mode"] == "static"
    assert rows["onnx int8"]["size_vs_onnx_fp32"] < 0.45 and 0.4 < rows["onnx fp16"]["size_vs_onnx_fp32"] < 0.6
    assert sum(r["best"] for r in lab["variants"]) == 1 and lab["best"] in rows
    assert json.loads((out / "export.json").read_text())["variants"] == lab["variants"]
    # Images and questions of the lab's making: two question lengths, generated in two batches, as torch does.
    model = load_image_text_model(vqa_run / "model").eval()
    images = [picture(c, s) for c in ("red", "blue") for s in (0, 1)]
    questions = [QUESTIONS[i % 2] for i in range(len(images))]
    expected = torch_answers(model, images, questions)
    assert all(len(text.split()) >= 2 for text in expected), expected  # words to agree on
    assert onnx_answers(out, model, images, questions) == expected


def test_a_prompt_tuned_decoder_exports_with_its_prompts_in_the_graph(vqa_run, tmp_path):
    model = apply_text_method(load_image_text_model(vqa_run / "model"), "prompt_tuning").eval()
    with torch.no_grad():  # prompts of their own, far from the vocabulary's: the answers must change
        model.decoder.prompt_encoder.default.embedding.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    export_text_fp32(model, tmp_path)
    images = [picture("green", 0), picture("yellow", 1)]
    expected = torch_answers(model, images, QUESTIONS)
    assert onnx_answers(tmp_path, model, images, QUESTIONS) == expected
    plain = load_image_text_model(vqa_run / "model").eval()
    assert torch_answers(plain, images, QUESTIONS) != expected  # the graph holds the prompts, not only the decoder


def test_the_text_card_snippet_runs_with_numpy_pil_onnxruntime_and_tokenizers_only(exported, vqa_run, tmp_path):
    out, _ = exported
    card = (out / "README.md").read_text()
    assert "## ONNX (onnxruntime)" in card and "| VQA accuracy |" in card and "There is no KV cache" in card
    picture("blue", 1).save(tmp_path / "image.jpg")
    printed = run_card_snippet(out, tmp_path, ("encoder.onnx", "decoder.onnx", "mmdemo.json", "text"))
    model = load_image_text_model(vqa_run / "model").eval()
    expected = torch_answers(model, [Image.open(tmp_path / "image.jpg")], [EXAMPLE_QUESTION], max_new_tokens=20)
    assert printed == expected[0]


def test_a_captioning_run_exports_and_is_scored_by_cider(tmp_path):
    data = write_text_dataset(tmp_path / "data", "captioning", "shape", n_val=4)
    run = tmp_path / "run"
    train(TrainConfig(task="captioning", data=data, output_dir=str(run), max_steps=1, learning_rate=1e-7, **COMMON))
    lab = export_onnx_run(run, tmp_path / "out", latency_runs=1)
    rows = {r["variant"]: r for r in lab["variants"]}
    assert (lab["task"], lab["metric"], lab["max_new_tokens"], set(rows)) == ("captioning", "cider", 24,
                                                                              {"torch fp32", "onnx fp32"})
    assert rows["onnx fp32"]["agreement"] == 1.0 and rows["onnx fp32"]["accuracy"] == rows["torch fp32"]["accuracy"]
    assert all(e["question"] is None and len(e["text"].split()) >= 2 for e in rows["onnx fp32"]["examples"])
    assert "| CIDEr-D |" in (tmp_path / "out" / "README.md").read_text()
