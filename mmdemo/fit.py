"""Fitting a run to its device's memory: a dry run of real steps, the micro-batch, out-of-memory recovery.

On a GPU (or a simulated one, below) the training child measures before its first step: a few real
forward / backward passes of its own model on its own data give the peak memory and the step time. When
the configured batch does not fit in the device's memory with a margin, a binary search with real steps
(as Ultralytics' AutoBatch) finds the largest micro-batch that does, and each batch is then trained in
that many pieces: the effective batch, the data order and the step count stay what the config says (the
pieces are gradient accumulation inside one step). The same measurement gives the ETA. A batch_size of 0
(config extra ``auto_batch``) is the method's default batch fitted the same way (``AUTO_RULE``): a plan
rather than a warning, said so in the fit record and its message.

A ``torch.OutOfMemoryError`` mid-run (fragmentation, a longer text batch, another process taking memory)
frees what the failed step held, halves the micro-batch (doubles the pieces) and redoes that batch; after
``MAX_HALVINGS`` it stops with the out-of-memory advice.

``SimulatedDevice`` rehearses all of it on the CPU: a memory budget and a cost per sample, accounted in
the model's forward, past which it raises the same ``torch.OutOfMemoryError`` a GPU would. A run asks for
it with ``extra: {simulated_device: {budget_mb, base_mb, per_sample_mb}}`` in its config.
"""

from __future__ import annotations

import gc
import math
import os
import time
from contextlib import nullcontext

import torch

from .errors import UserInputError

MB = 2**20
# Share of the device's memory a run plans to use: the allocator's fragmentation, cuDNN workspaces and
# longer batches than the probe's (text) need the rest.
MARGIN = 0.85
MAX_HALVINGS = 3
# batch_size 0: the method's default batch is the effective batch, in micro-batches of the largest size that
# fits (at most that batch): the learning rate and schedule were tuned for it, and a bigger batch than that
# would change the training (fewer steps, another effective learning rate), not just its speed.
AUTO_RULE = ("effective batch = the method's default batch; micro-batch = the largest that fits (binary search "
             "with real steps), at most that batch; the rest by gradient accumulation")
PROBE_REPEATS = 2  # the first pass pays for lazy initialisation (cuDNN autotuning, kernels): time the second


class OutOfDeviceMemory(UserInputError):
    """Even the smallest micro-batch does not fit, or the run ran out of memory MAX_HALVINGS times."""


def oom_advice(where: str = "GPU memory") -> str:
    return (f"Out of {where}: a batch did not fit. Start a new run with a smaller batch size (e.g. half), a "
            "smaller image size, or the 'lora' or 'head' method (far fewer gradients and optimizer states to "
            "hold). The training process has exited, so its memory is free again.")


class CudaMemory:
    """The CUDA device's memory as this process sees it."""

    simulated = False

    def __init__(self, device):
        self.device = device
        self.name = torch.cuda.get_device_name(device)

    def capacity(self) -> int:
        """What this process can hold: the device's free memory plus what its allocator already reserved."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free + torch.cuda.memory_reserved(self.device))

    def total(self) -> int:
        return int(torch.cuda.mem_get_info(self.device)[1])

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def attach(self, model) -> None:
        pass


class SimulatedDevice:
    """A device of ``budget`` bytes on the CPU: each forward pass with gradients of the model it is
    attached to holds ``base + per_sample x batch`` bytes, and one past the budget raises
    ``torch.OutOfMemoryError`` as CUDA's allocator does. ``fail_at`` forces an error at those forward
    passes (counted from 1), as a fragmented GPU gives one mid-run; with ``fail_rank`` only in that
    process of a multi-process run (RANK)."""

    simulated = True

    def __init__(self, budget: int, base: int, per_sample: int, fail_at=(), fail_rank: int | None = None):
        self.budget, self.base, self.per_sample = int(budget), int(base), int(per_sample)
        mine = fail_rank is None or int(os.environ.get("RANK", "0")) == fail_rank
        self.fail_at, self.calls = set(fail_at) if mine else set(), 0
        self.name = f"simulated device ({budget / 2**30:.2f} GiB)"
        self._peak = 0

    @classmethod
    def from_config(cls, values: dict) -> "SimulatedDevice":
        try:
            rank = values.get("fail_rank")
            return cls(float(values["budget_mb"]) * MB, float(values.get("base_mb", 0)) * MB,
                       float(values["per_sample_mb"]) * MB, [int(v) for v in values.get("fail_at", ())],
                       None if rank is None else int(rank))
        except (KeyError, TypeError, ValueError):
            raise UserInputError("extra.simulated_device needs budget_mb and per_sample_mb (numbers), and "
                                 "optionally base_mb, fail_at (a list of forward-pass numbers) and fail_rank "
                                 "(the process that fails)") from None

    def capacity(self) -> int:
        return self.budget

    total = capacity

    def reset_peak(self) -> None:
        self._peak = 0

    def peak(self) -> int:
        return self._peak

    def synchronize(self) -> None:
        pass

    def release(self) -> None:
        gc.collect()

    def attach(self, model) -> None:
        model.register_forward_pre_hook(self._account, with_kwargs=True)

    def _account(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled():
            return  # evaluation holds no activations for a backward pass
        self.calls += 1
        need = self.base + self.per_sample * batch_length((args, kwargs))
        if need > self.budget or self.calls in self.fail_at:
            raise torch.OutOfMemoryError(f"Simulated: tried to hold {need / MB:.0f} MiB of {self.budget / MB:.0f} MiB")
        self._peak = max(self._peak, need)


def device_memory(cfg, device):
    """The memory the run fits itself to: a simulated device when the config asks for one, CUDA's on a
    GPU, else None (the CPU: memory.check_memory guards it before launch)."""
    simulated = (cfg.extra or {}).get("simulated_device")
    if simulated:
        return SimulatedDevice.from_config(simulated)
    if device.type == "cuda":
        return CudaMemory(device)
    return None


# --- batches in pieces ---------------------------------------------------------------------------


def batch_length(batch) -> int:
    """The number of samples in a batch: the first dimension of its first tensor (0 when none)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else 0
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        n = batch_length(value)
        if n:
            return n
    return 0


def split_batch(batch, parts: int) -> list:
    """``batch`` (a tensor, or a dict / tuple / list of tensors and per-sample lists) cut into ``parts``
    pieces of nearly equal size along the sample dimension; fewer when it holds fewer samples."""
    n = batch_length(batch)
    parts = max(1, min(parts, n or 1))
    bounds = [round(k * n / parts) for k in range(parts + 1)]
    return [_take(batch, n, a, b) for a, b in zip(bounds, bounds[1:])]


def _take(value, n: int, a: int, b: int):
    if isinstance(value, torch.Tensor):
        return value[a:b] if value.ndim and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _take(v, n, a, b) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (torch.Tensor, dict, list, tuple)) and batch_length(v) == n for v in value):
            return type(value)(_take(v, n, a, b) for v in value)  # the parts of a batch: [x, y]
        return value[a:b] if len(value) == n else value  # one entry per sample (texts)
    return value


# --- the fitter ----------------------------------------------------------------------------------


class Fitter:
    """Trains each batch in ``pieces`` and recovers from out-of-memory errors; ``plan`` sets ``pieces``
    from real steps before the first one.

    Args:
        acc: the Accelerator.
        task: the training task (its ``loss``).
        optimizer: zeroed when a failed step is redone.
        memory: ``CudaMemory``, ``SimulatedDevice`` or None (no planning; recovery still applies).
        on_event: called with a dict for each plan and recovery (the metrics log).
    """

    def __init__(self, acc, task, optimizer, memory=None, on_event=None):
        self.acc, self.task, self.optimizer, self.memory = acc, task, optimizer, memory
        self.on_event = on_event or (lambda record: None)
        self.pieces, self.halvings = 1, 0

    # The step's forward and backward passes ---------------------------------------------------

    def backward(self, model, batch, step: int = 0):
        """The loss of ``batch`` (detached, on the device) after its gradients are accumulated, in
        ``self.pieces`` pieces; an out-of-memory error halves the pieces' size and redoes the batch."""
        while True:
            try:
                return self._backward(model, batch)
            except torch.OutOfMemoryError as e:
                error = str(e).splitlines()[0][:200]
            # Outside the except block: the traceback no longer holds the failed step's tensors.
            self._recover(batch, step, error)

    def _backward(self, model, batch):
        pieces = split_batch(batch, self.pieces)
        total, loss_sum = batch_length(batch) or 1, None
        for j, piece in enumerate(pieces):
            last = j == len(pieces) - 1
            # Gradients are averaged across processes once per step, with the last piece.
            with nullcontext() if last or self.acc.num_processes == 1 else self.acc.no_sync(model):
                loss = self.task.loss(model, piece)
                share = (batch_length(piece) or 1) / total
                self.acc.backward(loss * share if len(pieces) > 1 else loss)
            part = loss.detach() * share
            loss_sum = part if loss_sum is None else loss_sum + part
        return loss_sum

    def _recover(self, batch, step: int, error: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.memory is not None:
            self.memory.release()
        else:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        micro = math.ceil(batch_length(batch) / self.pieces)
        many = self.acc.num_processes > 1
        if self.halvings >= MAX_HALVINGS or micro <= 1 or many:
            # Several processes cannot agree on a new size mid-step: the others already wait in the step's
            # gradient all-reduce, a collective the failed one never reaches. The run stops instead.
            suggested = max(1, micro // 2)
            why = (f"after {self.halvings} halvings of the micro-batch (now {micro})" if self.halvings
                   else "on a micro-batch of 1" if micro <= 1 else
                   f"in process {self.acc.process_index} of {self.acc.num_processes} on a micro-batch of {micro}: "
                   "the processes of a multi-process run cannot halve their micro-batches together mid-step, so "
                   f"it stopped. Start a new run with batch_size {suggested}")
            self.on_event({"type": "oom", "step": step, "action": "stop", "error": error, "micro_batch": micro,
                           "suggested_batch_size": suggested, "process": self.acc.process_index})
            raise OutOfDeviceMemory(f"{oom_advice()} (It ran out {why}.)")
        self.pieces *= 2
        self.halvings += 1
        self.on_event({"type": "oom", "step": step, "action": "halved", "error": error,
                       "micro_batch": math.ceil(batch_length(batch) / self.pieces), "pieces": self.pieces})

    # Planning before the first step -----------------------------------------------------------

    def plan(self, model, sample_batch, batch_size: int, total_steps: int, trainable: int,
             auto: bool = False) -> dict | None:
        """Measures real steps on ``sample_batch(n)`` (a batch of n training samples on the device) and
        sets ``pieces`` so that the micro-batch fits: the configured batch when it does, else the largest
        that fits (binary search). ``auto``: the batch is the method's default (batch_size 0), and fitting
        it is the plan, not a warning. Returns the fit record (also passed to on_event), or None without a
        device memory to fit."""
        if self.memory is None:
            return None
        self.memory.attach(self.task.model)
        # The optimizer's two moments (fp32) appear at the first optimizer step: no probe sees them.
        states = 8 * trainable
        capacity = self.memory.capacity()
        budget = MARGIN * capacity - states
        saved = {k: v.detach().clone() for k, v in self.acc.unwrap_model(model).named_buffers()}
        try:
            measured = {}

            def fits(n: int) -> bool:
                measured[n] = self._probe(model, sample_batch(n), repeats=1)
                return measured[n] is not None and measured[n]["peak"] <= budget

            micro = batch_size if fits(batch_size) else self._search(fits, batch_size)
            timing = self._probe(model, sample_batch(micro), repeats=PROBE_REPEATS) if micro else None
        finally:
            with torch.no_grad():  # the probes' BatchNorm statistics are not training's
                for name, buf in self.acc.unwrap_model(model).named_buffers():
                    buf.copy_(saved[name])
            self.optimizer.zero_grad(set_to_none=True)
            self.memory.release()
        if self.acc.num_processes > 1:  # every process trains the same number of pieces
            micro = int(self.acc.gather(torch.tensor([micro], device=self.acc.device)).min().item())
        if not micro or timing is None:
            self.on_event({"type": "fit", "fits": False, "device": self.memory.name, "capacity_bytes": capacity})
            raise OutOfDeviceMemory(f"{oom_advice()} (Not even a batch of 1 fits in the {_gib(capacity)} of "
                                    f"{self.memory.name}.)")
        self.pieces = math.ceil(batch_size / micro)
        micro = math.ceil(batch_size / self.pieces)
        step_s = timing["seconds"] * self.pieces
        record = {"type": "fit", "fits": self.pieces == 1, "device": self.memory.name,
                  "capacity_bytes": capacity, "peak_bytes": timing["peak"] + states,
                  "batch_size": batch_size, "micro_batch": micro, "pieces": self.pieces,
                  "step_s": round(step_s, 6), "eta_s": round(step_s * total_steps, 3),
                  "probes": sorted(measured), "auto": bool(auto)}
        if auto:
            record["rule"] = AUTO_RULE
        record["message"] = fit_message(record)
        self.on_event(record)
        return record

    @staticmethod
    def _search(fits, batch_size: int) -> int:
        """The largest n < batch_size that fits (0 if none), given that batch_size does not."""
        low, high = 0, batch_size  # low fits (0: none known), high does not
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def _probe(self, model, batch, repeats: int) -> dict | None:
        """Peak bytes and seconds of a forward + backward pass on ``batch`` (the last of ``repeats``),
        or None when it runs out of memory. No optimizer step: the weights stay as they are."""
        result = None
        for _ in range(repeats):
            failed = False
            self.memory.reset_peak()
            start = time.perf_counter()
            try:
                with self.acc.no_sync(model) if self.acc.num_processes > 1 else nullcontext():
                    loss = self.task.loss(model, batch)  # the prepared model autocasts as training does
                    loss.backward()
                del loss
                self.memory.synchronize()
                result = {"peak": self.memory.peak(), "seconds": time.perf_counter() - start}
            except torch.OutOfMemoryError:
                failed = True
            self.optimizer.zero_grad(set_to_none=True)
            if failed:
                self.memory.release()
                return None
        return result


def fit_message(record: dict) -> str:
    """The fit record in words: the peak against the device's memory, the micro-batch, the ETA."""
    from .progress import format_duration

    where = f"about {_gib(record['peak_bytes'])} of the {_gib(record['capacity_bytes'])} free on {record['device']}"
    eta = format_duration(record["eta_s"])
    if record.get("auto"):
        how = ("in one pass" if record["pieces"] == 1 else f"as {record['pieces']} micro-batches of "
               f"{record['micro_batch']}, the largest that fits in {_gib(MARGIN * record['capacity_bytes'])} (with "
               "a margin), its gradients accumulated")
        return (f"Automatic batch size: the method's batch of {record['batch_size']} trains {how} on "
                f"{record['device']} ({where}); training steps take about {eta}.")
    if record["pieces"] == 1:
        return f"Fits: {where}, batch {record['batch_size']}; training steps take about {eta}."
    return (f"batch_size {record['batch_size']} does not fit in {_gib(MARGIN * record['capacity_bytes'])} "
            f"(with a margin) on {record['device']}: it trains as {record['pieces']} micro-batches of "
            f"{record['micro_batch']} (same effective batch; {where}); training steps take about {eta}. "
            f"A batch_size of {record['micro_batch']} or less would fit in one pass.")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n < 2**30 else f"{n / 2**30:.1f} GB"


def fitter_for_run(acc, task, model, optimizer, cfg, total_steps: int, trainable: int, writer, run_dir) -> Fitter:
    """The training loop's Fitter, planned on the run's own model and data where the device's memory is
    known; plans and recoveries go to metrics.jsonl and, from the main process, to status.json."""
    from accelerate.utils import send_to_device

    from .config import AUTO_BATCH
    from .runs import write_status

    def on_event(record: dict) -> None:
        writer.write(**record)
        if not acc.is_main_process:
            return
        if record["type"] == "fit" and "message" in record:
            write_status(run_dir, "running", fit=record, fit_message=record["message"],
                         fit_warning="" if record["fits"] or record["auto"] else record["message"])
        elif record["type"] == "oom" and record["action"] == "halved":
            write_status(run_dir, "running", message=(
                f"Ran out of GPU memory at step {record['step']}: continuing with micro-batches of "
                f"{record['micro_batch']} ({record['pieces']} per batch, same effective batch)."))

    def sample_batch(n: int):
        collate = task.collate or torch.utils.data.default_collate
        items = [task.train_ds[i % len(task.train_ds)] for i in range(n)]
        return send_to_device(collate(items), acc.device)

    fitter = Fitter(acc, task, optimizer, device_memory(cfg, acc.device), on_event)
    fitter.plan(model, sample_batch, cfg.batch_size, total_steps, trainable, auto=bool(cfg.extra.get(AUTO_BATCH)))
    return fitter
