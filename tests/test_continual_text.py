"""Continued captioning / VQA runs (mmdemo.continual's text part: memory, replay, forgetting table) and peft
prompt tuning of the offline text decoder."""

import json
import time
from pathlib import Path

import pytest
import torch

from mmdemo.config import TrainConfig
from mmdemo.continual import (MEMORY_TEXT_ROWS, load_memory, replay_repeats, save_text_memory,
                              text_forgetting_table)
from mmdemo.data import load_splits
from mmdemo.errors import UserInputError
from mmdemo.metrics import caption_metrics, vqa_metrics
from mmdemo.runs import report_rows
from mmdemo.tasks import TextRows, generate_texts
from mmdemo.training import train
from mmdemo.vlm import PROMPT_TOKENS, apply_text_method, build_image_text_model, load_image_text_model

from test_vlm import COLORS, one_thread, picture  # noqa: F401 (one_thread: an autouse fixture, one torch thread)

SIDE = 64
COMMON = dict(image_size=SIDE, batch_size=4, num_workers=0, checkpoint_every_minutes=0, pretrained=False)


def write_text_dataset(folder: Path, task: str, kind: str, n_train: int = 8, n_val: int = 4) -> str:
    """An ingested dataset: ``kind`` "color" asks / captions the colour, "shape" the shape."""
    import datasets

    def rows(n, offset):
        colors = [list(COLORS)[(i + offset) % len(COLORS)] for i in range(n)]
        shapes = [(i + offset) % 2 for i in range(n)]
        images = [picture(c, s) for c, s in zip(colors, shapes)]
        words = [c if kind == "color" else ("circle" if s else "square") for c, s in zip(colors, shapes)]
        if task == "captioning":
            return {"image": images, "captions": [[f"a {w} thing"] for w in words]}
        return {"image": images, "question": [f"what {kind}?"] * n, "answers": [[w] for w in words]}

    text = datasets.Sequence(datasets.Value("string"))
    columns = {"captions": text} if task == "captioning" else {"question": datasets.Value("string"), "answers": text}
    features = datasets.Features({"image": datasets.Image(), **columns})
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(n_train, 0), features=features),
                                   "validation": datasets.Dataset.from_dict(rows(n_val, 3), features=features)})
    splits.save_to_disk(str(folder / "data"))
    (folder / "summary.json").write_text("{}")
    return str(folder)


def ingest_captions(folder: Path, workspace: Path, kind: str, n: int = 10) -> str:
    """An upload folder (images + metadata.jsonl) of captions naming the colour or the shape, ingested."""
    from mmdemo.data import ingest_dataset

    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        color, shape = list(COLORS)[i % len(COLORS)], i % 2
        picture(color, shape).save(folder / f"{i}.png")
        word = color if kind == "color" else ("circle" if shape else "square")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a {word} thing"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return ingest_dataset(folder, workspace, task="captioning").path


def generated(model_dir, data: str, split: str, task: str) -> tuple[list[str], list[list[str]]]:
    """(texts a saved model writes for a split's rows, their references), computed here, not by the run."""
    model = load_image_text_model(model_dir).eval()
    rows = TextRows(load_splits(data)[split], model.preprocess.image_size, task, False, 0)
    return generate_texts(model, rows, task, 8 if task == "vqa" else 24), rows.references


def test_text_forgetting_table_against_hand_computed_numbers():
    old_refs = [["red"], ["blue"], ["red", "red"], ["green"]]
    old_before = ["red", "blue", "red", "green"]  # 4/4
    old_after = ["red", "red", "blue", "green"]   # 2/4
    new_refs = [["circle"], ["square"]]
    new_before = ["red", "red"]                    # 0/2
    new_after = ["circle", "circle"]               # 1/2
    rows = {(r["group"], r["metric"]): r for r in
            text_forgetting_table("vqa", old_refs, old_before, old_after, new_refs, new_before, new_after)}
    assert rows["old", "exact_match"] == {"group": "old", "metric": "exact_match", "support": 4, "before": 1.0,
                                          "after": 0.5, "change": -0.5}
    assert (rows["old", "vqa_accuracy"]["before"], rows["old", "vqa_accuracy"]["after"]) == (1.0, 0.5)
    assert (rows["new", "vqa_accuracy"]["before"], rows["new", "vqa_accuracy"]["after"]) == (0.0, 0.5)
    assert rows["new", "exact_match"]["support"] == 2
    # Captioning: exact match by hand, CIDEr-D as the metrics module scores it; no old split -> new rows only.
    caps = text_forgetting_table("captioning", None, None, None, [["a red thing"], ["a blue thing"]],
                                 ["a red thing", "a red thing"], ["a red thing", "a blue thing"])
    by = {(r["group"], r["metric"]): r for r in caps}
    assert set(by) == {("new", "cider"), ("new", "exact_match")}
    assert (by["new", "exact_match"]["before"], by["new", "exact_match"]["after"]) == (0.5, 1.0)
    cider = caption_metrics(["a red thing", "a blue thing"], [["a red thing"], ["a blue thing"]])["cider"]
    assert by["new", "cider"]["after"] == round(cider, 4)


def test_text_memory_is_bounded_and_shared_equally_by_runs(tmp_path):
    first = load_splits(write_text_dataset(tmp_path / "a", "vqa", "color", n_train=30))["train"]
    second = load_splits(write_text_dataset(tmp_path / "b", "vqa", "shape", n_train=30))["train"]
    run_a, run_b = tmp_path / ("a" * 32), tmp_path / ("b" * 32)
    assert save_text_memory(run_a, first, "vqa", None, rows=20) == 20
    memory = load_memory(run_a)
    assert set(memory["label"]) == {run_a.name} and set(memory["question"]) == {"what color?"}
    pairs = set(zip(first["question"], map(tuple, first["answers"])))
    assert all((q, tuple(a)) in pairs for q, a in zip(memory["question"], memory["answers"]))
    # The continued run's memory: the same bound, half of it from each run.
    assert save_text_memory(run_b, second, "vqa", run_a, rows=20) == 20
    labels = list(load_memory(run_b)["label"])
    assert {n: labels.count(n) for n in set(labels)} == {run_a.name: 10, run_b.name: 10}
    assert set(load_memory(run_b)["question"]) == {"what color?", "what shape?"}
    assert save_text_memory(tmp_path / "c", first, "vqa", None) == min(30, MEMORY_TEXT_ROWS)


def test_continued_vqa_run_replays_the_memory_and_reports_forgetting(tmp_path):
    old = write_text_dataset(tmp_path / "old", "vqa", "color")
    new = write_text_dataset(tmp_path / "new", "vqa", "shape")
    run_a, run_b = tmp_path / ("a" * 32), tmp_path / ("b" * 32)
    train(TrainConfig(task="vqa", data=old, output_dir=str(run_a), method="frozen_vision", max_steps=3,
                      learning_rate=1e-3, **COMMON))
    assert len(load_memory(run_a)) == 8  # every training row (under the bound)

    cfg = TrainConfig(task="vqa", data=new, output_dir=str(run_b), base_model=str(run_a), max_steps=3, **COMMON)
    assert cfg.keep_old == "replay"  # the default ("both") is replay for text tasks
    result = train(cfg)
    assert result["continual"] == {"keep_old": "replay", "memory_rows": 8, "memory_repeats": replay_repeats(8, 1, 8, 1),
                                   "distill": False}
    rows = {(r["group"], r["metric"]): r for r in json.loads((run_b / "eval.json").read_text())["forgetting"]}
    for group, data, model, when in (("old", old, run_a, "before"), ("old", old, run_b, "after"),
                                     ("new", new, run_a, "before"), ("new", new, run_b, "after")):
        texts, refs = generated(model / "model", data, "validation", "vqa")
        scores = vqa_metrics(texts, refs)
        for metric in ("vqa_accuracy", "exact_match"):
            assert rows[group, metric][when] == round(scores[metric], 4), (group, metric, when)
            assert rows[group, metric]["support"] == 4
    assert rows["new", "vqa_accuracy"]["after"] == round(result["vqa_accuracy"], 4)
    # The report table shows them, and the continued run's memory holds rows of both runs.
    shown = {r["metric"]: r for r in report_rows(result)}
    assert shown["vqa_accuracy (previous run's validation)"]["before"] == rows["old", "vqa_accuracy"]["before"]
    assert set(load_memory(run_b)["label"]) == {run_a.name, run_b.name}
    with pytest.raises(UserInputError, match="distill' applies to classification"):
        TrainConfig(task="vqa", data=new, output_dir=str(tmp_path / "x"), keep_old="distill")


def wait(manager, run_dir: Path, timeout: float = 240) -> None:
    from mmdemo.jobs import run_status

    deadline = time.time() + timeout
    while (state := run_status(run_dir, manager)["status"]) in ("queued", "running", "stopping"):
        assert time.time() < deadline, (run_dir / "train.log").read_text()[-2000:]
        time.sleep(0.5)
    assert state == "completed", (run_dir / "train.log").read_text()[-3000:]


def test_a_captioning_run_continues_through_the_child_process(tmp_path):
    # The app's path: run ids in a workspace, the real `python -m mmdemo train` child; keep_old off still
    # reports the forgetting table.
    from mmdemo.jobs import JobManager, new_run_config, start_training

    wsp = tmp_path / "ws"
    old, new = ingest_captions(tmp_path / "old", wsp, "color"), ingest_captions(tmp_path / "new", wsp, "shape")
    manager = JobManager(max_concurrent=1)
    first = start_training(new_run_config(wsp, old, task="captioning", max_steps=2, **COMMON), manager)
    wait(manager, wsp / "runs" / first)
    second = start_training(new_run_config(wsp, new, task="captioning", base_model=first, keep_old="off", max_steps=2,
                                           **COMMON), manager)
    run_b = wsp / "runs" / second
    wait(manager, run_b)
    result = json.loads((run_b / "eval.json").read_text())
    assert result["continual"] == {"keep_old": "off", "memory_rows": 0, "memory_repeats": 0, "distill": False}
    rows = {(r["group"], r["metric"]): r for r in result["forgetting"]}
    assert set(rows) == {(g, m) for g in ("old", "new") for m in ("cider", "exact_match")}
    texts, refs = generated(run_b / "model", old, "validation", "captioning")
    assert rows["old", "exact_match"]["after"] == round(caption_metrics(texts, refs)["exact_match"], 4)
    assert rows["old", "cider"]["after"] == round(caption_metrics(texts, refs)["cider"], 4)
    assert set(load_memory(run_b)["label"]) == {first, second}


# --- prompt tuning --------------------------------------------------------------------------------


def test_prompt_tuning_is_refused_where_nothing_would_read_the_image(tmp_path):
    from test_vlm import build_blip

    fresh = build_image_text_model("vqa", "efficientnet_lite0+minilm", SIDE, pretrained=False)
    with pytest.raises(UserInputError, match="Train it first with frozen_vision, lora or full"):
        apply_text_method(fresh, "prompt_tuning")
    blip = build_image_text_model("captioning", build_blip(tmp_path / "blip", vqa=False))
    with pytest.raises(UserInputError, match="Use lora, frozen_vision or full"):
        apply_text_method(blip, "prompt_tuning")


def test_prompt_tuning_trains_only_the_prompts_and_saves_a_peft_adapter(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import BertLMHeadModel

    from mmdemo.bakeoff import method_plan
    from mmdemo.models import count_parameters

    data = write_text_dataset(tmp_path / "data", "vqa", "color")
    run_a, run_b = tmp_path / ("a" * 32), tmp_path / ("b" * 32)
    train(TrainConfig(task="vqa", data=data, output_dir=str(run_a), method="frozen_vision", max_steps=2, **COMMON))
    hidden = 384  # MiniLM-L6's width
    plan = method_plan("vqa", str(run_a), [], "prompt_tuning")
    assert plan["trainable_params"] == PROMPT_TOKENS * hidden
    model = apply_text_method(load_image_text_model(run_a / "model"), "prompt_tuning")
    assert count_parameters(model)[0] == PROMPT_TOKENS * hidden
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["decoder.prompt_encoder.default.embedding.weight"]

    result = train(TrainConfig(task="vqa", data=data, output_dir=str(run_b), base_model=str(run_a),
                               method="prompt_tuning", max_steps=4, keep_old="off", **COMMON))
    start = next(json.loads(line) for line in (run_b / "metrics.jsonl").read_text().splitlines())
    assert start["trainable_params"] == PROMPT_TOKENS * hidden
    # Only the prompts changed: the decoder, projection and encoder files equal the base run's.
    for name in ("text/model.safetensors", "projection.safetensors", "vision/model.safetensors"):
        before, after = load_file(run_a / "model" / name), load_file(run_b / "model" / name)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), name
    adapter = load_file(run_b / "model" / "adapter" / "adapter_model.safetensors")
    assert [v.shape for v in adapter.values()] == [(PROMPT_TOKENS, hidden)]

    # Reloaded through mmdemo, it writes what the trained model wrote in the run's last evaluation.
    reloaded = load_image_text_model(run_b / "model").eval()
    texts, _ = generated(run_b / "model", data, "validation", "vqa")
    assert [e["predicted"] for e in result["examples"]] == texts
    # Loaded with peft alone (the base decoder + adapter/), it computes the same loss as mmdemo's model.
    decoder = PeftModel.from_pretrained(BertLMHeadModel.from_pretrained(run_b / "model" / "text"),
                                        run_b / "model" / "adapter").eval()
    items = [{"pixels": torch.randint(0, 256, (3, SIDE, SIDE), dtype=torch.uint8), "question": "what color?",
              "answer": c} for c in ("red", "blue")]
    batch = reloaded.collate(items)
    with torch.no_grad():
        memory = reloaded.encode(reloaded.pixels(batch["images"]))
        ours = reloaded(**batch)
        theirs = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         encoder_hidden_states=memory, labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    # An export keeps adapter/ (the card tags it); a merged one is refused, since prompts cannot merge.
    from mmdemo.hub.export import export_run

    with pytest.raises(UserInputError, match="cannot be merged"):
        export_run(run_b, tmp_path / "merged", merged=True)
    files = export_run(run_b, tmp_path / "export")
    assert "adapter/adapter_model.safetensors" in files and "prompt-tuning" in (tmp_path / "export" / "README.md").read_text()
