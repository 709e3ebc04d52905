"""Progress as people read it: human durations, ETAs, strict JSON, and the CLI's training output.

The training loop emits its metrics.jsonl records to an optional callback; ``TrainingPrinter`` turns
them into a tqdm bar (on a terminal), plain lines (in a log file), JSON lines (``--json``) or nothing
(``--quiet``).
"""

from __future__ import annotations

import json
import math
import sys
import time

UNITS = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def format_duration(seconds: float | None) -> str:
    """``8 d 1 h``, ``2 h 5 min``, ``2 min 10 s``, ``45 s``: the two largest units, rounded to the
    smaller one; "" for an unknown duration."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = max(0, round(seconds))
    for i, (name, size) in enumerate(UNITS[:-1]):
        if seconds >= size:
            small_name, small = UNITS[i + 1]
            whole, rest = divmod(seconds, size)
            rest = round(rest / small)
            if rest * small >= size:  # 59.6 min rounds up to a whole hour
                whole, rest = whole + 1, 0
            return f"{whole} {name} {rest} {small_name}" if rest else f"{whole} {name}"
    return f"{seconds} s"


def eta_seconds(points: list[tuple[float, int]], total: int, window: int = 20) -> float | None:
    """Seconds left to ``total`` steps from (time, step) points of the current process: the pace of
    the last ``window`` points (a resumed run's pace, not its predecessor's)."""
    recent = points[-window:]
    if len(recent) < 2 or not total or recent[-1][1] <= recent[0][1]:
        return None
    per_step = (recent[-1][0] - recent[0][0]) / (recent[-1][1] - recent[0][1])
    return round(max(0.0, (total - recent[-1][1]) * per_step), 1)


def finite(obj):
    """``obj`` with every NaN / infinity replaced by None, so that it serialises as strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON (never NaN or Infinity, which most JSON parsers reject): non-finite numbers -> null."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def score_text(record: dict, keys=None) -> str:
    keys = keys or [k for k, v in record.items() if isinstance(v, float) and k not in ("time", "epoch")]
    return " · ".join(f"{k} {record[k]:.4g}" for k in keys if isinstance(record.get(k), (int, float)))


class TrainingPrinter:
    """The ``train`` command's output. Modes: "bar" (a tqdm bar on a terminal, else a plain line about
    every 5 % of the steps, so a log file is not filled with redraws), "json" (every record as a JSON
    line on stdout) and "quiet" (only the final summary)."""

    def __init__(self, mode: str = "bar", stream=None):
        self.mode, self.stream = mode, stream or sys.stderr
        self.bar = None
        self.total = self.step = self.first_step = 0
        self.points: list[tuple[float, int]] = []
        self.images_per_step = 0
        self.started = time.time()
        self.every = 1

    def __call__(self, record: dict) -> None:
        if self.mode == "json":
            print(dumps(record), flush=True)
            return
        kind = record.get("type")
        if kind == "start":
            self._start(record)
        elif kind == "train" and self.mode != "quiet":
            self._train(record)
        elif kind == "eval" and self.mode != "quiet":
            self._line(f"epoch {record.get('epoch')} · step {record.get('step')} · {score_text(record)}")

    def _start(self, record: dict) -> None:
        self.total, self.step = record.get("total_steps") or 0, record.get("step") or 0
        self.first_step, self.points = self.step, [(record.get("time", time.time()), self.step)]
        self.images_per_step = record.get("images_per_step") or 0
        self.every = max(1, self.total // 20)
        if self.mode == "bar" and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.step, unit="step", file=self.stream, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        elif self.mode != "quiet":
            resumed = f" (resumed at step {self.step})" if self.step else ""
            self._line(f"training {self.total} steps on {record.get('device', '?')}{resumed}")

    def _train(self, record: dict) -> None:
        previous, self.step = self.step, record["step"]
        self.points.append((record.get("time", time.time()), self.step))
        parts = [f"loss {record['loss']:.4g}" if isinstance(record.get("loss"), float) else "loss nan"]
        rate = self._steps_per_second()
        if rate and self.images_per_step:
            parts.append(f"{rate * self.images_per_step:.1f} img/s")
        eta = format_duration(eta_seconds(self.points, self.total))
        if eta:
            parts.append(f"ETA {eta}")
        if self.bar is not None:
            self.bar.set_postfix_str(" · ".join(parts), refresh=False)
            self.bar.update(self.step - previous)
        elif self.step // self.every > previous // self.every or self.step == self.total:
            self._line(f"step {self.step}/{self.total} · " + " · ".join(parts))

    def _steps_per_second(self) -> float | None:
        (t0, s0), (t1, s1) = self.points[max(0, len(self.points) - 20)], self.points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, result: dict, output_dir: str, status: str = "completed") -> None:
        """The last line: a JSON object on stdout (for scripts; with --json a record of type "summary"),
        after a human one on the progress stream."""
        self.close()
        scores = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.mode == "bar":
            took = format_duration(time.time() - self.started) or "0 s"
            kept = scores.get("step", self.step)
            # keep_best: the model (and its scores) may be an earlier evaluation's than the last step.
            best = f" · best at step {kept}" if self.step and kept != self.step else ""
            self._line(f"{status} in {took}: {self.step or kept} steps{best} · "
                       f"{score_text(scores, [k for k in scores if k != 'step'])} · model in {output_dir}")
        head = {"type": "summary", "status": status} if self.mode == "json" else {}
        print(dumps({**head, "output_dir": output_dir, **scores}), flush=True)
