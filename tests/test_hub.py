"""Sharing: export, model card, push and Space deployment. The network seam (HubClient) is the only
fake: a recording FakeHub stands in for the Hub; everything else (training, export, loading the export
with timm / transformers / peft) runs for real, offline."""

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from test_engine import make_folder, tiny_cfg
from test_vlm import SIDE, build_blip, build_chat_vlm, build_git, picture, write_dataset

from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset
from mmdemo.errors import UserInputError
from mmdemo.hub import (HubClient, add_cli_commands, build_model_card, deploy_space, export_run, push_run,
                        push_run_api, run_cli, space_files)
from mmdemo.inference import answer, caption, classify
from mmdemo.models import load_classifier
from mmdemo.training import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
TOKEN = "hf_SecretTestToken0123456789abcdef"
MODEL_FILES = {"README.md", "config.json", "model.safetensors", "mmdemo.json", "training_config.yaml", "eval.json",
               "loss_curve.png", "confusion_matrix.png"}
ADAPTER_FILES = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
RUN_FILES = {"README.md", "mmdemo.json", "training_config.yaml", "eval.json", "loss_curve.png"}
TRANSFORMERS_FILES = RUN_FILES | {"config.json", "generation_config.json", "model.safetensors", "processor_config.json",
                                  "tokenizer.json", "tokenizer_config.json"}
COMPOSED_FILES = RUN_FILES | {"projection.safetensors", "vision/config.json", "vision/model.safetensors",
                              "text/config.json", "text/generation_config.json", "text/model.safetensors",
                              "text/tokenizer.json", "text/tokenizer_config.json"}


def whoami_info(role="write", scoped=None, user="alice"):
    """A whoami-v2 answer shaped like the Hub's."""
    token = {"displayName": "test", "role": role}
    if scoped is not None:
        token["fineGrained"] = {"canReadGatedRepos": False, "global": ["discussion.write"], "scoped": scoped}
    return {"type": "user", "name": user, "orgs": [{"name": "shapes-lab"}],
            "auth": {"type": "access_token", "accessToken": token}}


class FakeHub:
    """The seam's three calls, recorded; upload_folder keeps the uploaded files' bytes."""

    def __init__(self, info=None):
        self.info, self.calls, self.uploaded = info or whoami_info(), [], {}

    def whoami(self, token):
        self.calls.append(("whoami", token))
        return self.info

    def create_repo(self, repo_id, token, *, repo_type="model", private=None, space_sdk=None):
        self.calls.append(("create_repo", repo_id, repo_type, private, space_sdk))
        return f"https://huggingface.co/{'spaces/' if repo_type == 'space' else ''}{repo_id}"

    def upload_folder(self, repo_id, folder, token, *, repo_type="model", commit_message=""):
        self.calls.append(("upload_folder", repo_id, repo_type))
        files = [p for p in Path(folder).rglob("*") if p.is_file()]
        self.uploaded = {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny full run and a tiny LoRA run (test_resnet, random init, 64 px)."""
    root = tmp_path_factory.mktemp("hub")
    data = ingest_dataset(make_folder(root / "raw", per_class=6), root / "ws").path
    out = {}
    for method in ("full", "lora"):
        train(tiny_cfg(data, root / method, method=method, max_steps=2))
        out[method] = root / method
    out["data"] = data
    return out


@pytest.fixture(scope="module")
def lite0_run(runs, tmp_path_factory):
    """The offline default (efficientnet_lite0, ImageNet weights), one step."""
    run = tmp_path_factory.mktemp("lite0") / "run"
    train(TrainConfig(data=runs["data"], output_dir=str(run), max_steps=1, batch_size=8))
    return run


def front_matter(text: str) -> dict:
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n", 2)[1])


def assert_no_local_paths(folder: Path, *paths):
    """No file of the export (weights and pictures included) holds any of ``paths``."""
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert not [p for p in paths if str(p).encode() in data], (f.name, data[:2000])


# --- export: what is shared, and that it loads without mmdemo ---------------------------------


def test_export_loads_with_timm_and_transformers_and_has_a_valid_card(runs, tmp_path):
    from huggingface_hub import ModelCard
    from timm import create_model
    from transformers import pipeline

    run, out = runs["full"], tmp_path / "export"
    files = export_run(run, out)
    assert set(files) == MODEL_FILES == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    # The same weights as mmdemo's own classifier, through timm's loader.
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = load_classifier(run / "model").eval()(x)
        assert torch.allclose(create_model(f"local-dir:{out}", pretrained=True).eval()(x), expected, atol=1e-5)
    pipe = pipeline("image-classification", model=str(out))
    assert {r["label"] for r in pipe(Image.open(ROOT / "assets/examples/circle.png"))} == {"circle", "square"}

    card = ModelCard.load(out / "README.md")  # the Hub's own parser
    report = json.loads((run / "eval.json").read_text())
    meta = card.data.to_dict()
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert meta["license"] == "apache-2.0" and {"image-classification", "mmdemo", "full"} <= set(meta["tags"])
    assert "base_model" not in meta and "datasets" not in meta  # test_resnet from scratch, a local dataset
    assert card.data.eval_results[0].metric_type == "accuracy"
    assert card.data.eval_results[0].metric_value == report["accuracy"]
    assert meta["model-index"][0]["results"][0]["task"]["type"] == "image-classification"
    for needle in ("| circle |", "| square |", "![loss curve](loss_curve.png)",
                   "![confusion matrix](confusion_matrix.png)", "learning_rate:"):
        assert needle in card.text
    with Image.open(out / "loss_curve.png") as png:
        assert png.format == "PNG" and png.width > 200
    config = yaml.safe_load((out / "training_config.yaml").read_text())
    assert config["data"] == "" and config["output_dir"] == "" and config["base_model"] == "test_resnet"
    assert config["method"] == "full" and config["image_size"] == 64
    assert_no_local_paths(out, run, runs["data"], tmp_path)


def test_lora_export_adapter_loads_with_peft_and_equals_the_merged_model(runs, tmp_path):
    from accelerate.utils import set_seed
    from peft import PeftModel
    from timm import create_model

    out = tmp_path / "lora"
    assert set(export_run(runs["lora"], out)) == MODEL_FILES | ADAPTER_FILES
    merged = create_model(f"local-dir:{out}", pretrained=True).eval()
    # The run's base: test_resnet's random init under the training seed (set_seed(0) before the build).
    # LoRA training keeps BatchNorm statistics frozen, so base + adapter alone must equal the merged model.
    set_seed(0)
    base = create_model("test_resnet", pretrained=False, num_classes=2)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert any("lora_A" in name for name, _ in adapted.named_parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(adapted(x), merged(x), atol=1e-4)
    assert json.loads((out / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert {"peft", "lora"} <= set(front_matter((out / "README.md").read_text())["tags"])
    # --merged: the merged model only.
    assert set(export_run(runs["lora"], tmp_path / "merged", merged=True)) == MODEL_FILES
    assert "peft" not in front_matter((tmp_path / "merged/README.md").read_text())["tags"]
    with pytest.raises(UserInputError, match="not empty"):
        export_run(runs["lora"], out)


def test_default_model_export_predicts_what_mmdemo_predicts(lite0_run, tmp_path):
    from transformers import pipeline

    out = tmp_path / "lite0"
    export_run(lite0_run, out)
    meta = front_matter((out / "README.md").read_text())
    assert "base_model" not in meta  # efficientnet_lite0 is an offline alias, not a Hub id
    assert yaml.safe_load((out / "training_config.yaml").read_text())["base_model"] == "efficientnet_lite0"
    pipe = pipeline("image-classification", model=str(out))
    for name in ("circle.png", "rectangle.png", "triangle.png", "cat.jpg"):
        image = Image.open(ROOT / "assets/examples" / name).convert("RGB")
        ours = classify(image, lite0_run)
        theirs = {r["label"]: r["score"] for r in pipe(image)}
        assert max(theirs, key=theirs.get) == max(ours, key=ours.get), (name, ours, theirs)
        assert all(abs(theirs[k] - ours[k]) < 0.03 for k in ours), (name, ours, theirs)


def test_card_names_hub_ids_only_and_no_local_paths(runs, tmp_path):
    def run_with(base_model, data, pretrained=True):
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        shutil.copytree(runs["full"], run)
        cfg = {**yaml.safe_load((run / "config.yaml").read_text()), "base_model": base_model, "data": data,
               "pretrained": pretrained}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        meta = json.loads((run / "model/mmdemo.json").read_text())
        (run / "model/mmdemo.json").write_text(json.dumps({**meta, "base_model": base_model}))
        return run

    hub = build_model_card(run_with("google/vit-base-patch16-224", "shapes-lab/shapes"), "alice/shapes")
    assert hub.data.base_model == "google/vit-base-patch16-224" and hub.data.datasets == ["shapes-lab/shapes"]
    assert 'model="alice/shapes"' in hub.text and "data: shapes-lab/shapes" in hub.text
    assert build_model_card(run_with("resnet18", runs["data"])).data.base_model == "timm/resnet18.a1_in1k"
    # A dataset ingested from the Hub: the card names the Hub id its summary.json records, never the folder.
    from_hub = tmp_path / "from-hub"
    shutil.copytree(runs["data"], from_hub)
    summary = json.loads((from_hub / "summary.json").read_text())
    (from_hub / "summary.json").write_text(json.dumps({**summary, "source": "shapes-lab/shapes"}))
    card = build_model_card(run_with("resnet18", str(from_hub)))
    assert card.data.datasets == ["shapes-lab/shapes"] and str(from_hub) not in str(card)
    assert build_model_card(run_with("resnet18", runs["data"])).data.datasets is None  # an upload
    prefixed = build_model_card(run_with("hf-hub:timm/resnet18.a1_in1k@main", "x"))
    assert prefixed.data.base_model == "timm/resnet18.a1_in1k"
    assert build_model_card(run_with("google/vit-base-patch16-224", "x", pretrained=False)).data.base_model is None

    local_model = tmp_path / "my-local-model"
    local_model.mkdir()
    run = run_with(str(local_model), runs["data"])
    out = tmp_path / "out"
    export_run(run, out)
    assert "base_model" not in front_matter((out / "README.md").read_text())
    assert json.loads((out / "mmdemo.json").read_text())["base_model"] == ""
    assert yaml.safe_load((out / "training_config.yaml").read_text())["base_model"] == ""
    assert_no_local_paths(out, local_model, runs["data"], run, tmp_path)


# --- push: checks first, then exactly the export goes through the seam --------------------------


def test_push_uploads_the_export_through_the_seam(runs):
    hub = FakeHub()
    result = push_run(runs["lora"], "shapes-clf", token=TOKEN, api=hub)
    assert result["repo_id"] == "alice/shapes-clf" and result["url"] == "https://huggingface.co/alice/shapes-clf"
    assert hub.calls == [("whoami", TOKEN), ("create_repo", "alice/shapes-clf", "model", True, None),
                         ("upload_folder", "alice/shapes-clf", "model")]
    assert set(hub.uploaded) == set(result["files"]) == MODEL_FILES | ADAPTER_FILES
    assert 'model="alice/shapes-clf"' in hub.uploaded["README.md"].decode()
    assert not [name for name, data in hub.uploaded.items() if TOKEN.encode() in data]
    assert TOKEN not in json.dumps(result)

    hub = FakeHub()
    assert push_run_api(runs["full"], "shapes-lab/public", TOKEN, private=False, api=hub) == {
        "url": "https://huggingface.co/shapes-lab/public", "files": sorted(MODEL_FILES)}
    assert hub.calls[1] == ("create_repo", "shapes-lab/public", "model", False, None)


@pytest.mark.parametrize("repo_id, info, message", [
    ("alice/x", whoami_info("read"), "read-only for 'alice'"),
    ("alice/x", whoami_info("fineGrained", [{"entity": {"type": "org", "name": "shapes-lab"},
                                             "permissions": ["repo.write"]}]), "read-only for 'alice'"),
    ("someone-else/x", whoami_info("write"), "belongs to 'alice'"),
    ("not a/valid//id", whoami_info("write"), "valid repo id"),
    ("", whoami_info("write"), "valid repo id"),
])
def test_push_refuses_with_a_message_that_names_the_fix(runs, repo_id, info, message):
    hub = FakeHub(info)
    with pytest.raises(UserInputError, match=message) as err:
        push_run(runs["full"], repo_id, token=TOKEN, api=hub)
    assert TOKEN not in str(err.value)
    assert not [c for c in hub.calls if c[0] != "whoami"]  # nothing created, nothing uploaded


def test_fine_grained_token_with_repo_write_may_push(runs):
    hub = FakeHub(whoami_info("fineGrained", [{"entity": {"type": "user", "name": "alice"},
                                                 "permissions": ["repo.content.read", "repo.write"]}]))
    assert push_run(runs["full"], "alice/x", token=TOKEN, api=hub)["repo_id"] == "alice/x"


def test_push_refuses_runs_without_a_model_and_shared_apps_without_a_token(runs, tmp_path, monkeypatch):
    hub = FakeHub()
    with pytest.raises(UserInputError, match="holds no trained model"):
        push_run(tmp_path, "alice/x", token=TOKEN, api=hub)
    monkeypatch.setenv("SPACE_ID", "alice/mmdemo")
    monkeypatch.setenv("HF_TOKEN", "hf_the_space_owners_token")
    with pytest.raises(UserInputError, match="your own Hugging Face write token"):
        push_run_api(runs["full"], "alice/x", "", api=hub)
    assert hub.calls == []


def test_token_comes_from_the_argument_then_hf_token_then_the_cached_login(tmp_path):
    script = """
import os
from pathlib import Path
from mmdemo.errors import UserInputError
from mmdemo.hub import resolve_token
try:
    resolve_token("")
except UserInputError as e:
    print("none:", e)
Path(os.environ["HF_TOKEN_PATH"]).write_text("hf_cached")
print("cached:", resolve_token(""))
os.environ["HF_TOKEN"] = "hf_env"
print("env:", resolve_token(""), "arg:", resolve_token(" hf_arg "))
"""
    env = {k: v for k, v in ENV.items() if k != "HF_TOKEN"}
    env.update(HF_HOME=str(tmp_path), HF_TOKEN_PATH=str(tmp_path / "token"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "none: No Hugging Face token" in out.stdout and "hf auth login" in out.stdout
    assert "cached: hf_cached" in out.stdout and "env: hf_env arg: hf_arg" in out.stdout


def test_real_seam_says_hub_unreachable_offline_quickly(runs):
    script = f"""
from mmdemo.hub import push_run
from mmdemo.errors import UserInputError
try:
    push_run({str(runs['full'])!r}, "alice/x", token={TOKEN!r})
except UserInputError as e:
    print("error:", e)
"""
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "error: Hub unreachable" in out.stdout, out.stdout + out.stderr[-2000:]
    assert TOKEN not in out.stdout + out.stderr
    assert time.monotonic() - start < 30


def test_the_fake_has_the_real_seams_signatures():
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for name in ("whoami", "create_repo", "upload_folder"):
        assert params(getattr(FakeHub, name)) == params(getattr(HubClient, name)), name


# --- Space ---------------------------------------------------------------------------------------


def test_space_settings_are_the_readme_front_matter():
    settings = yaml.safe_load((ROOT / "Space.yaml").read_text())
    assert front_matter((ROOT / "README.md").read_text()) == settings
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    assert settings["sdk"] == "gradio" and settings["sdk_version"] == pins["gradio"]
    assert settings["app_file"] == "app.py" and settings["python_version"] == "3.11"
    assert settings["title"] == "mmdemo" and len(settings["short_description"]) <= 60


def test_space_deploy_uploads_only_what_the_space_needs():
    hub = FakeHub()
    result = deploy_space("mmdemo", token=TOKEN, api=hub)
    assert hub.calls == [("whoami", TOKEN), ("create_repo", "alice/mmdemo", "space", None, "gradio"),
                         ("upload_folder", "alice/mmdemo", "space")]
    files = set(hub.uploaded)
    assert files == set(result["files"]) == set(space_files()) | {"README.md"}
    assert {"app.py", "requirements.txt", "README.md", "mmdemo/__init__.py", "mmdemo/hub/__init__.py",
            "mmdemo/vlm/__init__.py", "ui/__init__.py", "ui/common.py", "assets/sample_shapes.zip"} <= files
    assert all(f.endswith(".py") for f in files if f.startswith(("mmdemo/", "ui/")))
    assert not [f for f in files if f.split("/")[0] in ("tests", ".venv", "data", "bench", ".git", "scripts")
                or "__pycache__" in f]
    assert front_matter(hub.uploaded["README.md"].decode()) == yaml.safe_load((ROOT / "Space.yaml").read_text())


# --- CLI ----------------------------------------------------------------------------------------


def cli(argv):
    parser = argparse.ArgumentParser(prog="python -m mmdemo")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train")
    add_cli_commands(sub)
    return parser.parse_args(argv)


def test_cli_commands(runs, tmp_path, capsys):
    assert run_cli(cli(["train"])) is None  # not ours: __main__ goes on
    assert run_cli(cli(["export", str(runs["full"]), str(tmp_path / "out")])) == 0
    assert set(json.loads(capsys.readouterr().out)["files"]) == MODEL_FILES
    hub = FakeHub()
    assert run_cli(cli(["push", str(runs["full"]), "alice/x", "--public", "--token", TOKEN]), api=hub) == 0
    assert hub.calls[1] == ("create_repo", "alice/x", "model", False, None)
    assert run_cli(cli(["push", str(runs["lora"]), "alice/y", "--merged", "--token", TOKEN]), api=hub) == 0
    assert hub.calls[-2] == ("create_repo", "alice/y", "model", True, None) and set(hub.uploaded) == MODEL_FILES
    assert run_cli(cli(["space", "deploy", "alice/demo", "--token", TOKEN]), api=hub) == 0
    assert hub.calls[-2][2:] == ("space", None, "gradio")
    assert run_cli(cli(["push", str(runs["full"]), "alice/x", "--token", TOKEN]), api=FakeHub(whoami_info("read"))) == 2
    out, err = capsys.readouterr()
    assert "error: This token is read-only" in err and TOKEN not in out + err


@pytest.mark.skipif("add_cli_commands" not in (ROOT / "mmdemo/__main__.py").read_text(),
                    reason="the hub commands are not wired into mmdemo/__main__.py yet")
def test_cli_export_in_a_subprocess(runs, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mmdemo", "export", str(runs["full"]), str(tmp_path / "out")],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert set(json.loads(out.stdout.strip().splitlines()[-1])["files"]) == MODEL_FILES
    again = subprocess.run([sys.executable, "-m", "mmdemo", "export", str(runs["full"]), str(tmp_path / "out")],
                           env=ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "not empty" in again.stderr


# --- captioning and VQA: transformers folders, and the composed offline default -----------------


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """Two-step runs: tiny BLIP, GIT and chat-VLM (Idefics3) captioners and a tiny BLIP VQA model (test_vlm's
    builders), and the offline default captioner (EfficientNet-Lite0 + MiniLM) at 64 px."""
    root = tmp_path_factory.mktemp("text")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small only lose from a second thread on a busy machine
    try:
        data = {task: write_dataset(root / task, task) for task in ("captioning", "vqa")}
        bases = {"blip": build_blip(root / "base-blip", vqa=False), "git": build_git(root / "base-git"),
                 "vlm": build_chat_vlm(root / "base-vlm"), "blip-vqa": build_blip(root / "base-blip-vqa", vqa=True)}
        runs = {"root": root}
        for key, task, method in (("blip", "captioning", "frozen_vision"), ("git", "captioning", "full"),
                                  ("vlm", "captioning", "lora"), ("blip-vqa", "vqa", "full"),
                                  ("composed", "captioning", "full")):
            runs[key] = root / f"run-{key}"
            train(TrainConfig(task=task, data=data[task], output_dir=str(runs[key]), base_model=bases.get(key, ""),
                              method=method, max_steps=2, batch_size=4, image_size=64 if key == "composed" else 0))
        yield runs
    finally:
        torch.set_num_threads(threads)


def card_metrics(out: Path) -> tuple[dict, dict]:
    """The card's metadata as the Hub's own parser reads it, and its model-index metrics by name."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results and {r.task_type for r in card.data.eval_results} == {"image-text-to-text"}
    return card.data.to_dict(), {r.metric_name: r.metric_value for r in card.data.eval_results}


def pipeline_call(family: str, image_path: Path) -> dict:
    """The card's own pipeline call per family: GIT continues "[CLS]" as it was fine-tuned to (a plain
    text="" adds a [SEP]); a chat model gets mmdemo's captioning prompt as a chat message."""
    if family == "blip":
        return {"images": str(image_path), "text": ""}
    if family == "git":
        return {"images": str(image_path), "text": "[CLS]", "add_special_tokens": False, "return_full_text": False}
    prompt = "Describe this image in a few words."  # mmdemo's captioning prompt for chat models
    content = [{"type": "image", "url": str(image_path)}, {"type": "text", "text": prompt}]
    return {"text": [{"role": "user", "content": content}], "return_full_text": False}


@pytest.mark.parametrize("family", ["blip", "git", "vlm"])
def test_caption_export_says_in_the_pipeline_what_mmdemo_says(text_runs, tmp_path, family):
    from transformers import pipeline

    run, out = text_runs[family], tmp_path / family
    files = export_run(run, out, repo_id="alice/captions")
    # The vlm run is a LoRA run: its adapter goes up beside the merged model.
    expected = TRANSFORMERS_FILES | ({"chat_template.jinja"} | ADAPTER_FILES if family == "vlm" else set())
    assert set(files) == expected == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    pipe = pipeline("image-text-to-text", model=str(out))
    with torch.inference_mode():
        for i, color in enumerate(("red", "blue")):
            image = picture(color, i).resize((SIDE, SIDE))
            image.save(tmp_path / f"{color}.png")
            ours = caption(image, run)  # greedy, 30 new tokens
            theirs = pipe(**pipeline_call(family, tmp_path / f"{color}.png"), max_new_tokens=30)
            assert ours and theirs[0]["generated_text"].strip() == ours, (ours, theirs)

    meta, metrics = card_metrics(out)
    report = json.loads((run / "eval.json").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"image-captioning", "mmdemo", family} <= set(meta["tags"]) and "base_model" not in meta
    assert metrics == {"BLEU-4": report["bleu4"], "ROUGE-L": report["rouge_l"], "CIDEr": report["cider"]}
    assert meta["metrics"] == ["bleu", "rouge", "cider"]
    text = (out / "README.md").read_text()
    for needle in (f"| BLEU-4 | {report['bleu4']:.4f} |", f"| CIDEr | {report['cider']:.4f} |", "### Examples",
                   "| 0 | a red shape / something red |", "![loss curve](loss_curve.png)", "task: captioning",
                   'pipeline("image-text-to-text", model="alice/captions")'):
        assert needle in text, needle
    assert yaml.safe_load((out / "training_config.yaml").read_text())["base_model"] == ""  # a local folder
    assert json.loads((out / "mmdemo.json").read_text())["base_model"] == ""
    assert_no_local_paths(out, text_runs["root"], tmp_path)


def test_blip_vqa_export_answers_with_blip_for_question_answering(text_runs, tmp_path):
    from transformers import BlipForQuestionAnswering, BlipProcessor

    run, out = text_runs["blip-vqa"], tmp_path / "vqa"
    assert set(export_run(run, out)) == TRANSFORMERS_FILES
    processor, model = BlipProcessor.from_pretrained(out), BlipForQuestionAnswering.from_pretrained(out).eval()
    with torch.inference_mode():
        for color, question in (("green", "what color?"), ("yellow", "what is in the picture?")):
            image = picture(color).resize((SIDE, SIDE))
            inputs = processor(images=image, text=question, return_tensors="pt")
            theirs = processor.decode(model.generate(**inputs, max_new_tokens=10)[0], skip_special_tokens=True)
            ours = answer(image, question, run)
            assert ours and theirs.strip() == ours, (ours, theirs)

    meta, metrics = card_metrics(out)
    report = json.loads((run / "eval.json").read_text())
    assert meta["pipeline_tag"] == "image-text-to-text" and "visual-question-answering" in meta["tags"]
    assert metrics == {"VQA accuracy": report["vqa_accuracy"], "exact match": report["exact_match"]}
    assert [m["type"] for m in meta["model-index"][0]["results"][0]["metrics"]] == ["accuracy", "exact_match"]
    text = (out / "README.md").read_text()
    assert "| row | question | reference | predicted |" in text and "| 0 | what color? | red |" in text
    assert "BlipForQuestionAnswering.from_pretrained" in text
    assert_no_local_paths(out, text_runs["root"], tmp_path)


def test_composed_export_parts_load_with_timm_and_transformers(text_runs, tmp_path):
    import timm
    from transformers import BertLMHeadModel, BertTokenizerFast

    from mmdemo.vlm import load_image_text_model

    run, out = text_runs["composed"], tmp_path / "composed"
    assert set(export_run(run, out)) == COMPOSED_FILES
    ours = load_image_text_model(run / "model").eval()
    encoder = timm.create_model(f"local-dir:{out / 'vision'}", pretrained=True).eval()
    decoder = BertLMHeadModel.from_pretrained(out / "text").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(encoder.forward_features(x), ours.encoder.forward_features(x))
    theirs = decoder.state_dict()
    assert decoder.config.is_decoder and decoder.config.add_cross_attention
    assert all(torch.equal(theirs[k], v) for k, v in ours.decoder.state_dict().items())
    assert BertTokenizerFast.from_pretrained(out / "text")("a red shape").input_ids == \
        ours.tokenizer("a red shape").input_ids
    image = picture("red")
    assert caption(image, out) == caption(image, run)  # mmdemo loads the export folder as it is

    meta, metrics = card_metrics(out)
    report = json.loads((run / "eval.json").read_text())
    assert meta["library_name"] == "mmdemo" and meta["pipeline_tag"] == "image-text-to-text"
    assert meta["license"] == "apache-2.0" and "base_model" not in meta  # an offline alias, not a Hub id
    assert metrics == {"BLEU-4": report["bleu4"], "ROUGE-L": report["rouge_l"], "CIDEr": report["cider"]}
    text = (out / "README.md").read_text()
    for needle in ('timm.create_model(f"local-dir:{folder}/vision", pretrained=True)',
                   'BertLMHeadModel.from_pretrained(f"{folder}/text")', "from mmdemo.inference import caption",
                   "projection.safetensors", "64 px"):
        assert needle in text, needle
    assert yaml.safe_load((out / "training_config.yaml").read_text())["base_model"] == "efficientnet_lite0+minilm"
    assert_no_local_paths(out, text_runs["root"], tmp_path, sys.prefix)


def test_push_of_a_captioning_run_uploads_exactly_its_export(text_runs, tmp_path):
    hub = FakeHub()
    result = push_run(text_runs["git"], "alice/git-captions", token=TOKEN, api=hub)
    assert hub.calls == [("whoami", TOKEN), ("create_repo", "alice/git-captions", "model", True, None),
                         ("upload_folder", "alice/git-captions", "model")]
    exported = export_run(text_runs["git"], tmp_path / "export", repo_id="alice/git-captions")
    assert sorted(hub.uploaded) == result["files"] == exported
    assert {name: data for name, data in hub.uploaded.items()} == \
        {name: (tmp_path / "export" / name).read_bytes() for name in exported}
    assert not [name for name, data in hub.uploaded.items() if TOKEN.encode() in data]
