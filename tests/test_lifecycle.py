"""Training children live and die with the app: SIGTERM stops them at a checkpoint, a crashed app's
children are adopted by the next one; recycled pids are told apart; the memory guard before launch and
the child's own memory limit. Real app processes (tests/appserver.py), real training runs."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from mmdemo import procs, settings
from appserver import AppProcess
from mmdemo.config import TrainConfig
from mmdemo.data import ingest_dataset
from mmdemo.jobs import JobManager, child_alive, start_training
from mmdemo.runs import read_status_file
from mmdemo.runs import checkpoint_step
from mmdemo.errors import UserInputError

sys.path.insert(0, str(Path(__file__).parent))
from test_sessions import shapes, wait_until  # noqa: E402

GRACE_S = 30


def shapes_zip(tmp_path: Path, per_class=24) -> str:
    root = shapes(tmp_path / "raw", per_class=per_class)
    path = tmp_path / "shapes.zip"
    with zipfile.ZipFile(path, "w") as z:
        for image in root.rglob("*.png"):
            z.write(image, image.relative_to(root))
    return str(path)


def session(url: str, session_hash: str | None = None) -> Client:
    """A gradio_client session; the same hash reaches the same workspace on a restarted app."""
    client = Client(url, verbose=False)
    if session_hash:
        client.session_hash = session_hash
    return client


def start_long_run(client: Client, zip_path: str, max_steps: int) -> str:
    dataset = client.predict(file=handle_file(zip_path), task="classification", api_name="/load_dataset")
    # The default (offline) classifier at 64 px, batch 4: 9 steps and a checkpoint per epoch.
    return client.predict(dataset_id=dataset["dataset_id"], epochs=40, max_steps=max_steps, batch_size=4,
                          image_size=64, api_name="/start_training")["run_id"]


def run_dir_of(data_dir: Path, run_id: str) -> Path:
    return next(data_dir.glob(f"users/*/runs/{run_id}"))


def status_of(client: Client, run_id: str) -> dict:
    return client.predict(run_id=run_id, api_name="/training_status")


def past_first_checkpoint(client, run_dir, run_id):
    return checkpoint_step(run_dir) and status_of(client, run_id)["step"] > checkpoint_step(run_dir)


def wait_finished(client, run_id, timeout_s=300) -> dict:
    return wait_until(lambda: (s := status_of(client, run_id))["status"] not in ("queued", "running", "stopping") and s,
                      timeout_s, f"run {run_id[:8]} finished", interval=1)


def test_sigterm_stops_the_child_at_a_checkpoint_and_a_new_app_resumes_it(tmp_path):
    data = tmp_path / "data"
    zip_path = shapes_zip(tmp_path)
    app = AppProcess(data, env={"MMDEMO_STOP_GRACE_S": str(GRACE_S)})
    try:
        client = session(app.url)
        run_id = start_long_run(client, zip_path, 90)
        run_dir = run_dir_of(data, run_id)
        wait_until(lambda: past_first_checkpoint(client, run_dir, run_id), 180, "a checkpoint and a step after it", 0.5)
        pid = read_status_file(run_dir)["pid"]
        status = read_status_file(run_dir)
        assert child_alive(run_dir, status)

        app.proc.send_signal(signal.SIGTERM)
        app.proc.wait(timeout=GRACE_S + 30)
        # The child had exited (on its own, at a step boundary) by the time the app did.
        assert not procs.is_training_child(pid, status["pid_start"], run_dir / "config.yaml")
    finally:
        app.stop()
    final = read_status_file(run_dir)
    assert final["status"] == "stopped", final
    assert final["message"].startswith("Stopped by a termination signal"), final["message"]
    step = checkpoint_step(run_dir)
    assert step and f"checkpoint at step {step} is kept" in final["message"]
    assert "did not stop within" not in final["message"]
    assert "Stopping training runs" in app.log_tail()

    with AppProcess(data) as again:
        client = session(again.url, client.session_hash)
        assert status_of(client, run_id)["status"] == "stopped"
        client.predict(run_id=run_id, api_name="/resume_training")
        done = wait_finished(client, run_id, 400)
        assert done["status"] == "completed", done
        assert done["step"] == done["total_steps"]
    starts = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in starts if r["type"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] == step


def test_children_of_a_killed_app_are_adopted_counted_stopped_and_resumed(tmp_path):
    data = tmp_path / "data"
    zip_path = shapes_zip(tmp_path)
    env = {"MMDEMO_MAX_JOBS": "1"}
    first = AppProcess(data, env=env)
    client = session(first.url)
    run_id = start_long_run(client, zip_path, 300)  # long enough to be stopped on a quiet machine
    run_dir = run_dir_of(data, run_id)
    wait_until(lambda: status_of(client, run_id)["step"] > 0, 180, "the run trains", 0.5)
    first.proc.send_signal(signal.SIGKILL)  # no handler runs: the child is orphaned, still training
    first.proc.wait()
    status = read_status_file(run_dir)
    assert child_alive(run_dir, status)

    try:
        with AppProcess(data, env=env) as second:
            client = session(second.url, client.session_hash)
            seen = status_of(client, run_id)
            assert seen["status"] == "running", seen
            wait_until(lambda: status_of(client, run_id)["step"] > seen["step"], 60, "the adopted run's step advances")

            assert [r["run_id"] for r in client.predict(api_name="/list_runs")] == [run_id]  # the same workspace
            dataset = client.predict(file=handle_file(zip_path), task="classification", api_name="/load_dataset")
            second_run = client.predict(dataset_id=dataset["dataset_id"], max_steps=2, batch_size=4, image_size=64,
                                        api_name="/start_training")["run_id"]
            for _ in range(5):  # the adopted child holds the only slot
                assert status_of(client, second_run)["status"] == "queued"
                assert status_of(client, run_id)["status"] == "running"
                time.sleep(1)

            client.predict(run_id=run_id, api_name="/stop_training")
            stopped = wait_finished(client, run_id, 120)
            assert stopped["status"] == "stopped", stopped
            wait_until(lambda: not child_alive(run_dir, status), 60, "the adopted child exited")
            # Its slot is free: the queued run starts and completes.
            assert wait_finished(client, second_run, 300)["status"] == "completed"

            client.predict(run_id=run_id, api_name="/resume_training")
            done = wait_finished(client, run_id, 600)
            assert done["status"] == "completed" and done["step"] == done["total_steps"], done
    finally:
        os.kill(status["pid"], signal.SIGKILL) if child_alive(run_dir, status) else None


def test_a_recycled_pid_or_a_dead_child_is_not_a_live_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = run / "config.yaml"
    config.write_text("task: classification\n")
    # A process with the run's command line (it only sleeps): the start time tells it apart.
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "mmdemo", "train",
                             "--config", str(config)])
    try:
        start = procs.process_start_time(fake.pid)
        # Between fork and exec the child still shows this process's command line: wait for the exec.
        wait_until(lambda: procs.is_training_child(fake.pid, start, config), 10, "the fake child's exec", 0.05)
        assert not procs.is_training_child(fake.pid, start + 1, config)  # the same pid, another process
        assert not procs.is_training_child(fake.pid, start, tmp_path / "other" / "config.yaml")
        assert not procs.is_training_child(os.getpid(), None, config)  # pytest: not a training command
        assert procs.live_children(tmp_path) == {}
    finally:
        fake.kill()
        fake.wait()
    assert not procs.is_training_child(fake.pid, start, config)
    assert procs.process_start_time(fake.pid) is None


def test_settings_parse_the_memory_limit_and_threads():
    total = 16 * 2**30
    assert procs.parse_memory_limit("0.5", total) == 8 * 2**30
    assert procs.parse_memory_limit("4096", total) == 4096 * 2**20
    assert procs.parse_memory_limit("2gb", total) == 2 * 2**30
    assert procs.parse_memory_limit("off", total) is None
    cfg = settings.job_settings({"MMDEMO_JOB_MEMORY_LIMIT": "1500mb", "MMDEMO_TRAIN_THREADS": "1"})
    assert cfg["memory_limit"] == 1500 * 2**20 and cfg["threads"] == 1
    env = procs.child_env({}, cfg)
    assert env["OMP_NUM_THREADS"] == "1" and env[procs.CHILD_LIMIT_ENV] == str(1500 * 2**20)
    assert env[procs.CHILD_NICE_ENV] == "10"


def test_a_child_in_a_session_of_its_own_yields_the_cpu_as_a_whole():
    """A training child starts a session of its own (jobs._launch); where Linux groups the scheduler by
    session (autogroups), its thread niceness alone would not yield to the server: the child's limits raise
    its autogroup's niceness too."""
    code = ("import os; from mmdemo.procs import apply_child_limits; apply_child_limits(); "
            "print(os.nice(0)); print((open('/proc/self/autogroup').read().strip() or 'none') "
            "if os.path.exists('/proc/self/autogroup') else 'none')")
    env = procs.child_env({**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                          settings.job_settings({"MMDEMO_TRAIN_THREADS": "1"}))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         start_new_session=True)
    assert out.returncode == 0, out.stderr
    nice, group = out.stdout.strip().splitlines()
    assert nice == str(procs.CHILD_NICE)
    if group != "none":  # a kernel with autogroups: the child's own group, at the child's niceness
        assert group.endswith(f"nice {procs.CHILD_NICE}"), group
        # The kernel prints nothing for a task whose scheduler group is a cgroup's (as in some containers)
        ours = Path("/proc/self/autogroup").read_text().split() if Path("/proc/self/autogroup").exists() else []
        if ours:
            assert group.split()[0] != ours[0]
    assert procs.lower_autogroup(5, path=str(Path("/nonexistent") / "autogroup")) is False


# --- memory ------------------------------------------------------------------------------------


def test_the_estimate_refuses_an_absurd_run_with_the_numbers(tmp_path):
    dataset = ingest_dataset(shapes(tmp_path / "raw"), tmp_path / "ws").path
    cfg = TrainConfig(data=dataset, output_dir=str(tmp_path / "run"), image_size=1024, batch_size=512)
    with pytest.raises(UserInputError, match=r"needs about \d+\.\d GB of memory \(batch_size 512 at image_size 1024\)"
                                             r", but .* \d+\.\d GB\. Try batch_size \d+"):
        start_training(cfg, JobManager(max_concurrent=1, root=tmp_path))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_out_of_memory_under_the_child_limit_fails_alone_with_advice(tmp_path, monkeypatch):
    """The child's own RLIMIT_DATA (MMDEMO_JOB_MEMORY_LIMIT) stops a run that needs more: it fails with
    the out-of-memory advice and no word of a checkpoint, and the job manager goes on to the next run."""
    monkeypatch.setenv("MMDEMO_JOB_MEMORY_LIMIT", "2500mb")
    dataset = ingest_dataset(shapes(tmp_path / "raw"), tmp_path / "ws").path
    manager = JobManager(max_concurrent=1, root=tmp_path)
    big, small = tmp_path / "big", tmp_path / "small"
    for run, size, batch in ((big, 1024, 64), (small, 64, 4)):
        run.mkdir()
        TrainConfig(data=dataset, output_dir=str(run), base_model="test_resnet", pretrained=False, max_steps=2,
                    batch_size=batch, image_size=size).save(run / "config.yaml")
        manager.submit(run)  # (not start_training: its estimate would refuse the big one before launch)
    failed = wait_until(lambda: (s := read_status_file(big))["status"] not in ("queued", "running") and s, 240,
                        "the big run ended")
    assert failed["status"] == "failed", failed
    assert failed["message"].startswith("Out of memory: a batch did not fit."), failed["message"]
    assert "checkpoint" not in failed["message"].lower()
    done = wait_until(lambda: (s := read_status_file(small))["status"] not in ("queued", "running") and s, 240,
                      "the small run ended")
    assert done["status"] == "completed", done
