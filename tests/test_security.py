"""Security properties checked on the source and on what training writes.

- Nothing in mmdemo/, ui/ or app.py unpickles: `torch.load` only with `weights_only=True`, no `pickle` /
  `joblib` / `dill` loads, no `yaml.load` without a safe loader, no `eval` / `exec`, no `shell=True`.
- `trust_remote_code` is never switched on.
- No token reaches a log or print call.
- A run directory's model/ and checkpoint-*/ hold only safetensors weights and text / image files
  (json, yaml, txt, md, png). The one exception is a checkpoint's `optimizer.pt` (AdamW moments and the
  scheduler state, plain tensors and numbers); it is only ever read back by `_resume` with
  `torch.load(..., weights_only=True)`, which refuses anything but tensors and primitive containers.
- A token given to a push never ends up in a message, a log line or a file.
"""

import ast
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset
from mmdemo.errors import UserInputError
from mmdemo.training import train

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([ROOT / "app.py", *(ROOT / "ui").rglob("*.py"), *(ROOT / "mmdemo").rglob("*.py")])
ALLOWED_SUFFIXES = {".safetensors", ".json", ".yaml", ".txt", ".md", ".png"}
PICKLE_LOADERS = {("pickle", "load"), ("pickle", "loads"), ("cPickle", "load"), ("dill", "load"), ("dill", "loads"),
                  ("joblib", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("pd", "read_pickle"),
                  ("pandas", "read_pickle"), ("torch.jit", "load"), ("shelve", "open"), ("marshal", "loads")}
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def calls():
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield f"{path.relative_to(ROOT)}:{node.lineno}", dotted(node.func), node


def test_sources_are_found():
    assert len(SOURCES) > 10 and any(p.name == "training.py" for p in SOURCES)


def test_no_unpickling_anywhere():
    problems = []
    for where, name, call in calls():
        owner, _, attr = name.rpartition(".")
        if name == "torch.load" and not is_const(keyword(call, "weights_only"), True):
            problems.append(f"{where}: torch.load without weights_only=True")
        if (owner, attr) in PICKLE_LOADERS or name == "pickle.Unpickler":
            problems.append(f"{where}: {name} unpickles")
        if name in ("numpy.load", "np.load") and is_const(keyword(call, "allow_pickle"), True):
            problems.append(f"{where}: {name}(allow_pickle=True)")
        if name == "yaml.load" and "Safe" not in dotted(keyword(call, "Loader") or ast.Name("")):
            problems.append(f"{where}: yaml.load without SafeLoader (use yaml.safe_load)")
        if name in ("eval", "exec"):
            problems.append(f"{where}: {name}()")
        if is_const(keyword(call, "shell"), True):
            problems.append(f"{where}: shell=True")
    assert problems == []
    text = "\n".join(p.read_text() for p in SOURCES)
    assert "import pickle" not in text and "from pickle" not in text


def test_trust_remote_code_is_never_enabled():
    problems = [f"{where}: trust_remote_code={ast.unparse(value)}" for where, _, call in calls()
                if (value := keyword(call, "trust_remote_code")) is not None and not is_const(value, False)]
    problems += [f"{p.relative_to(ROOT)}: a config dict enables it" for p in SOURCES
                 if "\"trust_remote_code\": True" in p.read_text() or "'trust_remote_code': True" in p.read_text()]
    assert problems == []


def test_no_token_is_printed_or_logged():
    problems = []
    for where, name, call in calls():
        if name == "print" or name.rpartition(".")[2] in LOG_METHODS:
            names = {n.id for arg in [*call.args, *(k.value for k in call.keywords)] for n in ast.walk(arg)
                     if isinstance(n, ast.Name)}
            if any("token" in n.lower() for n in names):
                problems.append(f"{where}: {name}(... token ...)")
    assert problems == []


# --- what training writes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full and a LoRA classification run, trained for two steps each."""
    root = tmp_path_factory.mktemp("security")
    for c, name in enumerate(("circle", "square")):
        (root / "raw" / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), (90 * c + 10 * i, 50, 200 - 20 * i)).save(root / "raw" / name / f"{i}.png")
    dataset = ingest_dataset(root / "raw", root / "ws").path
    out = {}
    for method in ("full", "lora"):
        out[method] = root / method
        train(TrainConfig(data=dataset, output_dir=str(out[method]), base_model="test_resnet", pretrained=False,
                          method=method, max_steps=2, epochs=1, batch_size=4, image_size=32))
    return out


@pytest.mark.parametrize("method", ["full", "lora"])
def test_run_directory_weights_are_safetensors(runs, method):
    from safetensors import safe_open

    run = runs[method]
    folders = [run / "model", *sorted(run.glob("checkpoint-*"))]
    assert len(folders) >= 2, "expected model/ and a checkpoint"
    files = [p for folder in folders for p in folder.rglob("*") if p.is_file()]
    unexpected = [str(p.relative_to(run)) for p in files
                  if p.suffix not in ALLOWED_SUFFIXES and not (p.name == "optimizer.pt" and p.parent.name.startswith(
                      "checkpoint-"))]
    assert unexpected == []
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights and any(p.parent.name == "adapter" for p in weights) == (method == "lora")
    for path in weights:
        with safe_open(str(path), "pt") as f:
            assert list(f.keys())
    for path in files:
        if path.suffix in (".json", ".yaml", ".txt", ".md"):
            path.read_text(encoding="utf-8")  # text, not a binary in disguise
    # The exception: optimizer state, which loads with weights_only=True (no code can run).
    for optimizer in run.glob("checkpoint-*/optimizer.pt"):
        state = torch.load(optimizer, weights_only=True)
        assert set(state) == {"optimizer", "scheduler"}


def test_weights_only_refuses_a_pickle_that_runs_code(tmp_path):
    """What weights_only=True buys: a checkpoint crafted to run code on load is refused, not run."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"optimizer": Payload()}, tmp_path / "optimizer.pt", pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert not marker.exists()


def test_a_push_never_leaks_the_token(runs, tmp_path, monkeypatch, caplog, capfd):
    from mmdemo.hub import push_run_api

    token = "hf_" + "Zq8sEcReT" * 4
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(UserInputError) as error:
        push_run_api(runs["full"], "someone/model", token, True)
    out, err = capfd.readouterr()
    assert token not in str(error.value) and token not in caplog.text and token not in out + err
    for path in [*runs["full"].rglob("*"), *tmp_path.rglob("*")]:
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert "token" not in json.dumps(json.loads((runs["full"] / "status.json").read_text())).lower()
