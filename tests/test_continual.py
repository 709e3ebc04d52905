"""Continual learning (mmdemo.continual): the rehearsal memory, the forgetting table, a continued run."""

import json

import torch

from mmdemo.config import TrainConfig
from mmdemo.continual import forgetting_table, load_memory, replay_repeats, save_memory, select_memory
from mmdemo.data import ingest_dataset, load_splits
from mmdemo.images import ImageTensors, normalize
from mmdemo.models import load_classifier
from mmdemo.runs import report_rows
from mmdemo.training import train

from test_engine import make_folder


def test_select_memory_is_bounded_class_balanced_and_seeded():
    labels = ["a"] * 50 + ["b"] * 3 + ["c"] * 20
    chosen = select_memory(labels, per_class=10, seed=1)
    counts = {c: sum(labels[i] == c for i in chosen) for c in "abc"}
    assert counts == {"a": 10, "b": 3, "c": 10}
    assert chosen == sorted(set(chosen)) == select_memory(labels, per_class=10, seed=1)
    assert chosen != select_memory(labels, per_class=10, seed=2)


def test_replay_repeats_balance_old_and_new_classes():
    # 5 new classes of 144 rows each, a memory of 5 old classes x 30: repeat it 5 times (144 / 30 = 4.8).
    assert replay_repeats(720, 5, 150, 5) == 5
    assert replay_repeats(10, 2, 100, 2) == 1  # never fewer than once


def test_forgetting_table_against_hand_computed_numbers():
    old_labels = ["0", "1"]
    old_true = ["0", "0", "0", "0", "1", "1"]
    before = ["0", "0", "0", "1", "1", "1"]  # 0: 3/4, 1: 2/2, all: 5/6
    after = ["0", "2", "0", "3", "1", "0"]   # 0: 2/4, 1: 1/2, all: 3/6
    new_true = ["2", "2", "3", "3", "3"]
    new_after = ["2", "3", "3", "3", "0"]    # 2: 1/2, 3: 2/3, all: 3/5
    rows = {(r["group"], r["class"]): r for r in forgetting_table(old_labels, old_true, before, after, new_true, new_after)}
    assert rows["old", "0"] == {"group": "old", "class": "0", "support": 4, "before": 0.75, "after": 0.5, "change": -0.25}
    assert (rows["old", "1"]["before"], rows["old", "1"]["after"]) == (1.0, 0.5)
    assert (rows["old", "all"]["before"], rows["old", "all"]["after"], rows["old", "all"]["support"]) == (0.8333, 0.5, 6)
    assert rows["new", "2"]["after"] == 0.5 and rows["new", "2"]["before"] is None
    assert (rows["new", "3"]["after"], rows["new", "all"]["after"], rows["new", "all"]["support"]) == (0.6667, 0.6, 5)


def accuracy_by_hand(model_dir, split, names):
    clf = load_classifier(model_dir).eval()
    ds = ImageTensors(split, clf.preprocess.image_size, list(range(len(names))), train=False)
    with torch.no_grad():
        preds = clf(normalize(ds.pixels, clf.preprocess.mean, clf.preprocess.std)).argmax(-1).tolist()
    return sum(clf.labels[p] == names[y] for p, y in zip(preds, split["label"])) / len(preds)


def test_continued_run_replays_a_balanced_memory_and_reports_forgetting(tmp_path):
    first = ingest_dataset(make_folder(tmp_path / "a", ("circle", "square"), 10), tmp_path / "ws").path
    second = ingest_dataset(make_folder(tmp_path / "b", ("triangle", "wedge"), 10), tmp_path / "ws").path
    common = dict(base_model="test_efficientnet", pretrained=False, image_size=32, epochs=1, batch_size=8,
                  num_workers=0, checkpoint_every_minutes=0)
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    train(TrainConfig(data=first, output_dir=str(run_a), **common))
    memory = load_memory(run_a)
    assert sorted(memory["label"]) == ["circle"] * 8 + ["square"] * 8  # every training image (under the bound)

    result = train(TrainConfig(data=second, output_dir=str(run_b), **{**common, "base_model": str(run_a)},
                               keep_old="both"))
    assert result["continual"] == {"keep_old": "both", "memory_images": 16, "memory_repeats": 1, "distill": True}
    # The continued run's memory keeps the old classes next to the new one.
    assert sorted(set(load_memory(run_b)["label"])) == ["circle", "square", "triangle", "wedge"]
    old_val = load_splits(first)["validation"]
    new_val = load_splits(second)["validation"]
    rows = {(r["group"], r["class"]): r for r in json.loads((run_b / "eval.json").read_text())["forgetting"]}
    names = old_val.features["label"].names
    assert rows["old", "all"]["before"] == round(accuracy_by_hand(run_a / "model", old_val, names), 4)
    assert rows["old", "all"]["after"] == round(accuracy_by_hand(run_b / "model", old_val, names), 4)
    assert rows["new", "all"]["after"] == round(accuracy_by_hand(run_b / "model", new_val, new_val.features["label"].names), 4)
    assert rows["old", "all"]["support"] == len(old_val)
    # The Train tab's report shows them (after as accuracy, before next to it).
    shown = {r["class"]: r for r in report_rows(result)}
    assert shown["all (old class, previous run's validation)"]["accuracy before"] == rows["old", "all"]["before"]
    # The bound holds over the split and the previous memory together, class by class.
    train_split = load_splits(first)["train"]
    assert save_memory(tmp_path / "m", train_split, train_split.features["label"].names, run_b, per_class=3) == 12
    labels = list(load_memory(tmp_path / "m")["label"])
    assert {c: labels.count(c) for c in set(labels)} == {"circle": 3, "square": 3, "triangle": 3, "wedge": 3}
