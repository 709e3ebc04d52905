"""The training loop: accelerate, metrics.jsonl, checkpoints (mmdemo.checkpoints), cooperative stop, resume.

It writes the run directory whose contract (file names, readers, atomic writers) is ``mmdemo.runs``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from . import tracking
from .config import TrainConfig, auto_epochs
from .errors import UserInputError
from .memory import peak_memory_mb
from .fit import Fitter, fitter_for_run
from .models import count_parameters
from .procs import process_start_time
from .recipe import use_keep_best
from .progress import dumps
from .checkpoints import resume_checkpoint, save_checkpoint
from .runs import CONFIG_FILE, EVAL_FILE, METRICS_FILE, STOP_FILE, write_json_atomic, write_status
from .tasks import make_task

class MetricsWriter:
    """Appends one JSON line per event and flushes it, so a poller sees each step as it happens;
    ``listener`` (the CLI's progress output) gets each record too."""

    def __init__(self, path: Path, enabled: bool, listener=None):
        self.file = open(path, "a", buffering=1) if enabled else None
        self.listener = listener

    def write(self, **record) -> None:
        if self.file:
            record = {**record, "time": round(time.time(), 3)}
            self.file.write(dumps(record) + "\n")
            self.file.flush()
            if self.listener:
                self.listener(record)

    def close(self) -> None:
        if self.file:
            self.file.close()


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, so a resumed run replays the same order and can skip ahead."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def _precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"  # fp32 on the CPU: bf16 autocast there is slower and less accurate


def loader_workers(cfg: TrainConfig, num_processes: int = 1) -> int:
    """DataLoader workers per process. Automatic (-1): none on the CPU, where the training step already
    uses every core; with a GPU, the spare cores (up to 4 per process). Augmentation runs per image at
    about 2,000 images/s per core at 224 px (bench/input_pipeline.py), below what one GPU trains, so
    in the training process alone it would make the GPU wait."""
    if cfg.num_workers >= 0:
        return cfg.num_workers
    if not torch.cuda.is_available():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, num_processes) - 1))


def log_interval(cfg: TrainConfig) -> int:
    """Steps between metrics lines. Automatic (0): every step on the CPU, where a step takes long and
    reading the loss costs nothing; every 10 on a GPU, where reading it (``.item()``) waits for the
    device and stops the host from queueing the next step. The line gives the mean loss since the last."""
    return cfg.log_every or (10 if torch.cuda.is_available() else 1)


class LossDiverged(UserInputError):
    """The training loss became NaN or infinite: the run cannot recover, a new one needs a smaller step."""


def train(cfg: TrainConfig, on_record=None) -> dict:
    """Trains per ``cfg`` into ``cfg.output_dir``; returns the final evaluation.

    Resumes from the run directory's latest checkpoint when there is one. Stops cleanly at the next
    step boundary once ``output_dir/STOP`` exists, saving a checkpoint and a usable model. Raises
    ``LossDiverged`` (the run marked failed) when the loss stops being a finite number.

    Args:
        on_record: called in the main process with every record written to metrics.jsonl.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .data import load_splits

    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # cpu=True on a machine without a GPU: only then does accelerate join torchrun's CPU processes
    # (gloo) instead of running each as a world of its own.
    acc = Accelerator(mixed_precision=_precision(cfg), gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                      cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    if torch.cuda.is_available():  # TF32 for whatever runs in fp32 (outside autocast, or precision "no")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed)
    task = make_task(cfg, load_splits(cfg.data))
    # Keeping the best evaluation: tasks scored by accuracy, on a validation split big enough to trust.
    keep_best = task.main_metric == "accuracy" and use_keep_best(cfg.keep_best, len(task.val_ds))
    cfg = replace(cfg, image_size=task.image_size, epochs=cfg.epochs or auto_epochs(len(task.train_ds), cfg.batch_size, cfg.method),
                  keep_best="on" if keep_best else "off", **getattr(task, "resolved", {}))
    if main:
        _save_config(cfg, run_dir / CONFIG_FILE)

    sampler = EpochSampler(len(task.train_ds), cfg.seed)
    workers = loader_workers(cfg, acc.num_processes)
    loader_kw = dict(batch_size=cfg.batch_size, num_workers=workers, collate_fn=task.collate,
                     pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    train_loader = torch.utils.data.DataLoader(task.train_ds, sampler=sampler,
                                               drop_last=len(task.train_ds) > cfg.batch_size, **loader_kw)
    val_loader = torch.utils.data.DataLoader(task.val_ds, shuffle=False, **loader_kw)

    trainable, total = count_parameters(task.model)
    optimizer = _optimizer(task.model, cfg)
    train_loader, val_loader = acc.prepare(train_loader, val_loader)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.gradient_accumulation_steps))
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = _scheduler(optimizer, cfg, total_steps)
    model, optimizer, scheduler = acc.prepare(task.model, optimizer, scheduler)
    state = resume_checkpoint(run_dir, acc, optimizer, scheduler)

    listener = tracking.listener(cfg, run_dir.name, on_record) if main else on_record  # + trackio when set
    writer = MetricsWriter(run_dir / METRICS_FILE, main, listener)
    if main:  # metrics: a resumed run's headline is its own final evaluation, not its predecessor's
        write_status(run_dir, "running", total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                     pid=os.getpid(), pid_start=process_start_time(os.getpid()), message="", started=time.time(),
                     main_metric=task.main_metric, metrics={})
    writer.write(type="start", step=state["step"], total_steps=total_steps, epochs=cfg.epochs, task=cfg.task,
                 trainable_params=trainable, total_params=total, num_processes=acc.num_processes,
                 device=str(acc.device), precision=acc.mixed_precision, resumed=state["step"] > 0,
                 num_workers=workers,
                 images_per_step=cfg.batch_size * cfg.gradient_accumulation_steps * acc.num_processes)
    # A phase before the loop (LP-FT's head fit), on a fresh run only: a resumed one has its weights.
    phase = task.before_training(acc.unwrap_model(model)) if state["step"] == 0 and hasattr(task, "before_training") else {}
    # The pretrained network's linear probe, the model kept at the end where it scores at least as high (recipe.PROBE_FILE).
    probe = task.probe_candidate(model, val_loader, acc, run_dir) if state["step"] == 0 and hasattr(
        task, "probe_candidate") else {}
    if probe:
        writer.write(type="phase", name="probe", step=0, **probe)

    # On a GPU: the micro-batch that fits, measured with real steps (mmdemo/fit.py).
    fitter = fitter_for_run(acc, task, model, optimizer, cfg, total_steps, trainable, writer, run_dir)
    loop = _Loop(acc, task, model, optimizer, scheduler, train_loader, val_loader, sampler, writer, cfg, run_dir,
                 total_steps, state, fitter)
    if phase:  # the head phase's model is a candidate for the best too (scored in this record, not an eval)
        scored = loop._note_best(task.report(model, val_loader, acc, 0)[task.main_metric]) if loop.keep_best else {}
        writer.write(type="phase", name="head", step=0, **phase, **scored)
    outcome = loop.run()
    # The last evaluation is the final one unless a step (or a stop) came after it.
    result = loop.report
    if not result or result["step"] != loop.step:
        result = task.report(model, val_loader, acc, loop.step)
    if outcome == "completed" and loop.keep_best and loop.best is not None and result[task.main_metric] < loop.best:
        from .recipe import load_best

        acc.wait_for_everyone()
        if load_best(run_dir, acc.unwrap_model(model), acc.device):  # the best evaluation's weights
            result = task.report(model, val_loader, acc, loop.best_step)
    message = "Stopped by request; the model so far is saved." if outcome == "stopped" else ""
    if outcome == "completed" and hasattr(task, "keep_probe") and task.keep_probe(acc.unwrap_model(model), result, run_dir):
        tuned = result[task.main_metric]
        result = {**task.report(model, val_loader, acc, loop.step), "kept": "linear_probe", "finetuned_accuracy": tuned}
        message = (f"The pretrained network's linear probe scored {result['accuracy']:.3f} on validation, the fine-tuned "
                   f"network {tuned:.3f}: the model saved is the probe (the pretrained network with a fitted head"
                   f"{'; of two equals, the simpler' if result['accuracy'] == tuned else ''}).")
    if main:
        _save_model(task, acc.unwrap_model(model), run_dir, result)
        write_json_atomic(run_dir / EVAL_FILE, result)
        writer.write(type="end", status=outcome, step=loop.step, samples_per_rank=loop.samples_per_rank,
                     peak_memory_mb=peak_memory_mb())
        headline = {k: result[k] for k in ("val_loss", task.main_metric, "accuracy", "exact_match",
                                           *getattr(task, "headline_metrics", ())) if k in result}
        write_status(run_dir, outcome, message=message, finished=time.time(), metrics=headline)
    writer.close()
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _save_config(cfg: TrainConfig, path: Path) -> None:
    # Unchanged on a resume: the file's time is the run's creation time in the run list.
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if not path.exists() or path.read_text() != text:
        cfg.save(path)


def _optimizer(clf, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales (1-D tensors): decaying them only hurts.
    decay, no_decay = [], []
    for p in clf.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused AdamW on the GPU and on the CPU alike: on the CPU it steps the text default's 27 M
    # parameters in 19 ms instead of 105 ms for the per-parameter loop (bench/RESULTS.md).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, fused=True)


def _scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.lr_schedule == "one-cycle":  # torch's defaults: what bench/recipes.py's naive fine-tune uses
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, [g["lr"] for g in optimizer.param_groups],
                                                   total_steps=max(1, total_steps))
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)


class _Loop:
    """The epoch / step loop with its state; the task supplies loss and evaluation."""

    def __init__(self, acc, task, model, optimizer, scheduler, train_loader, val_loader, sampler, writer, cfg,
                 run_dir, total_steps, state, fitter=None):
        self.fitter = fitter or Fitter(acc, task, optimizer)
        self.acc, self.task, self.model, self.optimizer, self.scheduler = acc, task, model, optimizer, scheduler
        self.train_loader, self.val_loader, self.sampler, self.writer = train_loader, val_loader, sampler, writer
        self.cfg, self.run_dir, self.total_steps = cfg, run_dir, total_steps
        self.log_every = log_interval(cfg)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best, self.bad_epochs = state.get("best"), state.get("bad_epochs", 0)
        self.best_step = state.get("best_step", 0)
        # Classification evaluates every epoch and may end on the best one's weights (recipe.save_best).
        self.keep_best = cfg.keep_best == "on"
        self.samples_per_rank = [0] * acc.num_processes
        self.samples = 0
        self.report = None  # the latest evaluation's full report
        self.last_checkpoint = time.time()
        # Generating text for a whole validation split costs more than an epoch of a small caption
        # set: text tasks evaluate about max_evals times per run, classification every epoch.
        self.eval_every = max(1, math.ceil(cfg.epochs / task.max_evals))

    def run(self) -> str:
        while self.step < self.total_steps and self.epoch < self.cfg.epochs:
            outcome = self._run_epoch()
            if outcome != "next":
                return self._finish(outcome)
            last = self.epoch + 1 >= self.cfg.epochs or self.step >= self.total_steps
            stop_early = self._evaluate_epoch() if last or (self.epoch + 1) % self.eval_every == 0 else False
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._checkpoint()
            if stop_early:
                break
        return self._finish("completed")

    def _finish(self, outcome: str) -> str:
        counts = torch.tensor([self.samples], device=self.acc.device)
        self.samples_per_rank = self.acc.gather(counts).tolist()
        return outcome

    def _run_epoch(self) -> str:
        acc, cfg = self.acc, self.cfg
        self.sampler.set_epoch(self.epoch)
        self.train_loader.set_epoch(self.epoch)
        self.task.train_mode(self.model)
        t0 = time.time()
        losses, logged = None, 0  # the training loss summed on the device since the last metrics line
        for i, batch in enumerate(self.train_loader):
            if i < self.batch_in_epoch * cfg.gradient_accumulation_steps:
                continue  # resuming mid-epoch: the sampler replays the same order
            with acc.accumulate(self.model):
                # Forward + backward in the micro-batches that fit; an out-of-memory error redoes the batch.
                loss = self.fitter.backward(self.model, batch, self.step)
                self.optimizer.step()
                self.scheduler.step() if acc.sync_gradients else None
                self.optimizer.zero_grad(set_to_none=True)
            self.samples += _batch_size(batch)
            if not acc.sync_gradients:
                continue
            self.step += 1
            self.batch_in_epoch += 1
            losses = loss.detach() if losses is None else losses + loss.detach()  # stays on the device
            logged += 1
            log_step = self.step % self.log_every == 0 or self.step == self.total_steps
            if log_step:
                # .item() syncs with the device: only on log steps, which is also where divergence shows.
                mean_loss = acc.reduce(losses / logged, "mean").item()
                if not math.isfinite(mean_loss):
                    self._diverged(mean_loss)
                self.writer.write(type="train", step=self.step, epoch=round(self.epoch + (i + 1) / len(self.train_loader), 4),
                                  loss=round(mean_loss, 5),
                                  lr=self.scheduler.get_last_lr()[0], step_time=round((time.time() - t0) / max(1, i + 1), 4))
                losses, logged = None, 0
            # Several processes agree on stopping through a collective (a sync): only on log steps.
            if (log_step or acc.num_processes == 1) and self._stop_requested():
                self._checkpoint()
                if self.acc.is_main_process:  # consumed: a later resume must not stop at once
                    (self.run_dir / STOP_FILE).unlink(missing_ok=True)
                return "stopped"
            if self.step >= self.total_steps:
                return "next"
            if i + 1 < len(self.train_loader) and self._checkpoint_due(log_step):
                self._checkpoint()  # within the epoch (its end saves one anyway)
        return "next"

    def _checkpoint_due(self, log_step: bool) -> bool:
        every = self.cfg.checkpoint_every_steps
        if every and self.step % every == 0:
            return True
        minutes, many = self.cfg.checkpoint_every_minutes, self.acc.num_processes > 1
        if not minutes or (many and not log_step):
            return False
        due = time.time() - self.last_checkpoint >= minutes * 60
        if many:  # the clocks of the ranks differ; all save together or none (a collective: log steps only)
            due = bool(self.acc.reduce(torch.tensor(int(due), device=self.acc.device), "max").item())
        return due

    def _diverged(self, loss: float) -> None:
        lr = self.cfg.learning_rate
        message = (f"The loss diverged ({loss}) at step {self.step}: lower the learning rate, e.g. to {lr / 10:.2g} "
                   f"(this run used {lr:g}), and start a new run.")
        if self.acc.is_main_process:
            self.writer.write(type="end", status="failed", step=self.step, message=message)
            write_status(self.run_dir, "failed", message=message, finished=time.time())
        raise LossDiverged(message)

    def _stop_requested(self) -> bool:
        flag = (self.run_dir / STOP_FILE).exists()
        if self.acc.num_processes > 1:  # every rank must stop at the same step, or DDP hangs
            flag = bool(self.acc.reduce(torch.tensor(int(flag), device=self.acc.device), "max").item())
        return flag

    def _evaluate_epoch(self) -> bool:
        self.report = self.task.report(self.model, self.val_loader, self.acc, self.step)
        scores = {k: v for k, v in self.report.items() if isinstance(v, float)}
        self.writer.write(type="eval", epoch=self.epoch + 1, step=self.step, **scores)
        self._note_best(scores[self.task.main_metric])
        return bool(self.cfg.early_stopping_patience) and self.bad_epochs >= self.cfg.early_stopping_patience

    def _note_best(self, metric: float) -> dict:
        if self.best is None or metric > self.best:
            self.best, self.bad_epochs, self.best_step = metric, 0, self.step
            if self.keep_best and self.acc.is_main_process:
                from .recipe import save_best

                save_best(self.run_dir, self.acc.unwrap_model(self.model))
        else:
            self.bad_epochs += 1
        return {f"val_{self.task.main_metric}": metric}

    def _checkpoint(self) -> None:
        self.last_checkpoint = time.time()
        save_checkpoint(self.run_dir, self.acc, self.optimizer, self.scheduler,
                        {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                         "best": self.best, "bad_epochs": self.bad_epochs, "best_step": self.best_step})


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    return len(batch[-1])


def _save_model(task, model, run_dir: Path, result: dict) -> None:
    tmp = run_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    task.save(model, tmp, run_dir, result)
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    tmp.rename(run_dir / "model")
