"""The shape of the code base, locked: the engine never imports gradio, the page and the job manager load
no torch, mmdemo's modules import each other without a circle, and only mmdemo/settings.py reads the
MMDEMO_* environment variables. Each check reads the real sources (or imports them in a fresh process)."""

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmdemo.config import TrainConfig, param_fields

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "mmdemo"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}


def top_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported: the module body, its if / try blocks and
    class bodies, but not function bodies (lazy imports, which run only when called)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        else:
            stack.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))


def imported_names(node, importer: str, is_package: bool) -> list[str]:
    """The dotted modules an import statement names (``from .x import y``: ``pkg.x`` and ``pkg.x.y``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = ".".join(p for p in (package, node.module) if p)
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """mmdemo module -> the mmdemo modules it imports at import time."""
    modules = engine_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set()
        for node in top_level_imports(tree):
            for target in imported_names(node, name, path.name == "__init__.py"):
                # ``from . import x`` inside a package names the package itself: not an edge back to it
                if target in modules and target != name and not name.startswith(target + "."):
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_engine_modules_import_each_other_without_a_circle():
    graph = import_graph()
    assert {"mmdemo.runs", "mmdemo.jobs", "mmdemo.api", "mmdemo.settings"} <= set(graph)
    assert "mmdemo.training" not in graph["mmdemo.jobs"] and "mmdemo.jobs" not in graph["mmdemo.workspace"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_engine_never_imports_gradio():
    offenders = []
    for name, path in engine_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n == "gradio" or n.startswith(("gradio.", "gradio_client")) for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def loaded_after(statement: str, **env) -> dict:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("statement", ["import app", "import ui", "import mmdemo.jobs", "import mmdemo.api",
                                       "import mmdemo.runs, mmdemo.settings, mmdemo.workspace, mmdemo.config",
                                       "import mmdemo.hub, mmdemo.data"])
def test_the_page_and_the_job_manager_load_no_torch(statement):
    modules = loaded_after(statement)
    assert "torch" not in modules
    assert "gradio" in modules if statement.startswith(("import app", "import ui")) else "gradio" not in modules


def test_a_page_load_loads_no_torch(tmp_path, monkeypatch):
    """What a page load runs: the browser id, the dropdown choices, the newest run, a timer tick on it."""
    from mmdemo.workspace import user_workspace

    monkeypatch.setenv("MMDEMO_DATA_DIR", str(tmp_path))
    run = user_workspace("browser:b1") / "runs" / ("0" * 32)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("task: classification\nbase_model: resnet18\nmethod: full\n")
    (run / "status.json").write_text(json.dumps({"status": "stopped", "total_steps": 4}))
    (run / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "epoch": 0.5, "loss": 1.0,
                                                   "time": 1.0}) + "\n")
    modules = loaded_after("import app, ui; b = app.on_load_browser('b1'); app.on_refresh_choices(b); "
                           "assert ui.on_restore_run(b)['value'] == '0' * 32; app.on_tick(b, '0' * 32, '')",
                           MMDEMO_DATA_DIR=str(tmp_path))
    assert "torch" not in modules and "mmdemo.jobs" in modules


def test_import_mmdemo_is_light_and_its_public_names_load_on_use():
    modules = loaded_after("import mmdemo")
    assert not {"mmdemo.api", "mmdemo.jobs", "yaml", "torch"} & modules
    import mmdemo

    assert set(mmdemo.__all__) >= {"ingest", "start", "status", "stop", "resume", "list_runs", "classify", "caption",
                                   "answer", "push", "export", "TrainConfig"}
    assert all(callable(getattr(mmdemo, name)) for name in mmdemo.__all__)
    # A submodule named like a public call replaces it on the package once anything imports the submodule.
    import pkgutil

    clashes = {m.name for m in pkgutil.iter_modules(mmdemo.__path__)} & set(mmdemo.__all__)
    assert not clashes, f"mmdemo submodules shadow public calls once imported: {clashes}"
    with pytest.raises(AttributeError):
        mmdemo.no_such_call  # noqa: B018


def environ_reads(tree: ast.Module):
    """Line numbers of os.environ / os.getenv reads whose key is an MMDEMO_* literal or a variable."""
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv") and node.args:
            key = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            key = node.slice
        if key is not None and not (isinstance(key, ast.Constant) and not str(key.value).startswith("MMDEMO_")):
            yield node.lineno, ast.unparse(key)


def test_only_settings_reads_mmdemo_environment_variables():
    sources = [ROOT / "app.py", *(ROOT / "ui").rglob("*.py"), *ENGINE.rglob("*.py")]
    offenders = [f"{p.relative_to(ROOT)}:{line} ({key})" for p in sources if p != ENGINE / "settings.py"
                 for line, key in environ_reads(ast.parse(p.read_text()))]
    assert offenders == []
    import mmdemo.settings

    documented = mmdemo.settings.__doc__
    read = {key.strip("'\"") for _, key in environ_reads(ast.parse((ENGINE / "settings.py").read_text()))}
    names = {k for k in read if k.startswith("MMDEMO_")} | set(mmdemo.settings.UPLOAD_LIMITS)
    assert names and all(f"``{n}``" in documented for n in names)
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{n}`" in readme for n in names)


def test_every_training_parameter_is_a_train_flag_with_help():
    from mmdemo.__main__ import main

    out = subprocess.run([sys.executable, "-m", "mmdemo", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    for f in param_fields():
        assert f.metadata.get("help"), f"{f.name} has no help text"
        assert "--" + f.name.replace("_", "-") in out.stdout
    assert "--no-augment" in out.stdout and "--no-pretrained" in out.stdout
    assert {f.name for f in dataclasses.fields(TrainConfig)} - {f.name for f in param_fields()} == {"extra"}
    assert main(["train", "--data", "d"]) == 2  # the missing --output-dir is named, not a traceback


def test_the_train_tab_sets_training_parameters_by_field_name():
    import gradio as gr

    from ui.train_tab import build_train_tab

    with gr.Blocks():
        fields = build_train_tab(gr.State(""))[1]
    assert set(fields) <= {f.name for f in param_fields()}
    assert {"base_model", "method", "epochs", "learning_rate", "image_size", "augment"} <= set(fields)


def test_form_values_take_the_field_types_and_blanks_the_defaults():
    from mmdemo.config import TrainConfig, form_params
    from mmdemo.errors import UserInputError

    params = form_params({"epochs": 3.0, "learning_rate": 1, "method": "", "image_size": None, "augment": False,
                          "base_model": "resnet18"})
    assert params == {"epochs": 3.0, "learning_rate": 1, "augment": False, "base_model": "resnet18"}
    cfg = TrainConfig(data="d", output_dir="o", **params)
    assert (cfg.epochs, cfg.learning_rate, cfg.augment, cfg.method, cfg.image_size) == (3, 1.0, False, "full", 0)
    assert type(cfg.epochs) is int and type(cfg.learning_rate) is float
    with pytest.raises(UserInputError, match="Unknown training settings: colour"):
        form_params({"colour": "red"})
    with pytest.raises(UserInputError, match="epochs must be a whole number"):
        TrainConfig(data="d", output_dir="o", **form_params({"epochs": "many"}))
