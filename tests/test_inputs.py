"""Every field that names a model, every parameter and every failure: what the engine, the CLI and the
real app (its own server, with its data directory inside its working directory, as by default) accept,
and the message for what they refuse."""

import ast
import hashlib
import json
import logging
import re
import shutil
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import gradio as gr
import pytest
import yaml
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from appserver import AppProcess
from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset, open_image
from mmdemo.errors import UserInputError
from mmdemo.inference import caption, classify, load_predictor
from mmdemo.models import build_classifier, save_classifier
from mmdemo.refs import resolve_model_ref
from ui.common import user_errors

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
CIRCLE = ASSETS / "examples" / "circle.png"
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
REFUSED = "must be a run id of yours"


def fake_run(workspace: Path, with_model: bool = True) -> Path:
    run = workspace / "runs" / uuid.uuid4().hex
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("task: classification\n")
    if with_model:
        (run / "model" / "mmdemo.json").write_text("{}")
    return run


def huge_png(path: Path, side: int = 30000) -> Path:
    """A PNG whose header claims side x side pixels (no pixel data): Pillow refuses it from the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


# --- model references on the engine ---------------------------------------------------------------


def test_model_refs_accept_own_runs_and_names_only(tmp_path):
    mine, theirs = tmp_path / "users" / "a", tmp_path / "users" / "b"
    own, other = fake_run(mine), fake_run(theirs)
    assert resolve_model_ref(own.name, mine) == str(own.resolve())
    assert resolve_model_ref(f"{own.name} · efficientnet_lite0 · full", mine) == str(own.resolve())
    for name in ("efficientnet_lite0", "efficientnet_lite0+minilm", "resnet18", "timm/resnet18.a1_in1k",
                 "hf-hub:timm/resnet18.a1_in1k", "google/vit-base-patch16-224-in21k", ""):
        assert resolve_model_ref(name, mine) == name
    with pytest.raises(UserInputError, match="Unknown run id"):
        resolve_model_ref(other.name, mine)
    with pytest.raises(UserInputError, match="no trained model yet"):
        resolve_model_ref(fake_run(mine, with_model=False).name, mine)

    def refusal(text):
        with pytest.raises(UserInputError, match=REFUSED) as e:
            resolve_model_ref(text, mine, allow_local=False)
        return str(e.value)

    missing = other.parent / uuid.uuid4().hex
    for path in (other, other / "model"):
        for spelling in (str(path), str(path) + "/", f"{tmp_path}/users/a/../b/runs/{path.relative_to(theirs / 'runs')}",
                         "./" + str(path.relative_to(tmp_path)), str(path.relative_to(tmp_path)), f"~/{path.name}"):
            assert refusal(spelling) == refusal(spelling.replace(other.name, missing.name)), spelling
    # The same message whether the path exists or not, and it names neither.
    assert refusal(str(other)) == refusal("/etc/passwd") == refusal("C:\\models\\x")
    assert str(tmp_path) not in refusal(str(other))


def test_the_cli_takes_local_folders_as_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine" / "model").mkdir(parents=True)
    assert resolve_model_ref("mine/model", allow_local=True) == str(tmp_path / "mine" / "model")
    assert resolve_model_ref("./mine", allow_local=True) == str(tmp_path / "mine")
    with pytest.raises(UserInputError, match="'./gone' was not found"):
        resolve_model_ref("./gone", allow_local=True)


def test_builders_never_read_a_hub_id_as_a_relative_folder(tmp_path, monkeypatch):
    """'owner/name' next to the server's working directory is still a Hub id: only absolute paths are folders."""
    clf, _ = build_classifier("test_resnet", ["secret_a", "secret_b"], pretrained=False)
    save_classifier(clf, tmp_path / "owner" / "name")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match="Hugging Face Hub"):
        build_classifier("owner/name", ["x", "y"])
    with pytest.raises(UserInputError, match="Hugging Face Hub"):
        classify(Image.new("RGB", (40, 40)), "owner/name")
    # The absolute path is the folder, and it keeps its labels.
    continued, _ = build_classifier(str(tmp_path / "owner" / "name"), ["secret_a"])
    assert continued.labels == ["secret_a", "secret_b"]
    assert set(classify(Image.new("RGB", (40, 40)), str(tmp_path / "owner" / "name"))) == {"secret_a", "secret_b"}


# --- parameters ---------------------------------------------------------------------------------


def test_train_config_parses_types_or_names_the_field():
    cfg = TrainConfig(data="d", output_dir="o", epochs="3", batch_size=8.0, learning_rate="0.01", augment="false",
                      pretrained=1, seed=" 7 ")
    assert (cfg.epochs, cfg.batch_size, cfg.learning_rate, cfg.augment, cfg.pretrained, cfg.seed) == \
        (3, 8, 0.01, False, True, 7)
    assert type(cfg.epochs) is int and type(cfg.batch_size) is int
    with pytest.raises(UserInputError, match=re.escape("max_steps must be a whole number (got 1.5)")):
        TrainConfig(data="d", output_dir="o", max_steps=1.5)
    with pytest.raises(UserInputError) as e:
        TrainConfig(data="d", output_dir="o", epochs="abc", image_size="1.5", seed=True, augment="maybe",
                    learning_rate="fast", base_model=3, weight_decay=2)
    text = str(e.value)
    for problem in ("epochs must be a whole number (got 'abc')", "image_size must be a whole number (got '1.5')",
                    "seed must be a whole number (got True)", "augment must be true or false (got 'maybe')",
                    "learning_rate must be a number (got 'fast')", "base_model must be text (got 3)",
                    "weight_decay must be in [0, 1) (got 2.0)"):
        assert problem in text, text


def test_inference_parameters_are_range_checked():
    image = Image.new("RGB", (40, 40), "red")
    assert len(classify(image, top_k=0)) == 5  # 0: the default, as on the API
    assert len(classify(image, top_k="3")) == 3
    assert len(classify(image, "efficientnet_lite0", top_k=2)) == 2  # the registry name is the ImageNet default
    for top_k, why in ((-1, "between 1 and 1000"), (1001, "between 1 and 1000"), (1.5, "whole number"),
                       ("abc", "whole number")):
        with pytest.raises(UserInputError, match=f"top_k must be .*{why}|top_k must be a {why}"):
            classify(image, top_k=top_k)
    for kwargs, name in (({"max_new_tokens": 257}, "max_new_tokens"), ({"max_new_tokens": -1}, "max_new_tokens"),
                         ({"num_beams": 9}, "num_beams"), ({"num_beams": 2.5}, "num_beams")):
        with pytest.raises(UserInputError, match=name):
            caption(image, None, **kwargs)
    with pytest.raises(UserInputError, match="base model to fine-tune"):
        load_predictor("efficientnet_lite0+minilm", "captioning")


def test_images_over_the_pixel_limit_name_the_limit(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="'huge.png' has more than 89,000,000 pixels"):
        open_image(huge_png(tmp_path / "huge.png"))
    Image.new("RGB", (40, 40)).save(tmp_path / "small.png")
    assert open_image(tmp_path / "small.png").size == (40, 40)
    monkeypatch.setattr("mmdemo.data.MAX_PIXELS", 1000)  # the public knob, read at call time
    with pytest.raises(UserInputError, match="more than 1,000 pixels"):
        open_image(tmp_path / "small.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserInputError, match="Could not read the image 'notes.png'"):
        open_image(tmp_path / "notes.png")


def test_the_wrapper_turns_an_unexpected_failure_into_a_short_message(tmp_path, caplog):
    @user_errors
    def on_read(path):
        return json.loads(Path(path).read_text())

    (tmp_path / "broken.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="mmdemo.app"), pytest.raises(gr.Error) as e:
        on_read(tmp_path / "broken.json")
    assert "JSONDecodeError" in e.value.message and str(tmp_path) not in e.value.message
    assert "Traceback" in caplog.text and "on_read" in caplog.text
    with pytest.raises(gr.Error) as e:
        user_errors(lambda: resolve_model_ref(uuid.uuid4().hex, tmp_path))()
    assert e.value.message.startswith("Unknown run id")  # a UserInputError as it is


def test_failed_ingest_leaves_no_empty_folders(tmp_path):
    fake = tmp_path / "fake.zip"
    fake.write_text("not a zip")
    for workspace in (tmp_path / "new", tmp_path / "existing"):
        if workspace.name == "existing":
            workspace.mkdir()
        with pytest.raises(UserInputError, match="not a zip archive"):
            ingest_dataset(fake, workspace)
    assert not (tmp_path / "new").exists()
    assert list((tmp_path / "existing").iterdir()) == []


# --- the CLI ------------------------------------------------------------------------------------


def user_error_messages() -> list[str]:
    """The literal text of every UserInputError raised in the engine, with '{}' for each placeholder."""
    messages = []
    for path in sorted((ROOT / "mmdemo").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "UserInputError" and node.args:
                parts = node.args[0].values if isinstance(node.args[0], ast.JoinedStr) else [node.args[0]]
                messages.append("".join(p.value if isinstance(p, ast.Constant) and isinstance(p.value, str) else "{}"
                                        for p in parts))
    return messages


def test_cli_messages_speak_of_files_not_of_the_app():
    from mmdemo.__main__ import cli_wording

    messages = user_error_messages()
    assert len(messages) > 50 and any("upload it again" in m for m in messages)
    ui_words = re.compile(r"upload|\btabs?\b|press |click|drop an|reload|button|from the list", re.I)
    assert [m for m in map(cli_wording, messages) if ui_words.search(m)] == []
    assert cli_wording("'x.zip' was not found; upload it again.") == "'x.zip' was not found; check the path."


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mmdemo", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_cli_predict_refuses_a_missing_checkpoint_and_takes_top_k_0(tmp_path):
    for missing in (tmp_path / "gone", "runs/gone"):
        out = cli("predict", "--checkpoint", missing, CIRCLE)
        assert out.returncode == 2 and "was not found" in out.stderr and out.stdout == "", out.stderr
        assert "Traceback" not in out.stderr
    out = cli("predict", "--top-k", "0", CIRCLE, huge_png(tmp_path / "huge.png"), tmp_path / "none.png")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 1 and len(rows[0]["labels"]) == 5
    assert "more than 89,000,000 pixels" in rows[1]["error"]
    assert "cannot read" in rows[2]["error"] and "upload" not in out.stdout
    out = cli("predict", "--top-k", "5000", CIRCLE)
    assert out.returncode == 2 and "top_k must be between 1 and 1000" in out.stderr
    out = cli("train", "--data", tmp_path / "none.zip", "--output-dir", tmp_path / "run")
    assert out.returncode == 2 and "check the path" in out.stderr and "upload" not in out.stderr
    assert not (tmp_path / "run-data").exists() and not (tmp_path / "run").exists()


# --- the real app ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app():
    """The app with its data directory inside its working directory (like the default ./data), so that a
    relative path from there reaches every workspace."""
    data_dir = ROOT / "data" / f"test-{uuid.uuid4().hex[:8]}"
    with AppProcess(data_dir, timeout=90) as server:
        yield server
    shutil.rmtree(data_dir, ignore_errors=True)


def workspace_of(app, client: Client) -> Path:
    return app.data_dir / "users" / hashlib.sha256(f"session:{client.session_hash}".encode()).hexdigest()[:32]


def wait_done(client, run_id, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.predict(run_id=run_id, api_name="/training_status")
        if status["status"] not in ("queued", "running"):
            return status
        time.sleep(1)
    pytest.fail(f"run {run_id} did not finish")


@pytest.fixture(scope="module")
def users(app):
    a, b = Client(app.url, verbose=False), Client(app.url, verbose=False)
    dataset = a.predict(file=handle_file(str(ASSETS / "sample_shapes.zip")), task="classification",
                        api_name="/load_dataset")
    run_id = a.predict(dataset_id=dataset["dataset_id"], max_steps=1, batch_size=8, image_size=64,
                       api_name="/start_training")["run_id"]
    assert wait_done(a, run_id)["status"] == "completed"
    own = b.predict(file=handle_file(str(ASSETS / "sample_shapes.zip")), task="classification",
                    api_name="/load_dataset")
    return a, b, run_id, own["dataset_id"]


def app_error(call) -> str:
    with pytest.raises(AppError) as e:
        call()
    return str(e.value)


def test_another_user_reaches_no_run_by_any_path_spelling(app, users):
    a, b, run_id, b_dataset = users
    run = workspace_of(app, a) / "runs" / run_id
    assert (run / "model" / "mmdemo.json").is_file()
    relative = run.relative_to(ROOT)  # data/test-.../users/<hash>/runs/<id>, from the app's working directory
    spellings = [str(run), str(run / "model"), str(run) + "/", str(relative), f"./{relative}", f"{relative}/model",
                 f"data/../{relative}"]
    image = handle_file(str(CIRCLE))
    for spelling in spellings:
        ghost = spelling.replace(run_id, uuid.uuid4().hex)
        for endpoint, kwargs in (("/start_training", {"dataset_id": b_dataset, "max_steps": 1}),
                                 ("/classify", {"image": image}), ("/caption", {"image": image})):
            field = "base_model" if endpoint == "/start_training" else "checkpoint"
            seen = [app_error(lambda: b.predict(**kwargs, **{field: s}, api_name=endpoint)) for s in (spelling, ghost)]
            assert seen[0] == seen[1] and REFUSED in seen[0] and "data/" not in seen[0], (endpoint, spelling, seen)
    for endpoint, kwargs in (("/start_training", {"dataset_id": b_dataset, "base_model": run_id}),
                             ("/classify", {"image": image, "checkpoint": run_id})):
        assert "Unknown run id" in app_error(lambda: b.predict(**kwargs, api_name=endpoint))
    assert b.predict(api_name="/list_runs") == []
    # Its owner classifies with it by run id.
    assert set(a.predict(image=image, checkpoint=run_id, api_name="/classify")) == {"circle", "rectangle", "triangle"}


def test_api_parameters_are_parsed_or_named(app, users):
    a, b, run_id, b_dataset = users
    for value, text in (("abc", "epochs must be a whole number (got 'abc')"), (1.5, "epochs must be a whole number "
                                                                                     "(got 1.5)")):
        assert text in app_error(lambda: b.predict(dataset_id=b_dataset, epochs=value, api_name="/start_training"))
    message = app_error(lambda: b.predict(dataset_id=b_dataset, epochs="x", batch_size=-2.5, learning_rate="fast",
                                          api_name="/start_training"))
    assert "epochs" in message and "batch_size" in message and "learning_rate" in message
    # Any other setting by its config name, checked like the rest; the app's own fields and unknown names refused
    for settings, text in (({"bogus": 1}, "Unknown training settings: bogus"),
                           ({"data": "/etc", "task": "vqa"}, "settings cannot set data, task"),
                           ({"freeze_early": "sometimes"}, "freeze_early must be one of auto, on, off"),
                           ({"max_steps": 3}, "max_steps given twice"), ("fast", "settings must be a mapping")):
        assert text in app_error(lambda: b.predict(dataset_id=b_dataset, max_steps=1, settings=settings,
                                                   api_name="/start_training"))
    started = b.predict(dataset_id=b_dataset, max_steps="1", batch_size="8", image_size=64.0,
                        settings={"freeze_early": "off", "label_smoothing": "0", "probe_guard": "off"},
                        api_name="/start_training")["run_id"]
    assert wait_done(b, started)["status"] == "completed"
    config = yaml.safe_load((workspace_of(app, b) / "runs" / started / "config.yaml").read_text())
    assert (config["freeze_early"], config["label_smoothing"], config["probe_guard"]) == ("off", 0.0, "off")
    image = handle_file(str(CIRCLE))
    assert len(b.predict(image=image, top_k=0, api_name="/classify")) == 5
    assert len(b.predict(image=image, checkpoint="efficientnet_lite0", top_k=3, api_name="/classify")) == 3
    assert "top_k must be between 1 and 1000" in app_error(lambda: b.predict(image=image, top_k=5000,
                                                                           api_name="/classify"))
    assert "num_beams must be between 1 and 8" in app_error(lambda: b.predict(image=image, num_beams=20,
                                                                            api_name="/caption"))


def test_api_images_over_the_limit_and_unexpected_failures_get_messages(app, users, tmp_path):
    a, b, run_id, _ = users
    huge = huge_png(tmp_path / "huge.png")
    assert "more than 89,000,000 pixels" in app_error(lambda: a.predict(image=handle_file(str(huge)),
                                                                        api_name="/classify"))
    # A run directory damaged on disk: a real unexpected failure of a real endpoint.
    with open(workspace_of(app, a) / "runs" / run_id / "metrics.jsonl", "a") as f:
        f.write("{damaged\n")
    message = app_error(lambda: a.predict(run_id=run_id, api_name="/training_status"))
    assert "Something went wrong on the server (JSONDecodeError)" in message and str(app.data_dir) not in message
    assert "Traceback" in app.log_tail(20000) and "api_training_status" in app.log_tail(20000)
    # The app keeps serving.
    assert len(a.predict(image=handle_file(str(CIRCLE)), top_k=2, api_name="/classify")) == 2
