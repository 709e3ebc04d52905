"""Closed-answer VQA (method answer_head, mmdemo/vlm/answers.py): the rule that picks it, training it through the
loop on the offline encoders, answering, continuing it on new answers, the card and the refusals."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdemo.config import TrainConfig
from mmdemo.errors import UserInputError
from mmdemo.recipe import ANSWER_METHOD, closed_answers, vqa_method
from mmdemo.training import train
from mmdemo.vlm import apply_text_method, load_image_text_model
from mmdemo.vlm.answers import AnswerClassifier, answer_vocabulary, build_answer_model

from test_continual_text import write_text_dataset
from test_vlm import COLORS, one_thread, picture  # noqa: F401 (one_thread: an autouse fixture, one torch thread)

COMMON = dict(image_size=64, batch_size=8, num_workers=0, checkpoint_every_minutes=0)


def test_answer_vocabulary_groups_spellings_and_orders_by_frequency():
    rows = [["Two"], ["2", "2", "two"], ["2"], ["red"], ["Red.", "red"], ["yes"], []]
    # "Two" / "2" normalise alike (VQA's number words), shown in their most frequent spelling
    assert answer_vocabulary(rows) == ["2", "red", "yes"]


def test_closed_answers_rule():
    train_answers = [["red"], ["blue"], ["yes"]] * 10
    assert closed_answers(train_answers, [["Red"], ["blue"], ["yes"]]) == {"closed": True, "answers": 3, "coverage": 1.0}
    # one validation answer in three never seen in training: open
    assert closed_answers(train_answers, [["red"], ["blue"], ["a dog on a sofa"]])["closed"] is False
    # more distinct answers than a classifier over them should hold
    many = [[f"answer {i}"] for i in range(1500)]
    assert closed_answers(many, many[:10]) == {"closed": False, "answers": 1500, "coverage": 1.0}


def test_a_closed_answer_run_takes_more_of_its_cheap_steps():
    from mmdemo.config import auto_epochs

    # 1,556 questions in batches of 32: 48 steps an epoch; about 1,000 steps for answer_head, 400 for a decoder
    assert (auto_epochs(1556, 32, ANSWER_METHOD), auto_epochs(1556, 32, "frozen_vision"), auto_epochs(1556, 32)) == \
        (21, 9, 9)
    assert auto_epochs(100, 32, ANSWER_METHOD) == 40  # the cap


def test_the_default_method_follows_the_answers(tmp_path):
    closed = write_text_dataset(tmp_path / "closed", "vqa", "color", n_train=8, n_val=4)
    assert vqa_method(closed) == ANSWER_METHOD
    assert TrainConfig(task="vqa", data=closed, output_dir="-").method == ANSWER_METHOD
    # a generative base model keeps the generative default, as does a method given
    assert TrainConfig(task="vqa", data=closed, output_dir="-", base_model="Salesforce/blip-vqa-base").method == \
        "frozen_vision"
    assert TrainConfig(task="vqa", data=closed, output_dir="-", method="lora").method == "lora"
    # validation answers the training split never gives (shapes asked, colours trained): the decoder
    import datasets

    splits = datasets.load_from_disk(str(Path(closed) / "data"))
    splits["validation"] = splits["validation"].map(lambda row: {"answers": ["something new"]})
    opened = tmp_path / "open"
    splits.save_to_disk(str(opened / "data"))
    assert vqa_method(opened) == "" and TrainConfig(task="vqa", data=str(opened), output_dir="-").method == \
        "frozen_vision"
    assert vqa_method(tmp_path / "missing") == ""


@pytest.fixture(scope="module")
def answer_run(tmp_path_factory):
    """The default VQA run of a closed colour dataset on the offline pretrained encoders."""
    root = tmp_path_factory.mktemp("answers")
    data = write_text_dataset(root / "data", "vqa", "color", n_train=16, n_val=8)
    run = root / "run"
    result = train(TrainConfig(task="vqa", data=data, output_dir=str(run), epochs=12, **COMMON))
    return run, data, result


def test_the_default_run_is_a_classifier_over_the_answers_that_learns_them(answer_run):
    run, _, result = answer_run
    cfg = TrainConfig.load(run / "config.yaml")
    assert (cfg.method, cfg.learning_rate, cfg.batch_size) == (ANSWER_METHOD, 2e-3, 8)
    meta = json.loads((run / "model" / "mmdemo.json").read_text())
    assert (meta["task"], meta["family"], meta["base_model"]) == ("vqa", "answer-head", "efficientnet_lite0+minilm")
    assert sorted(meta["id2label"].values()) == sorted(COLORS)
    report = json.loads((run / "eval.json").read_text())
    # four colours of flat shapes: the frozen ImageNet features separate them once the head has trained
    assert report["vqa_accuracy"] == result["vqa_accuracy"] >= 0.75
    assert report["examples"][0]["question"] == "what color?" and report["examples"][0]["predicted"] in COLORS
    start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    model = load_image_text_model(run / "model")
    trainable = sum(p.numel() for p in model.net.head.parameters())
    assert start["trainable_params"] == trainable < sum(p.numel() for p in model.parameters()) / 20


def test_it_answers_through_the_inference_api(answer_run):
    from mmdemo.inference import answer, generate_batch

    run, _, _ = answer_run
    assert answer(picture("blue", 0), "what color?", str(run)) == "blue"  # a blue square, as trained
    images = [picture(c, i) for i, c in enumerate(COLORS)]
    replies = generate_batch(images, ["what color?"] * len(images), str(run))
    assert sum(r == c for r, c in zip(replies, COLORS)) >= 3 and set(replies) <= set(COLORS)
    model = load_image_text_model(run / "model")
    from mmdemo.images import resize_center_crop

    pixels = torch.stack([resize_center_crop(im, 64) for im in images])
    probs = model.scores(pixels, ["what color?"] * len(images))
    assert probs.shape == (4, 4) and torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-4)


def test_a_continued_run_adds_new_answers_and_keeps_the_old(answer_run, tmp_path):
    run, _, _ = answer_run
    shapes = write_text_dataset(tmp_path / "shapes", "vqa", "shape", n_train=8, n_val=4)
    cfg = TrainConfig(task="vqa", data=shapes, output_dir=str(tmp_path / "b"), base_model=str(run), max_steps=4,
                      **COMMON)
    assert cfg.method == ANSWER_METHOD  # a closed-answer run continues with its own method
    result = train(cfg)
    meta = json.loads((tmp_path / "b" / "model" / "mmdemo.json").read_text())
    old = json.loads((run / "model" / "mmdemo.json").read_text())["id2label"]
    answers = [meta["id2label"][str(i)] for i in range(len(meta["id2label"]))]
    assert answers[:4] == [old[str(i)] for i in range(4)] and sorted(answers[4:]) == ["circle", "square"]
    assert {r["group"] for r in result["forgetting"]} == {"old", "new"}


def test_refusals_name_the_fix(answer_run, tmp_path):
    run, data, _ = answer_run
    with pytest.raises(UserInputError, match="use frozen_vision, full or lora"):
        build_answer_model("Salesforce/blip-vqa-base", ["red"])
    with pytest.raises(UserInputError, match="continue it with method answer_head"):
        apply_text_method(load_image_text_model(run / "model"), "frozen_vision")
    composed = tmp_path / "composed"
    train(TrainConfig(task="vqa", data=data, output_dir=str(composed), method="frozen_vision", max_steps=1,
                      pretrained=False, **COMMON))
    with pytest.raises(UserInputError, match="continues only a closed-answer"):
        build_answer_model(str(composed), ["red"])
    from mmdemo.deploy.export import export_onnx_run

    with pytest.raises(UserInputError, match="answer-head family: export it with --format pytorch"):
        export_onnx_run(run, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists() or not any((tmp_path / "onnx").iterdir())


def test_the_export_loads_and_its_card_says_how(answer_run, tmp_path):
    import timm
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertModel

    from mmdemo.hub import export_run
    run, _, _ = answer_run
    out = tmp_path / "export"
    export_run(run, out, repo_id="someone/answers")
    card = (out / "README.md").read_text()
    assert "library_name: mmdemo" in card and "visual-question-answering" in card
    assert 'answer(Image.open("image.jpg"), "what color is it?", folder)' in card
    assert all(f"`{c}`" in card for c in COLORS) and "| VQA accuracy |" in card
    # the published folder answers with mmdemo and its parts load with their own libraries, as the card says
    from mmdemo.images import resize_center_crop

    pixels = torch.stack([resize_center_crop(picture(c, i), 64) for i, c in enumerate(COLORS)])
    published, trained = (load_image_text_model(folder).eval() for folder in (out, run / "model"))
    assert torch.allclose(published.scores(pixels, ["what color?"] * 4), trained.scores(pixels, ["what color?"] * 4))
    timm.create_model(f"local-dir:{out / 'vision'}", pretrained=True)
    BertModel.from_pretrained(out / "text")
    AutoTokenizer.from_pretrained(out / "text")
    assert load_file(out / "fusion.safetensors")["head.4.weight"].shape[0] == 4


def test_a_model_loaded_from_disk_is_the_saved_one(answer_run):
    from mmdemo.images import resize_center_crop

    run, _, _ = answer_run
    model = load_image_text_model(run / "model").eval()
    assert isinstance(model, AnswerClassifier)
    id2label = json.loads((run / "model" / "mmdemo.json").read_text())["id2label"]
    assert model.answers == [id2label[str(i)] for i in range(len(id2label))]
    pixels = torch.stack([resize_center_crop(Image.new("RGB", (40, 36), COLORS["green"]), 64)])
    # from the images or from the image encoder's features computed once (as training does): one answer
    assert model.generate(pixels, ["what color?"]) == model.generate(None, ["what color?"],
                                                                     features=model.image_features(pixels))
    with pytest.raises(UserInputError, match="answers questions"):
        model.generate(pixels, None)
