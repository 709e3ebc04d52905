"""Advice before training (baselines of the frozen backbone, the recommendation), the Compare view over
real runs, and trackio logging: real backbone features, real training runs, a real trackio store, the
real app through gradio_client."""

import contextlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import test_engine as engine
from mmdemo import baselines, jobs
from mmdemo.baselines import BASELINES, baseline_report, register_baseline, row, training_vs_baselines
from mmdemo.compare import compare_runs
from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset, load_summary
from mmdemo.errors import UserInputError
from mmdemo.runs import read_eval, read_metrics
from mmdemo.training import train

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory) -> Path:
    return engine.make_folder(tmp_path_factory.mktemp("advice") / "raw", classes=CLASSES, per_class=15)


@pytest.fixture(scope="module")
def dataset(raw_folder) -> str:
    return ingest_dataset(raw_folder, raw_folder.parent / "ws").path


@pytest.fixture(scope="module")
def report(dataset):
    return baseline_report(dataset, gpu=False)


@pytest.fixture(scope="module")
def two_runs(dataset, tmp_path_factory):
    """Two tiny real runs that differ in the learning rate; the second asks for trackio while trackio
    cannot be imported, which must change nothing but a line on stderr."""
    root = tmp_path_factory.mktemp("runs")
    first, second = root / ("a" * 32), root / ("b" * 32)
    train(engine.tiny_cfg(dataset, first, max_steps=3, log_every=1, augment=False))
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        mp.setitem(sys.modules, "trackio", None)  # what an environment without trackio does on import
        train(engine.tiny_cfg(dataset, second, max_steps=3, log_every=1, augment=False, learning_rate=3e-3,
                              trackio="advice-missing"))
    return first, second, stderr.getvalue()


def scores(rows):
    """Report rows without their timing (which differs between two computations of the same numbers)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def by_baseline(rows):
    curves = {}
    for r in rows:
        curves.setdefault(r["baseline"], {})[r["shots"]] = r
    return curves


def test_baselines_give_a_k_shot_curve_and_the_full_data_probe(report, dataset):
    curves = by_baseline(report["rows"])
    assert list(curves) == ["nearest class mean", "linear probe", "zero-shot"] == report["providers"]
    # Zero-shot: the class names as labels, no training image, one row.
    zero = curves.pop("zero-shot")
    assert list(zero) == [0] and 0.0 <= zero[0]["accuracy"] <= 1.0 and zero[0]["draws"] == 1
    train_per_class = min(load_summary(dataset).counts["train"].values())
    shots = [k for k in baselines.SHOTS if k <= train_per_class]
    # The draws' noise: two validation images (the shapes are drawn anew in each process: make_folder's
    # seeds come from hash(), which Python salts per process).
    noise = max(0.1, 2 / report["num_val"])
    for name, curve in curves.items():
        assert list(curve) == shots + [None], name
        for r in curve.values():
            assert 0.0 <= r["accuracy"] <= 1.0 and r["std"] >= 0 and r["draws"] >= 1
        # Pretrained features separate white shapes: far above chance (1/3) with all images, and a
        # curve that does not fall (beyond the draws' noise) as images are added.
        assert curve[None]["accuracy"] >= 0.7, name
        assert curve[shots[-1]]["accuracy"] >= curve[1]["accuracy"] - noise, name
        assert curve[None]["accuracy"] >= curve[1]["accuracy"] - noise, name
    assert curves["nearest class mean"][1]["draws"] == baselines.NCM_DRAWS
    assert report["probe_accuracy"] == curves["linear probe"][None]["accuracy"]
    assert report["num_val"] == load_summary(dataset).num_val and not report["sampled"]


def test_the_recommendation_follows_the_probe_with_the_jobs_estimate(report, dataset):
    rec = report["recommendation"]
    assert rec["method"] == baselines.recommended_method(report["probe_accuracy"])
    cfg = TrainConfig(data=dataset, output_dir="-", method=rec["method"])
    factor = baselines.METHOD_STEP_COST[rec["method"]]
    assert rec["cpu_seconds"] == round(jobs.estimate_cpu_seconds(load_summary(dataset), cfg) * factor, 1) > 0
    assert rec["label"][1:] in rec["text"]
    assert [baselines.recommended_method(a) for a in (0.99, 0.9, 0.5, None)] == ["head", "lora", "full", "full"]
    assert baselines.recommend(load_summary(dataset), 0.9, gpu=True)["cpu_seconds"] is None


def test_features_are_computed_once_and_a_new_provider_reuses_them(report, dataset):
    features = next((Path(dataset) / baselines.FEATURES_DIR).glob("*.npz"))
    stamp = features.stat().st_mtime_ns
    again = baseline_report(dataset, gpu=False)
    assert again["cached"] and scores(again["rows"]) == scores(report["rows"])

    @register_baseline("majority class")
    def majority(data):  # one registration adds a row to every report
        winner = np.bincount(data.train_y).argmax()
        return [row("majority class", None, [float((data.val_y == winner).mean())], 0.0)]

    try:
        widened = baseline_report(dataset, gpu=False)
    finally:
        BASELINES.pop("majority class")
        baseline_report(dataset, gpu=False)  # the saved report of the registered providers again
    assert not widened["cached"] and widened["features_cached"]
    assert scores(widened["rows"][:-1]) == scores(report["rows"])  # seeded draws: the same numbers again
    assert widened["rows"][-1]["baseline"] == "majority class" and widened["rows"][-1]["accuracy"] <= 0.5
    assert features.stat().st_mtime_ns == stamp


def test_compare_two_real_runs(two_runs):
    first, second, _ = two_runs
    view = compare_runs([first, second])
    a, b = "a" * 8, "b" * 8
    assert [r["run"] for r in view["runs"]] == [a, b] and {r["status"] for r in view["runs"]} == {"completed"}
    assert {r["setting"]: (r[a], r[b]) for r in view["config"]} == {"learning_rate": (0.001, 0.003),
                                                                    "trackio": ("", "advice-missing")}
    for label, run_dir in ((a, first), (b, second)):
        steps = [r["step"] for r in read_metrics(run_dir) if r["type"] == "train"]
        assert [r["step"] for r in view["loss"] if r["run"] == label] == steps == [1, 2, 3]
        assert any(v["run"] == label and v["metric"] == "accuracy" for v in view["val"])
    rows = {(r["metric"], r["class"]): r for r in view["metrics"]}
    acc_a, acc_b = read_eval(first)["accuracy"], read_eval(second)["accuracy"]
    assert rows[("accuracy", "all")][f"Δ {b}"] == pytest.approx(acc_b - acc_a, abs=1e-5)
    assert {c for m, c in rows if m == "f1"} == set(CLASSES)
    with pytest.raises(UserInputError, match="at least two runs"):
        compare_runs([first])


def test_a_missing_trackio_changes_nothing_but_a_warning(two_runs):
    _, second, stderr = two_runs
    assert "trackio: not installed" in stderr and "advice-missing" in stderr
    assert read_eval(second)["accuracy"] >= 0


def test_the_report_puts_the_fine_tuned_run_next_to_the_baselines(two_runs, report):
    first, _, _ = two_runs
    view = training_vs_baselines(first)
    tuned = read_eval(first)["accuracy"]
    assert view["rows"][0]["accuracy"] == round(tuned, 4)
    assert [r["accuracy"] for r in view["rows"][1:3]] == [report["ncm_accuracy"], report["probe_accuracy"]]
    assert view["rows"][3]["accuracy"] == by_baseline(report["rows"])["zero-shot"][0]["accuracy"]
    best = max(report["ncm_accuracy"], report["probe_accuracy"])
    assert view["verdict"].startswith("Training beat" if tuned > best else "Training did not beat")


def test_cli_trackio_logs_locally_only(dataset, tmp_path):
    run = tmp_path / ("c" * 32)
    store = tmp_path / "trackio"
    # A Space named in the environment must not be used: the training child logs to the local store.
    env = {**engine.ENV, "TRACKIO_DIR": str(store), "TRACKIO_SPACE_ID": "someone/some-space"}
    subprocess.run([sys.executable, "-m", "mmdemo", "train", "--data", dataset, "--output-dir", str(run),
                    "--base-model", "test_resnet", "--no-pretrained", "--epochs", "1", "--max-steps", "2",
                    "--batch-size", "8", "--image-size", "64", "--no-augment", "--trackio", "advice-test", "--json"],
                   check=True, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps([S.get_projects(), S.get_logs('advice-test', run=sys.argv[1])], default=str))")
    out = subprocess.run([sys.executable, "-c", read, run.name], check=True, env=env, capture_output=True, text=True,
                         timeout=120).stdout
    projects, logs = json.loads(out.strip().splitlines()[-1])
    assert projects == ["advice-test"]
    records = read_metrics(run)
    train_lines = {r["step"]: r["loss"] for r in records if r["type"] == "train"}
    assert {e["step"]: e["train/loss"] for e in logs if "train/loss" in e} == train_lines
    final = next(r for r in records if r["type"] == "eval")
    assert [(e["step"], e["val/accuracy"]) for e in logs if "val/accuracy" in e] == [(final["step"], final["accuracy"])]


def test_trackio_project_names_are_checked():
    with pytest.raises(UserInputError, match="trackio must be a project name"):
        TrainConfig(data="d", output_dir="o", trackio="../elsewhere")


def test_baselines_endpoint(app_url, raw_folder, tmp_path):
    upload = tmp_path / "shapes.zip"
    with zipfile.ZipFile(upload, "w") as z:
        for path in sorted(raw_folder.rglob("*.png")):
            z.write(path, path.relative_to(raw_folder).as_posix())
    client = Client(app_url, verbose=False)
    dataset_id = client.predict(file=handle_file(str(upload)), task="classification",
                                api_name="/load_dataset")["dataset_id"]
    result = client.predict(dataset_id=dataset_id, api_name="/baselines")
    assert result["recommendation"]["method"] in ("head", "lora", "full")
    assert 0.7 <= result["probe_accuracy"] <= 1.0
    assert {r["baseline"] for r in result["rows"]} == {"nearest class mean", "linear probe", "zero-shot"}
    with pytest.raises(AppError, match="Unknown dataset id"):
        client.predict(dataset_id="0" * 32, api_name="/baselines")
    with pytest.raises(AppError, match="at least two runs"):
        client.predict(run_ids=[], api_name="/compare_runs")


def test_cli_baselines_and_compare(dataset, report, two_runs):
    first, second, _ = two_runs

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "mmdemo", *args], env=engine.ENV, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        return done.returncode, done.stdout, done.stderr

    code, out, _ = cli("baselines", dataset)
    assert code == 0 and scores(json.loads(out)["rows"]) == scores(report["rows"])
    code, out, _ = cli("compare", str(first), str(second))
    assert code == 0 and json.loads(out)["metrics"] == compare_runs([first, second])["metrics"]
    code, _, err = cli("compare", str(first), str(first.parent / "nothing"))
    assert code == 2 and "Not a run directory" in err
