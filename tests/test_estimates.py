"""Before launch, the CPU time and peak memory estimates use each task's own measured costs: image + text
classification and retrieval no longer take classification's."""

from types import SimpleNamespace

import pytest

from mmdemo import jobs, memory
from mmdemo.config import TrainConfig

TASKS = ("classification", "image_text_classification", "retrieval")


def _cfg(task, **kw):
    return TrainConfig(data="-", output_dir="-", task=task, **kw)


def test_the_cpu_estimate_follows_each_tasks_costs():
    summary = lambda task: SimpleNamespace(task=task, num_train=400, num_val=100)  # noqa: E731
    seconds = {task: jobs.estimate_cpu_seconds(summary(task), _cfg(task)) for task in TASKS}
    assert len(set(seconds.values())) == len(TASKS)
    # The defaults: 12 epochs of the fusion head evaluated each epoch, 20 of the retrieval projections evaluated
    # 10 times; both tasks compute their frozen encoders' outputs once per row.
    itc = _cfg("image_text_classification")
    assert (itc.epochs, itc.method) == (12, "frozen_encoders")
    train, val = jobs.CPU_COST["image_text_classification"]
    once = jobs.ONCE_COST["image_text_classification"] * 500
    assert seconds["image_text_classification"] == pytest.approx(once + 12 * 400 * train + 12 * 100 * val)
    rt = _cfg("retrieval")
    assert (rt.epochs, rt.method) == (20, "frozen_towers")
    train, val = jobs.CPU_COST["retrieval"]
    assert seconds["retrieval"] == pytest.approx(jobs.ONCE_COST["retrieval"] * 500 + 20 * 400 * train + 10 * 100 * val)
    # Another method of the task has its own costs: locked_image trains MiniLM's top layers in every step.
    locked = _cfg("retrieval", method="locked_image")
    train, val = jobs.CPU_COST[("retrieval", "locked_image")]
    expected = jobs.ONCE_COST[("retrieval", "locked_image")] * 500 + 5 * 400 * train + 5 * 100 * val
    assert jobs.estimate_cpu_seconds(summary("retrieval"), locked) == pytest.approx(expected)
    assert expected > seconds["retrieval"]
    # Classification's full fine-tune of the image network costs more per row than either frozen-encoder task.
    assert seconds["classification"] > max(seconds["image_text_classification"], seconds["retrieval"])
    # Twice the rows: about twice the time.
    double = SimpleNamespace(task="retrieval", num_train=800, num_val=200)
    assert jobs.estimate_cpu_seconds(double, _cfg("retrieval")) == pytest.approx(2 * seconds["retrieval"])


def test_the_memory_estimate_counts_only_what_the_frozen_methods_train():
    parts = {task: memory.estimate(_cfg(task), 250)["parts"] for task in ("image_text_classification", "retrieval")}
    full = memory.estimate(_cfg("image_text_classification", method="full"), 250)["parts"]
    # AdamW's states and gradients for 0.63 M trained parameters (the fusion head), not the encoders' 26 M.
    assert parts["image_text_classification"]["gradients_and_optimizer"] < 20 * 2**20
    assert full["gradients_and_optimizer"] > 300 * 2**20
    assert 10 * 2**20 < parts["retrieval"]["gradients_and_optimizer"] < 20 * 2**20  # 1.1 M: the projections
    locked = memory.estimate(_cfg("retrieval", method="locked_image"), 250)["parts"]
    assert 40 * 2**20 < locked["gradients_and_optimizer"] < 80 * 2**20  # 4.7 M trained parameters
