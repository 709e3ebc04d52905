"""Knowledge distillation for classifiers: a student trained on a teacher run's soft labels.

A classification run whose config names a ``teacher`` (a finished classification run) trains with

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

(Hinton et al., 2015; T = ``distill_temperature``, alpha = ``distill_alpha``; the T^2 keeps the soft term's
gradients on the scale of the hard one's). The teacher is loaded frozen, in eval mode, in the training child
and labels every augmented batch the student sees. ``distill_images`` adds unlabelled images (a folder,
unpacked from a user's zip by ``prepare_images``): they get the soft term only. The teacher's labels must be
the dataset's.

The run's report (eval.json ``distill``, ``distill.png``) sets teacher, student and, when given
(``distill_baseline``), the student trained without the teacher side by side: validation accuracy, CPU
latency at batch 1, parameters, and the student's top-1 agreement with the teacher.

Torch loads only inside the functions: the job manager checks a teacher before launch without it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import UserInputError
from .runs import EVAL_FILE, META_FILE, MODEL_DIR, meta_labels

DISTILL_PLOT = "distill.png"
LATENCY_RUNS = 20  # timed forward passes per model (after 3 warm-up ones); the median is reported


# ---------------------------------------------------------------------------------------------
# Before launch (torch-free)


def teacher_model_dir(teacher: str) -> Path:
    """The model folder of a teacher given as a run directory (or a model folder); a clear error otherwise."""
    path = Path(teacher)
    for candidate in (path / MODEL_DIR, path):
        if (candidate / META_FILE).is_file():
            meta = json.loads((candidate / META_FILE).read_text())
            if meta.get("task", "classification") != "classification":
                raise UserInputError(f"teacher {path.name} is a {meta.get('task')} run: a teacher must be a "
                                     "classification run.")
            return candidate
    raise UserInputError(f"teacher {path.name} has no trained model (no {MODEL_DIR}/{META_FILE}): pick a finished "
                         "classification run.")


def teacher_labels(teacher: str) -> list[str]:
    meta = json.loads((teacher_model_dir(teacher) / META_FILE).read_text())
    return meta_labels(meta)


def check_teacher_labels(teacher: str, classes: list[str]) -> list[str]:
    """The teacher's labels, which must be the dataset's (in any order); UserInputError naming both otherwise."""
    labels = teacher_labels(teacher)
    if sorted(labels) != sorted(classes):
        missing, extra = sorted(set(classes) - set(labels)), sorted(set(labels) - set(classes))
        detail = "; ".join(part for part in (f"the teacher lacks {', '.join(missing)}" if missing else "",
                                             f"the dataset lacks {', '.join(extra)}" if extra else "") if part)
        raise UserInputError(f"teacher's labels ({', '.join(labels)}) are not the dataset's ({', '.join(classes)}): "
                             f"{detail}. Distil on the dataset the teacher was trained on, or one with the same "
                             "classes.")
    return labels


def check_distill_params(workspace, dataset_dir, params: dict) -> None:
    """Before a distilled run is queued: the teacher is a finished classification run whose labels are the
    dataset's, and unlabelled images come from the workspace (unless local folders are allowed)."""
    from .data import load_summary
    from .refs import local_models_allowed

    check_teacher_labels(params["teacher"], list(load_summary(dataset_dir).classes or []))
    images = params.get("distill_images")
    if images and not local_models_allowed():
        inside = Path(str(images)).resolve().is_relative_to(Path(workspace).resolve())
        if not inside or not Path(str(images)).is_dir():
            raise UserInputError("distill_images must be a zip of images given to distill (kept in this workspace); "
                                 "other folders on the server are not accepted.")


def prepare_images(source, dest: Path) -> str:
    """Unlabelled images for distillation: a zip unpacked safely into ``dest`` (the upload limits apply), or
    a folder as is. Returns the folder; a UserInputError when it holds no image."""
    from .data.upload import IMAGE_TYPES, extract_zip, list_images

    source = Path(str(source))
    if source.is_file():
        if source.suffix.lower() != ".zip":
            raise UserInputError(f"'{source.name}' is not a zip: give the unlabelled images as a zip of image files.")
        folder = extract_zip(source, Path(dest))
    elif source.is_dir():
        folder = source
    else:
        raise UserInputError(f"Unlabelled images '{source.name}' were not found: give a zip of images.")
    if not list_images(folder):
        raise UserInputError(f"'{source.name}' holds no image ({IMAGE_TYPES}): give a zip of image files.")
    return str(Path(folder).resolve())


# ---------------------------------------------------------------------------------------------
# In the training child


def distillation_loss(student, teacher, labels, temperature: float, alpha: float, label_smoothing: float = 0.0):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels), batch means; rows whose
    label is negative (unlabelled images) count in the soft term only."""
    import torch.nn.functional as F

    t = float(temperature)
    soft = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean")
    known = labels >= 0
    hard = (F.cross_entropy(student[known], labels[known], label_smoothing=label_smoothing) if bool(known.any())
            else student.sum() * 0)
    return alpha * t * t * soft + (1 - alpha) * hard


class Distiller:
    """The teacher of a classification run (``cfg.teacher``), its loss term and its report."""

    def __init__(self, task, cfg, splits):
        from .models import load_classifier

        check_teacher_labels(cfg.teacher, task.classes)
        if list(task.model.labels) != list(task.classes):
            raise UserInputError("A distilled student must be a new model (its labels are the dataset's): "
                                 "give a base model name, not a previous run with other labels.")
        self.teacher_dir = teacher_model_dir(cfg.teacher)
        self.teacher = load_classifier(self.teacher_dir).eval().requires_grad_(False)
        self.order = [self.teacher.labels.index(c) for c in task.classes]  # teacher outputs in dataset order
        self.temperature, self.alpha = cfg.distill_temperature, cfg.distill_alpha
        self.baseline = cfg.distill_baseline
        self.extra_images = 0
        if cfg.distill_images:
            self.extra_images = self._add_unlabelled(task, cfg.distill_images)

    @staticmethod
    def _add_unlabelled(task, folder: str) -> int:
        import torch

        from .data import open_image
        from .data.upload import list_images

        images = []
        for rel in list_images(Path(folder)):
            try:
                image = open_image(Path(folder) / rel)
            except UserInputError:  # an unreadable file is skipped, as ingest does
                continue
            image.thumbnail((512, 512))  # decoded images are kept only until they are resized
            images.append(image)
        if not images:
            raise UserInputError("None of the unlabelled images could be read: give JPEG or PNG files.")
        extra = task.training_tensors({"image": images, "label": [0] * len(images)}, [0])
        extra.labels = torch.full_like(extra.labels, -1)  # no hard label: the soft term only
        task.train_ds = torch.utils.data.ConcatDataset([task.train_ds, extra])
        return len(images)

    def loss(self, logits, x, y, label_smoothing: float, channels_last: bool):
        """The distillation loss of a uint8 batch ``x`` whose student logits are ``logits``."""
        import torch

        from .images import normalize

        teacher = self.teacher.to(x.device)
        pre = teacher.preprocess
        with torch.no_grad():
            target = teacher(normalize(x, pre.mean, pre.std, channels_last)).float()[:, self.order]
        return distillation_loss(logits, target, y, self.temperature, self.alpha, label_smoothing)

    def report(self, clf, image_size: int, val_split, accuracy: float, run_dir: Path) -> dict:
        """eval.json's ``distill`` section and ``distill.png``: teacher, student and baseline rows."""
        from .continual import predict_labels
        from .models import count_parameters

        names = val_split.features["label"].names
        true = [names[y] for y in val_split["label"]]
        teacher_pred = predict_labels(self.teacher, val_split, self.teacher.preprocess.image_size)
        student_pred = predict_labels(clf, val_split, image_size)
        rows = [model_row("teacher", self.teacher, sum(t == p for t, p in zip(true, teacher_pred)) / len(true),
                          self.teacher.preprocess.image_size, count_parameters),
                model_row("student (distilled)", clf, accuracy, image_size, count_parameters)]
        rows[1]["agreement_with_teacher"] = round(sum(a == b for a, b in zip(student_pred, teacher_pred)) / len(true), 4)
        if self.baseline:
            rows.append(baseline_row(self.baseline, count_parameters))
        info = {"teacher": str(self.teacher_dir.parent.name if self.teacher_dir.name == MODEL_DIR else
                               self.teacher_dir.name), "temperature": self.temperature, "alpha": self.alpha,
                "unlabelled_images": self.extra_images, "rows": rows}
        plot_tradeoff(rows, Path(run_dir) / DISTILL_PLOT)
        return {"distill": info}


def model_row(role: str, clf, accuracy: float | None, image_size: int, count_parameters) -> dict:
    return {"model": role, "base_model": Path(str(clf.base_model)).name,
            "accuracy": None if accuracy is None else round(float(accuracy), 4), "image_size": image_size,
            "latency_ms_p50": round(cpu_latency_ms(clf, image_size), 2),
            "params": count_parameters(clf)[1]}


def baseline_row(baseline: str, count_parameters) -> dict:
    """The student trained without the teacher: its accuracy (eval.json) and measured latency, or a pending row."""
    from .models import load_classifier

    run_dir = Path(baseline)
    result = json.loads((run_dir / EVAL_FILE).read_text()) if (run_dir / EVAL_FILE).is_file() else {}
    if not result or not (run_dir / MODEL_DIR / META_FILE).is_file():
        return {"model": "student alone", "base_model": "", "accuracy": None, "image_size": None,
                "latency_ms_p50": None, "params": None, "note": f"run {run_dir.name[:8]} has not finished yet"}
    clf = load_classifier(run_dir / MODEL_DIR)
    return model_row("student alone", clf, result.get("accuracy"), clf.preprocess.image_size, count_parameters)


def cpu_latency_ms(clf, image_size: int, runs: int = LATENCY_RUNS) -> float:
    """Median milliseconds of one forward pass at batch 1 on the CPU, on one thread (a copy of the model,
    eval mode). One thread: at batch 1 a second one gains little, and on a busy machine two threads
    waiting on each other measured 1.5 s where one took 33 ms (Lite0, 48 px)."""
    import copy

    import torch

    model = copy.deepcopy(clf).float().cpu().eval()
    x = torch.zeros(1, 3, image_size, image_size)
    if model.channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last)
    times, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for i in range(3 + runs):
                t0 = time.perf_counter()
                model(x)
                if i >= 3:
                    times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return sorted(times)[len(times) // 2]


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Accuracy against CPU latency (batch 1), one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for row, color in zip(rows, ("tab:blue", "tab:orange", "tab:grey")):
        if row.get("accuracy") is None or row.get("latency_ms_p50") is None:
            continue
        ax.scatter(row["latency_ms_p50"], row["accuracy"], s=60, color=color)
        ax.annotate(f"{row['model']}\n{row['base_model']}", (row["latency_ms_p50"], row["accuracy"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("CPU latency, batch 1 (ms, median)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Distillation: accuracy vs latency")
    ax.margins(0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def refresh_report(run_dir: Path) -> dict:
    """A distilled run's ``distill`` section with a baseline that was pending when the run ended measured now
    (eval.json and the plot updated); the section as it is otherwise ({} for a run that did not distil)."""
    from .runs import read_config, write_json_atomic

    run_dir = Path(run_dir)
    result = json.loads((run_dir / EVAL_FILE).read_text()) if (run_dir / EVAL_FILE).is_file() else {}
    info = result.get("distill") or {}
    pending = [i for i, row in enumerate(info.get("rows", [])) if row.get("note")]
    baseline = read_config(run_dir).get("distill_baseline")
    if pending and baseline:
        from .models import count_parameters  # torch: only when there is a model to measure

        row = baseline_row(baseline, count_parameters)
        if not row.get("note"):
            info["rows"][pending[0]] = row
            write_json_atomic(run_dir / EVAL_FILE, result)
            plot_tradeoff(info["rows"], run_dir / DISTILL_PLOT)
    return info
