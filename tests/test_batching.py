"""Concurrent classify calls share one forward pass (mmdemo.batcher) and each gets its own, correct result."""

import io
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from mmdemo.batcher import Batcher
from mmdemo.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [ROOT / "assets/examples" / name for name in ("cat.jpg", "coffee.jpg", "rocket.jpg", "circle.png")]
TOLERANCE = 1e-5 + 1e-9  # scores are rounded to 5 decimals: one float ulp of a different batch may move the last


def _queued(batcher: Batcher, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(batcher._waiting) < n:
        assert time.monotonic() < deadline, f"{len(batcher._waiting)} of {n} calls queued"
        time.sleep(0.01)


def _concurrently(batcher: Batcher, lock: threading.Lock, calls: list, queued: int | None = None) -> list:
    """Runs each ``calls`` function in a thread of its own while ``lock`` (the batcher's) is held, until
    ``queued`` of them (default all) wait in the batcher; then lets them go. Returns each call's result or
    exception, in order."""
    out = [None] * len(calls)

    def run(i):
        try:
            out[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with lock:
        for t in threads:
            t.start()
        _queued(batcher, len(calls) if queued is None else queued)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return out


# --- the batcher alone ------------------------------------------------------------------------------


def test_waiting_calls_of_a_key_run_as_one_batch_and_keys_never_mix():
    lock = threading.Lock()
    batcher, seen = Batcher(lock), []

    def double(key):
        def run(items):
            seen.append((key, list(items)))
            return [(key, item * 2) for item in items]
        return run

    runs = {"a": double("a"), "b": double("b")}  # one run function per key, as the engine gives
    keys = ["a", "b", "a", "a", "b", "a"]
    calls = [lambda k=k, i=i: batcher.submit(k, runs[k], i) for i, k in enumerate(keys)]
    assert _concurrently(batcher, lock, calls) == [(k, 2 * i) for i, k in enumerate(keys)]
    assert sorted(len(items) for _, items in seen) == [2, 4]  # one batch per key
    assert all({k for k, _ in seen} == {"a", "b"} and all(keys[i] == k for i in items) for k, items in seen)
    assert batcher._waiting == [] and not batcher._busy


def test_a_failing_item_fails_only_its_caller():
    lock = threading.Lock()
    batcher, batches = Batcher(lock), []

    def inverse(items):
        batches.append(len(items))
        return [1 / item for item in items]  # 0 fails the whole batch: each item then runs alone

    out = _concurrently(batcher, lock, [lambda i=i: batcher.submit("k", inverse, i) for i in (1, 0, 4)])
    assert out[0] == 1 and out[2] == 0.25 and isinstance(out[1], ZeroDivisionError)
    assert batches == [3, 1, 1, 1]


def test_a_batch_is_bounded_by_max_rows_and_the_oldest_key_goes_first():
    lock = threading.Lock()
    batcher, order = Batcher(lock, max_rows=4), []

    def run(key):
        return lambda items: order.append((key, sum(items))) or list(items)

    runs = {k: run(k) for k in "ab"}
    plan = [("a", 3), ("b", 1), ("a", 2), ("a", 1), ("b", 1)]  # rows; a's 3 + 1 fit, its 2 waits
    out = _concurrently(batcher, lock, [lambda k=k, r=r: batcher.submit(k, runs[k], r, rows=r) for k, r in plan])
    assert out == [r for _, r in plan]
    assert order == [("a", 4), ("b", 2), ("a", 2)]


def test_an_idle_call_runs_at_once_in_its_own_thread():
    batcher, threads = Batcher(), []
    before = threading.active_count()
    result = batcher.submit("k", lambda items: threads.append(threading.current_thread()) or items, "x")
    assert result == "x" and threads == [threading.current_thread()]
    assert threading.active_count() == before and batcher.batch_sizes == [1]


# --- the real classifier: the offline default and a second checkpoint -----------------------------


@pytest.fixture(scope="module")
def images():
    return [Image.open(p).convert("RGB") for p in EXAMPLES]


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(abs(a[k] - b[k]) <= TOLERANCE for k in a)


def test_concurrent_calls_give_what_sequential_calls_give(images):
    from mmdemo import inference

    inputs = [(images[i % len(images)], 1 + i % 5) for i in range(8)]
    sequential = [inference.classify(image, top_k=k) for image, k in inputs]
    before = len(inference.batcher.batch_sizes)
    out = _concurrently(inference.batcher, inference._lock,
                        [lambda image=image, k=k: inference.classify(image, top_k=k) for image, k in inputs])
    assert inference.batcher.batch_sizes[before:] == [8]  # all eight in one forward
    for got, want, (_, k) in zip(out, sequential, inputs):
        assert isinstance(got, dict) and len(got) == k and _same(got, want), (got, want)
    assert "cat" in next(iter(out[0]))


def test_a_bad_image_among_concurrent_calls_fails_only_its_caller(images):
    from mmdemo import inference

    truncated = Image.open(io.BytesIO(EXAMPLES[0].read_bytes()[:2000]))  # its pixels fail to decode
    inputs = [images[0], None, images[1], truncated, images[2]]
    out = _concurrently(inference.batcher, inference._lock,
                        [lambda image=image: inference.classify(image, top_k=3) for image in inputs], queued=3)
    assert isinstance(out[1], UserInputError) and "No image given" in str(out[1])
    assert isinstance(out[3], OSError)
    for i in (0, 2, 4):
        assert _same(out[i], inference.classify(inputs[i], top_k=3))


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory):
    """A saved classifier of another architecture and label set (random weights: only its labels matter)."""
    import torch

    from mmdemo.models import build_classifier, save_classifier

    torch.manual_seed(0)
    clf, _ = build_classifier("test_resnet", ["red", "green", "blue"], pretrained=False)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_classifier(clf, path)
    return str(path)


def test_calls_for_two_checkpoints_stay_apart(images, second_checkpoint):
    from mmdemo import inference

    inputs = [(images[i % len(images)], None if i % 2 else second_checkpoint) for i in range(6)]
    sequential = [inference.classify(image, ckpt, top_k=3) for image, ckpt in inputs]
    before = len(inference.batcher.batch_sizes)
    out = _concurrently(inference.batcher, inference._lock,
                        [lambda image=image, ckpt=ckpt: inference.classify(image, ckpt, top_k=3) for image, ckpt in inputs])
    assert sorted(inference.batcher.batch_sizes[before:]) == [3, 3]
    for got, want, (_, ckpt) in zip(out, sequential, inputs):
        assert _same(got, want), (got, want)
        assert set(got) <= {"red", "green", "blue"} if ckpt else not set(got) & {"red", "green", "blue"}


def test_image_text_calls_batch_with_their_own_texts(images, tmp_path):
    from mmdemo import inference
    from mmdemo.fusion import LATE_MODEL, FusedClassifier

    model = FusedClassifier.build(["yes", "no", "red", "blue"], LATE_MODEL)
    model.save(tmp_path / "fused")
    ckpt = str(tmp_path / "fused")
    texts = ["what colour is it?", "is there a cat in this photo of a room?", "shape?", "is it blue?"]
    sequential = [inference.classify(image, ckpt, 4, text) for image, text in zip(images, texts)]
    before = len(inference.batcher.batch_sizes)
    out = _concurrently(inference.batcher, inference._lock,
                        [lambda image=image, t=t: inference.classify(image, ckpt, 4, t) for image, t in zip(images, texts)]
                        + [lambda: inference.classify(images[0], ckpt, 4, "")], queued=4)
    assert inference.batcher.batch_sizes[before:] == [4]  # the call without its text never reached the model
    assert isinstance(out[4], UserInputError) and "type the text" in str(out[4])
    for got, want in zip(out, sequential):
        assert _same(got, want), (got, want)


# --- the served app loads its classifier before the first call ------------------------------------


def test_the_served_app_preloads_the_default_classifier(tmp_path, monkeypatch):
    from appserver import AppProcess

    from mmdemo import settings

    with AppProcess(tmp_path / "data") as app:
        deadline = time.monotonic() + 90
        while "libtorch" not in Path(f"/proc/{app.proc.pid}/maps").read_text():
            assert time.monotonic() < deadline, f"torch never loaded in the served app; its log:\n{app.log_tail()}"
            time.sleep(0.5)
        assert "Preloading the default classifier failed" not in app.log_tail()
    assert settings.preload()
    monkeypatch.setenv("MMDEMO_PRELOAD", "0")
    assert not settings.preload()


def test_status_reads_never_queue_behind_inference():
    """Each inference endpoint has a group of its own, bounded; status reads and the page's ticks none."""
    import app

    fns = {fn.api_name: fn for fn in app.demo.fns.values()}
    inference = [fns[name] for name in ("classify", "caption", "answer", "on_classify", "on_caption", "on_answer")]
    status = [fns[name] for name in ("training_status", "stop_training", "list_runs", "bakeoff_status", "on_tick")]
    assert all(fn.concurrency_limit is None for fn in status)
    assert all(fn.concurrency_limit in (4, "default") for fn in inference)
    assert not {fn.concurrency_id for fn in status} & {fn.concurrency_id for fn in inference}


def test_a_training_child_leaves_a_core_to_the_server():
    from mmdemo import settings

    cores = len(os.sched_getaffinity(0))
    assert settings.job_settings({})["threads"] == max(1, cores - 1)
    assert settings.job_settings({"MMDEMO_TRAIN_THREADS": "3"})["threads"] == 3
