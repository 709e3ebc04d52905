"""The training loop: accelerate, metrics.jsonl, atomic checkpoints, cooperative stop, resume.

Run directory contract (read by ``mmdemo.jobs`` and the UI):
    config.yaml      the resolved TrainConfig
    status.json      {"status": running|completed|failed|stopped, "total_steps", "message", ...}
    metrics.jsonl    one JSON object per log step ("train") and per evaluation ("eval"), flushed
    checkpoint-N/    model + optimizer + loop state; ``latest`` names the newest complete one
    model/           the fine-tuned model (see models.save_classifier); adapter/ for LoRA
    eval.json        final metrics, per-class P/R/F1, confusion matrix, misclassified examples
    STOP             created by whoever wants the run to stop at the next step boundary
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .errors import UserInputError
from .images import ImageTensors, normalize
from .models import apply_method, build_classifier, count_parameters, save_classifier

STOP_FILE, STATUS_FILE, METRICS_FILE, LATEST_FILE = "STOP", "status.json", "metrics.jsonl", "latest"


def write_json_atomic(path: Path, obj) -> None:
    """Readers (the UI polling status) never see a half-written file: temp file + rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def write_status(run_dir: Path, status: str, **fields) -> None:
    path = Path(run_dir) / STATUS_FILE
    old = json.loads(path.read_text()) if path.exists() else {}
    write_json_atomic(path, {**old, **fields, "status": status, "updated": time.time()})


class MetricsWriter:
    """Appends one JSON line per event and flushes it, so a poller sees each step as it happens."""

    def __init__(self, path: Path, enabled: bool):
        self.file = open(path, "a", buffering=1) if enabled else None

    def write(self, **record) -> None:
        if self.file:
            self.file.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
            self.file.flush()

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


def train(cfg: TrainConfig) -> dict:
    """Trains per ``cfg`` into ``cfg.output_dir``; returns the final evaluation.

    Resumes from the run directory's latest checkpoint when there is one. Stops cleanly at the next
    step boundary once ``output_dir/STOP`` exists, saving a checkpoint and a usable model.
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
    set_seed(cfg.seed)
    splits = load_splits(cfg.data)
    if "validation" not in splits or len(splits["validation"]) == 0:
        raise UserInputError("The dataset has no validation images; ingest it again so a split is made.")
    classes = splits["train"].features["label"].names
    clf, label_map = build_classifier(cfg.base_model, classes, cfg.pretrained)
    apply_method(clf, cfg.method, cfg.lora_r, cfg.lora_alpha)
    cfg = replace(cfg, image_size=cfg.image_size or clf.preprocess.image_size)
    clf.preprocess.image_size = cfg.image_size
    if main:
        cfg.save(run_dir / "config.yaml")

    train_ds = ImageTensors(splits["train"], cfg.image_size, label_map, train=cfg.augment)
    val_ds = ImageTensors(splits["validation"], cfg.image_size, label_map, train=False)
    sampler = EpochSampler(len(train_ds), cfg.seed)
    loader_kw = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                     pin_memory=torch.cuda.is_available(), persistent_workers=cfg.num_workers > 0)
    train_loader = torch.utils.data.DataLoader(train_ds, sampler=sampler, drop_last=len(train_ds) > cfg.batch_size,
                                               **loader_kw)
    val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, **loader_kw)

    trainable, total = count_parameters(clf)
    optimizer = _optimizer(clf, cfg)
    train_loader, val_loader = acc.prepare(train_loader, val_loader)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.gradient_accumulation_steps))
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = _scheduler(optimizer, cfg, total_steps)
    model, optimizer, scheduler = acc.prepare(clf, optimizer, scheduler)
    state = _resume(run_dir, acc, optimizer, scheduler)

    writer = MetricsWriter(run_dir / METRICS_FILE, main)
    if main:
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        write_status(run_dir, "running", total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                     pid=os.getpid(), message="", started=time.time())
    writer.write(type="start", step=state["step"], total_steps=total_steps, epochs=cfg.epochs,
                 trainable_params=trainable, total_params=total, num_processes=acc.num_processes,
                 device=str(acc.device), precision=acc.mixed_precision, resumed=state["step"] > 0)

    loop = _Loop(acc, model, optimizer, scheduler, train_loader, val_loader, sampler, writer, cfg, run_dir,
                 total_steps, state)
    outcome = loop.run()
    unwrapped = acc.unwrap_model(model)
    result = loop.final_evaluation(unwrapped, val_ds)
    if main:
        _save_model(unwrapped, run_dir, cfg)
        write_json_atomic(run_dir / "eval.json", result)
        _plot_confusion(result, run_dir / "confusion_matrix.png")
        writer.write(type="end", status=outcome, step=loop.step, samples_per_rank=loop.samples_per_rank)
        message = "Stopped by request; the model so far is saved." if outcome == "stopped" else ""
        write_status(run_dir, outcome, message=message, finished=time.time(), metrics=_headline(result))
    writer.close()
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _optimizer(clf, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales (1-D tensors): decaying them only hurts.
    decay, no_decay = [], []
    for p in clf.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.cuda.is_available()  # fused AdamW: one kernel for all parameters on the GPU
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, fused=fused)


def _scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)


class _Loop:
    """The epoch / step loop with its state, so run() and evaluation share it without globals."""

    def __init__(self, acc, model, optimizer, scheduler, train_loader, val_loader, sampler, writer, cfg,
                 run_dir, total_steps, state):
        self.acc, self.model, self.optimizer, self.scheduler = acc, model, optimizer, scheduler
        self.train_loader, self.val_loader, self.sampler, self.writer = train_loader, val_loader, sampler, writer
        self.cfg, self.run_dir, self.total_steps = cfg, run_dir, total_steps
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best, self.bad_epochs = state.get("best"), state.get("bad_epochs", 0)
        self.samples_per_rank = [0] * acc.num_processes
        self.samples = 0
        self.mean = torch.tensor(acc.unwrap_model(model).preprocess.mean, device=acc.device).view(1, 3, 1, 1)
        self.std = torch.tensor(acc.unwrap_model(model).preprocess.std, device=acc.device).view(1, 3, 1, 1)

    def run(self) -> str:
        cfg, acc = self.cfg, self.acc
        while self.step < self.total_steps and self.epoch < cfg.epochs:
            outcome = self._run_epoch()
            if outcome != "next":
                return self._finish(outcome)
            stop_early = self._evaluate_epoch()
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
        # In "head" mode the backbone is a fixed feature extractor: BatchNorm statistics stay frozen.
        self.model.train(cfg.method != "head")
        t0 = time.time()
        for i, (x, y) in enumerate(self.train_loader):
            if i < self.batch_in_epoch * cfg.gradient_accumulation_steps:
                continue  # resuming mid-epoch: the sampler replays the same order
            with acc.accumulate(self.model):
                logits = self.model(normalize(x, self.mean, self.std))
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                acc.backward(loss)
                self.optimizer.step()
                self.scheduler.step() if acc.sync_gradients else None
                self.optimizer.zero_grad(set_to_none=True)
            self.samples += len(y)
            if not acc.sync_gradients:
                continue
            self.step += 1
            self.batch_in_epoch += 1
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                # .item() syncs with the device: only on log steps.
                self.writer.write(type="train", step=self.step, epoch=round(self.epoch + (i + 1) / len(self.train_loader), 4),
                                  loss=round(acc.reduce(loss.detach(), "mean").item(), 5),
                                  lr=self.scheduler.get_last_lr()[0], step_time=round((time.time() - t0) / max(1, i + 1), 4))
            if self._stop_requested():
                self._checkpoint()
                return "stopped"
            if self.step >= self.total_steps:
                return "next"
        return "next"

    def _stop_requested(self) -> bool:
        flag = (self.run_dir / STOP_FILE).exists()
        if self.acc.num_processes > 1:  # every rank must stop at the same step, or DDP hangs
            flag = bool(self.acc.reduce(torch.tensor(int(flag), device=self.acc.device), "max").item())
        return flag

    @torch.no_grad()
    def _predict(self, loader):
        self.model.eval()
        losses, preds, labels = [], [], []
        for x, y in loader:
            logits = self.model(normalize(x, self.mean, self.std)).float()
            loss = F.cross_entropy(logits, y, reduction="none")
            loss, logits, y = self.acc.gather_for_metrics((loss, logits, y))
            losses.append(loss.cpu())
            preds.append(logits.argmax(-1).cpu())
            labels.append(y.cpu())
        return torch.cat(losses), torch.cat(preds), torch.cat(labels)

    def _evaluate_epoch(self) -> bool:
        losses, preds, labels = self._predict(self.val_loader)
        accuracy = (preds == labels).float().mean().item()
        self.writer.write(type="eval", epoch=self.epoch + 1, step=self.step, val_loss=round(losses.mean().item(), 5),
                          accuracy=round(accuracy, 5))
        if self.best is None or accuracy > self.best:
            self.best, self.bad_epochs = accuracy, 0
        else:
            self.bad_epochs += 1
        return bool(self.cfg.early_stopping_patience) and self.bad_epochs >= self.cfg.early_stopping_patience

    def _checkpoint(self) -> None:
        save_checkpoint(self.run_dir, self.acc, self.optimizer, self.scheduler,
                        {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                         "best": self.best, "bad_epochs": self.bad_epochs})

    def final_evaluation(self, clf, val_ds) -> dict:
        losses, preds, labels = self._predict(self.val_loader)
        return evaluation_report(losses, preds, labels, clf.labels, val_ds.row_ids, self.step)


def evaluation_report(losses, preds, labels, label_names, row_ids, step) -> dict:
    """Accuracy, per-class precision / recall / F1, the confusion matrix and misclassified rows."""
    n = len(label_names)
    cm = torch.zeros(n, n, dtype=torch.long)
    cm.index_put_((labels, preds), torch.ones_like(labels), accumulate=True)
    per_class = {}
    for k, name in enumerate(label_names):
        tp, support, predicted = cm[k, k].item(), cm[k].sum().item(), cm[:, k].sum().item()
        if support == 0 and predicted == 0:
            continue  # a label of an earlier run that this dataset does not have
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                           "support": support}
    wrong = (preds != labels).nonzero().flatten().tolist()
    present = [i for i, name in enumerate(label_names) if name in per_class]
    return {"step": step, "accuracy": round((preds == labels).float().mean().item(), 5),
            "val_loss": round(losses.mean().item(), 5), "num_val": len(labels), "per_class": per_class,
            "labels": [label_names[i] for i in present],
            "confusion_matrix": cm[present][:, present].tolist(),
            "misclassified": [{"row": row_ids[i], "label": label_names[labels[i]], "predicted": label_names[preds[i]]}
                              for i in wrong[:64]]}


def _headline(result: dict) -> dict:
    return {"accuracy": result["accuracy"], "val_loss": result["val_loss"]}


def save_checkpoint(run_dir: Path, acc, optimizer, scheduler, state: dict) -> None:
    """checkpoint-N/ is complete before ``latest`` names it (temp dir + rename, then temp file +
    rename), so a kill at any instant leaves the previous checkpoint usable."""
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return
    from safetensors.torch import save_file

    name = f"checkpoint-{state['step']}"
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model = acc.unwrap_model(acc._models[0])
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, tmp / "model.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    final = run_dir / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest = run_dir / LATEST_FILE
    previous = latest.read_text().strip() if latest.exists() else None
    write_text_atomic(latest, name)
    if previous and previous != name:
        shutil.rmtree(run_dir / previous, ignore_errors=True)
    acc.wait_for_everyone()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _resume(run_dir: Path, acc, optimizer, scheduler) -> dict:
    latest = run_dir / LATEST_FILE
    if not latest.exists():
        return {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    from safetensors.torch import load_file

    ckpt = run_dir / latest.read_text().strip()
    model = acc.unwrap_model(acc._models[0])
    model.load_state_dict(load_file(ckpt / "model.safetensors", device=str(acc.device)))
    opt = torch.load(ckpt / "optimizer.pt", map_location=acc.device, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((ckpt / "state.json").read_text())


def _save_model(clf, run_dir: Path, cfg: TrainConfig) -> None:
    tmp = run_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_classifier(clf, tmp, task=cfg.task)
    if hasattr(clf.net, "peft_config"):
        clf.net.save_pretrained(tmp / "adapter")
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    tmp.rename(run_dir / "model")


def _plot_confusion(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, cm = result["labels"], result["confusion_matrix"]
    size = min(12, 2 + 0.5 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 30:
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
