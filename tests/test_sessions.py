"""Users, workspaces and jobs: isolation through the real app, workspace cleanup, a training child killed
(or the app restarted) mid-run and resumed from its checkpoint, and a real out-of-memory failure."""

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageDraw

from mmdemo import jobs, workspace
from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset
from mmdemo.jobs import JobManager, has_active_run, list_runs, new_run_config, run_status
from mmdemo.runs import read_metrics
from mmdemo.workspace import cleanup_workspaces, user_workspace

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
CIRCLE = ASSETS / "examples" / "circle.png"


def shapes(root: Path, per_class=12) -> Path:
    for c, kind in enumerate(("circle", "square")):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (48, 48), (20 * i % 120, 40 * c, 60))
            draw = ImageDraw.Draw(image)
            box = (10 + i % 5, 10, 36, 36 - i % 4)
            draw.ellipse(box, fill="white") if kind == "circle" else draw.rectangle(box, fill="white")
            image.save(root / kind / f"{i}.png")
    return root


def wait_until(predicate, timeout_s: float, what: str, interval=0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout_s} s waiting until {what}")


def is_uuid4_hex(value: str) -> bool:
    return len(value) == 32 and uuid.UUID(hex=value).version == 4 and uuid.UUID(hex=value).hex == value


# --- isolation through the real app (conftest.app_url) ----------------------------------------


def test_ids_are_random_and_another_client_can_reach_none_of_them(app_url):
    a, b = Client(app_url, verbose=False), Client(app_url, verbose=False)
    dataset = a.predict(file=handle_file(str(ASSETS / "sample_shapes.zip")), task="classification",
                        api_name="/load_dataset")
    run_id = a.predict(dataset_id=dataset["dataset_id"], max_steps=1, batch_size=8, image_size=64,
                       api_name="/start_training")["run_id"]
    assert is_uuid4_hex(dataset["dataset_id"]) and is_uuid4_hex(run_id)  # 122 random bits: not guessable

    assert b.predict(api_name="/list_runs") == []
    image = handle_file(str(CIRCLE))
    with pytest.raises(AppError, match="Unknown run id"):
        b.predict(run_id=run_id, repo_id="someone/stolen", token="hf_not_a_real_token", api_name="/push_to_hub")
    with pytest.raises(AppError, match="Unknown run id"):
        b.predict(image=image, checkpoint=run_id, api_name="/caption")
    with pytest.raises(AppError, match="Unknown run id"):
        b.predict(image=image, question="what shape?", checkpoint=run_id, api_name="/answer")
    with pytest.raises(AppError, match="Unknown run id"):
        b.predict(image=image, checkpoint=f"{run_id} · efficientnet_lite0", api_name="/classify")
    with pytest.raises(AppError, match="Unknown dataset id"):
        b.predict(dataset_id=dataset["dataset_id"], api_name="/start_training")
    for path_like in (f"../{run_id}", "/etc/passwd", "~/.cache/huggingface/token", "..\\..\\x"):
        with pytest.raises(AppError, match="run id of yours|Unknown run id"):
            b.predict(image=image, checkpoint=path_like, api_name="/classify")
    assert b.predict(api_name="/list_runs") == []

    # For its owner the same ids work (and stopping the one-step run ends its child soon).
    assert a.predict(run_id=run_id, api_name="/training_status")["run_id"] == run_id
    assert [r["run_id"] for r in a.predict(api_name="/list_runs")] == [run_id]
    assert a.predict(run_id=run_id, api_name="/stop_training")["status"] in ("queued", "running", "stopping",
                                                                             "stopped", "completed")


# --- workspace cleanup ------------------------------------------------------------------------


def age(folder: Path, hours: float) -> None:
    stamp = time.time() - hours * 3600
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (stamp, stamp), follow_symlinks=False)


def make_workspace(key: str, run_status_fields: dict | None = None) -> Path:
    wsp = user_workspace(key)
    (wsp / "datasets" / "d" / "summary.json").parent.mkdir(parents=True)
    (wsp / "datasets" / "d" / "summary.json").write_text("{}")
    if run_status_fields is not None:
        run = wsp / "runs" / uuid.uuid4().hex
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("task: classification\n")
        (run / "status.json").write_text(json.dumps(run_status_fields))
    return wsp


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def live_child(run: Path) -> subprocess.Popen:
    """A live process with a training child's command line for ``run`` (it only sleeps), recorded in its status."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-m", "mmdemo", "train",
                             "--config", str(run / "config.yaml")])
    (run / "status.json").write_text(json.dumps({"status": "running", "pid": proc.pid}))
    return proc


def test_cleanup_removes_old_idle_workspaces_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDEMO_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MMDEMO_WORKSPACE_TTL_HOURS", raising=False)
    old = make_workspace("old")
    finished = make_workspace("finished", {"status": "completed"})
    crashed = make_workspace("crashed", {"status": "running", "pid": dead_pid()})  # the app died with it
    running = make_workspace("running", {"status": "running"})
    live = live_child(next((running / "runs").iterdir()))
    queued = make_workspace("queued", {"status": "queued"})
    recent = make_workspace("recent")
    touched = make_workspace("touched")
    for wsp in (old, finished, crashed, running, queued, recent, touched):
        age(wsp, 100 if wsp != recent else 1)
    (touched / "datasets" / "d" / "summary.json").touch()  # one new file deep inside keeps it
    (tmp_path / "users" / "notes.txt").write_text("not a workspace")
    busy = has_active_run  # judged from the run directories alone (no job manager)

    assert cleanup_workspaces(now=time.time() - 50 * 3600, is_busy=busy) == []  # 50 hours ago none was 72 hours old
    removed = cleanup_workspaces(is_busy=busy)
    assert sorted(removed) == sorted([old, finished, crashed])
    assert not any(p.exists() for p in removed)
    assert all(p.is_dir() for p in (running, queued, recent, touched))
    assert sorted(p.name for p in (tmp_path / "users").iterdir()) == sorted(
        [running.name, queued.name, recent.name, touched.name, "notes.txt"])

    # A queued run that the app's job manager does not hold was queued before a restart: not active.
    assert cleanup_workspaces(is_busy=functools.partial(has_active_run, manager=JobManager(max_concurrent=1))) == [queued]
    monkeypatch.setenv("MMDEMO_WORKSPACE_TTL_HOURS", "200")
    age(recent, 150)
    assert cleanup_workspaces(is_busy=busy) == []
    monkeypatch.setenv("MMDEMO_WORKSPACE_TTL_HOURS", "0")  # 0: keep everything
    age(recent, 10_000)
    assert cleanup_workspaces(is_busy=busy) == []
    live.kill()
    live.wait()


def test_cleanup_without_a_busy_check_keeps_every_workspace_with_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDEMO_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MMDEMO_WORKSPACE_TTL_HOURS", raising=False)
    idle, finished = make_workspace("idle"), make_workspace("finished", {"status": "completed"})
    age(idle, 100)
    age(finished, 100)
    assert cleanup_workspaces() == [idle]
    assert finished.is_dir()


def test_the_app_starts_the_cleanup_with_its_job_manager(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDEMO_DATA_DIR", str(tmp_path))
    import app
    from ui import common

    old, kept = make_workspace("forgotten"), make_workspace("in use")
    age(old, 1000)
    # As in a fresh server process: no job manager yet, so no cleanup thread yet (both restored afterwards).
    monkeypatch.setattr(common, "_manager", None)
    monkeypatch.setattr(workspace, "_cleanup_started", False)
    app.manager()
    wait_until(lambda: not old.exists(), 20, "the app's cleanup thread removed the old workspace")
    assert kept.is_dir()
    assert any(t.name == "mmdemo-cleanup" and t.daemon for t in threading.enumerate())


# --- a training child killed mid-run, the app restarted, resume -------------------------------


def test_killed_child_after_restart_shows_interrupted_and_resumes_to_the_end(tmp_path, monkeypatch):
    """The app (and so its job manager) died along with its SIGKILLed training child. After a restart the
    run directory alone says what happened: the run is listed for its browser as failed/interrupted,
    its last checkpoint is intact, and Resume completes it from that checkpoint."""
    monkeypatch.setenv("MMDEMO_DATA_DIR", str(tmp_path / "data"))
    import app

    browser = uuid.uuid4().hex
    wsp = app.browser_workspace(browser)
    dataset = ingest_dataset(shapes(tmp_path / "raw"), wsp).path
    # 20 epochs of 5 steps: the run must still be going when the test catches it past a checkpoint (on
    # a quiet machine 3 epochs of this tiny model can finish between two polls).
    cfg = new_run_config(wsp, dataset, base_model="test_resnet", pretrained=False, epochs=20, batch_size=4,
                         image_size=64, log_every=1)
    run = Path(cfg.output_dir)
    run.mkdir(parents=True)
    cfg.save(run / "config.yaml")
    child = jobs._launch(run)  # what the app's job manager runs; no manager watches this one

    def trained_past_a_checkpoint():
        latest = run / "latest"
        if not latest.exists():
            return False
        saved = json.loads((run / latest.read_text() / "state.json").read_text())["step"]
        return max((r["step"] for r in read_metrics(run) if r["type"] == "train"), default=0) > saved

    try:
        wait_until(trained_past_a_checkpoint, 120, "an epoch's checkpoint and a step after it", interval=0.02)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()

    # The checkpoint that `latest` names is complete and loads (safetensors; optimizer with weights_only).
    checkpoint = run / (run / "latest").read_text().strip()
    state = json.loads((checkpoint / "state.json").read_text())
    from safetensors.torch import load_file

    assert load_file(checkpoint / "model.safetensors") and state["step"] > 0
    assert set(torch.load(checkpoint / "optimizer.pt", weights_only=True)) == {"optimizer", "scheduler"}

    # "Restarted": the app's job manager never saw this run; its choices list it as failed.
    assert run_status(run, app.manager())["message"].startswith("Interrupted: the app restarted")
    runs = app.on_refresh_choices(browser)[1]["choices"]
    assert (f"{run.name[:8]} · test_resnet · full · failed", run.name) in runs
    assert [r["status"] for r in list_runs(wsp, app.manager())] == ["failed"]

    app.on_resume(browser, run.name)  # the Resume button
    final = wait_until(lambda: (s := app.do_status(wsp, run.name))["status"] not in ("queued", "running") and s,
                       180, "the resumed run finished")
    assert final["status"] == "completed", final
    starts = [r for r in read_metrics(run) if r["type"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] == state["step"]
    assert final["step"] == final["total_steps"] and (run / "model" / "model.safetensors").exists()
    classify_choices = app.on_refresh_choices(browser)[2]["choices"]
    assert (f"{run.name[:8]} · test_resnet · full · completed", run.name) in classify_choices


# --- out of memory ----------------------------------------------------------------------------

CAPPED_CHILD = '''"""Caps a training child's address space, then runs the real CLI (python -m mmdemo train ...).
The heavy imports come first so that the cap is headroom above them, the same on any machine."""
import re, resource, sys

import accelerate, datasets, timm, torch, transformers  # noqa: E401,F401
import mmdemo.tasks, mmdemo.training  # noqa: E401,F401
from mmdemo.__main__ import main

size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
cap = size + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
sys.exit(main(sys.argv[2:]))
'''


def test_out_of_memory_in_the_child_is_reported_with_advice(tmp_path):
    """A batch of 16 images at 1024 px needs about 4 GB more than the 1 GB the child may grow by (the same
    run at 64 px fits): torch's CPU allocator fails for real, and the run fails with advice."""
    dataset = ingest_dataset(shapes(tmp_path / "raw"), tmp_path / "ws").path
    run = tmp_path / "run"
    TrainConfig(data=dataset, output_dir=str(run), base_model="test_resnet", pretrained=False, max_steps=2,
                batch_size=16, image_size=1024).save(tmp_path / "config.yaml")
    (tmp_path / "capped.py").write_text(CAPPED_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MALLOC_ARENA_MAX": "2"}  # fixed thread and arena counts: the same address space on any machine
    out = subprocess.run([sys.executable, str(tmp_path / "capped.py"), "1024", "train", "--config",
                          str(tmp_path / "config.yaml")], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode != 0  # the child exited, which is what frees its (GPU) memory
    assert "can't allocate memory" in out.stderr or "MemoryError" in out.stderr, out.stderr[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["total_steps"] == 2  # it got as far as training
    message = status["message"]
    assert message.startswith("Out of memory: a batch did not fit."), message
    for advice in ("smaller batch size", "smaller image size", "'lora'", "memory is free again"):
        assert advice in message


def test_failure_message_recognises_every_kind_of_allocation_failure():
    from mmdemo.__main__ import _failure_message

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 268435456 bytes. Error code 12 (Cannot allocate memory)")
    worker = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback ... "
                          "DefaultCPUAllocator: can't allocate memory")
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    for error in (cpu, worker, MemoryError(), gpu):
        assert _failure_message(error).startswith("Out of"), error
    assert _failure_message(gpu).startswith("Out of GPU memory")
    assert _failure_message(ValueError("bad")).startswith("Training failed: ValueError: bad")
