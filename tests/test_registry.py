"""The task and model-family registries: what they list, that they agree with the tables that still
hold the same facts, and that unknown names fail as clearly as before."""

import subprocess
import sys

import pytest

from mmdemo import config
from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset
from mmdemo.errors import UserInputError
from mmdemo.families import families, get_family
from mmdemo.hub import card
from mmdemo.inference import HUB_EXAMPLES, TAB_OF, load_predictor
from mmdemo.models import build_classifier
from mmdemo.taskspec import TASK_SPECS, task_spec
from mmdemo.vlm import LORA_TARGETS, build_image_text_model


def test_registries_list_the_tasks_and_families():
    assert list(TASK_SPECS) == ["classification", "captioning", "vqa", "image_text_classification", "retrieval"]
    assert [s.resolve("training").__name__ for s in TASK_SPECS.values()] == [
        "ClassificationTask", "TextTask", "TextTask", "ImageTextClassificationTask", "RetrievalTask"]
    assert [s.resolve("ingest").__name__ for s in TASK_SPECS.values()] == ["ingest_classification", "ingest_text",
                                                                           "ingest_text", "ingest_image_text",
                                                                           "ingest_text"]
    assert all(callable(s.resolve("predictor")) for s in TASK_SPECS.values())
    # Resolution order: the offline Lite bases before timm (which knows their names too), transformers last.
    assert list(families("classifier")) == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "timm",
                                            "transformers"]
    # BLIP and GIT before the chat family, whose model_types include theirs; the closed-answer VQA classifier
    # matches no name (the answer_head method builds it).
    assert list(families("image-text")) == ["composed", "blip", "git", "answer-head", "vlm"]
    assert not any(get_family("answer-head").matches(name) for name in ("efficientnet_lite0+minilm", "answer-head"))
    assert list(families("image-text-classifier")) == ["fused"]
    assert list(families("dual-encoder")) == ["lit", "clip"]
    assert {name: get_family(name).peft_attr for name in families("image-text")} == {
        "composed": "decoder", "blip": "net", "git": "net", "answer-head": "net", "vlm": "net"}
    assert LORA_TARGETS == {"composed": ["query", "value"], "blip": ["query", "value", "qkv"],
                            "git": ["query", "value"], "answer-head": [], "vlm": ["q_proj", "v_proj"]}


def test_task_specs_import_without_torch():
    code = "import sys, mmdemo.taskspec, mmdemo.families; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_task_specs_give_the_config_and_card_tables():
    itc, rt = "image_text_classification", "retrieval"
    assert config.TASKS == ("classification", "captioning", "vqa", itc, rt)
    peft = ("dora", "ia3", "loha", "lokr", "oft", "adapter", "vpt")
    assert config.TASK_METHODS == {"classification": ("full", "head", "lora", "bitfit", *peft),
                                   "captioning": ("frozen_vision", "full", "lora", "prompt_tuning"),
                                   "vqa": ("frozen_vision", "full", "lora", "prompt_tuning", "answer_head"),
                                   itc: ("frozen_encoders", "full", "lora"),
                                   rt: ("frozen_towers", "locked_image", "full", "lora")}
    assert config.METHODS == ("full", "head", "lora", "bitfit", *peft, "frozen_vision", "prompt_tuning",
                              "answer_head", "frozen_encoders", "frozen_towers", "locked_image")
    assert config.DEFAULT_MODELS == {"classification": "efficientnet_lite0", "captioning": "efficientnet_lite0+minilm",
                                     "vqa": "efficientnet_lite0+minilm", itc: "efficientnet_lite0+minilm",
                                     rt: "efficientnet_lite0+minilm"}
    assert card.PIPELINE_TAGS == {"classification": "image-classification", "captioning": "image-text-to-text",
                                  "vqa": "image-text-to-text", itc: "image-classification",
                                  rt: "zero-shot-image-classification"}
    assert card.TASK_TAGS == {"classification": "image-classification", "captioning": "image-captioning",
                              "vqa": "visual-question-answering", itc: "image-text-classification",
                              rt: "image-text-retrieval"}
    assert card.TASK_NAMES == {"classification": "Image Classification", "captioning": "Image Captioning",
                               "vqa": "Visual Question Answering", itc: "Image + Text Classification",
                               rt: "Image-Text Retrieval"}
    for name, spec in TASK_SPECS.items():
        for method in spec.methods:
            cfg = TrainConfig(data="d", output_dir="o", task=name, method=method)
            resolved = {"learning_rate": cfg.learning_rate, "epochs": cfg.epochs, "batch_size": cfg.batch_size}
            assert spec.method_defaults[method] == resolved, (name, method)
    assert TAB_OF == {"classification": "Classify", "captioning": "Caption", "vqa": "Ask", itc: "Classify", rt: "Search"}
    assert HUB_EXAMPLES == {"captioning": "Salesforce/blip-image-captioning-base", "vqa": "Salesforce/blip-vqa-base",
                            rt: "openai/clip-vit-base-patch32"}
    for name in ("timm", "transformers", "composed", "blip", "git", "vlm", "fused", "lit", "clip"):  # the families mmdemo.json records
        assert get_family(name).library == card.LIBRARIES.get(name, name), name


def test_the_default_classifier_is_recorded_as_a_timm_model():
    clf, label_map = build_classifier("", ["cat", "dog"], pretrained=False)
    assert (clf.family, clf.family_spec, clf.base_model, label_map) == ("timm", get_family("timm"),
                                                                        "efficientnet_lite0", [0, 1])


def test_unknown_task_names_fail_clearly(tmp_path):
    with pytest.raises(UserInputError, match=r"task must be one of classification, captioning, vqa, image_text_classification, retrieval \(got 'ocr'\)"):
        TrainConfig(data="d", output_dir="o", task="ocr")
    with pytest.raises(UserInputError, match=r"task must be one of classification, captioning, vqa, image_text_classification, retrieval \(got 'ocr'\)"):
        task_spec("ocr")
    with pytest.raises(UserInputError, match="task 'ocr' is not supported yet; supported tasks: classification, "
                                             "captioning, vqa, image_text_classification"):
        ingest_dataset(tmp_path, tmp_path / "ws", task="ocr")
    with pytest.raises(UserInputError, match="task must be one of"):
        load_predictor("", "ocr")


def test_unknown_model_names_fail_clearly(tmp_path):
    # Not the default, not timm: the transformers family is the last resort, and the Hub is unreachable here.
    with pytest.raises(UserInputError, match="Could not fetch 'no-such/model': the Hugging Face Hub is unreachable"):
        build_classifier("no-such/model", ["a", "b"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="Could not read config.json: .* Is this a model folder?"):
        build_classifier(str(tmp_path / "empty"), ["a", "b"])
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        tmp_path / "bert")
    with pytest.raises(UserInputError, match="is a bert model, which does not write text about images; pick BLIP"):
        build_image_text_model("captioning", str(tmp_path / "bert"))
    with pytest.raises(UserInputError, match="Could not fetch 'no-such/captioner': the Hugging Face Hub"):
        build_image_text_model("captioning", "no-such/captioner")
    with pytest.raises(KeyError, match="unknown model family 'nope'"):
        get_family("nope")
