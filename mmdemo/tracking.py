"""Experiment tracking: a run's metrics also go to trackio's local store when ``TrainConfig.trackio``
names a project (``--trackio PROJECT``), so people who use trackio see mmdemo runs next to their others.

Local only: trackio sends a run to a Hugging Face Space or a self-hosted server when TRACKIO_SPACE_ID /
TRACKIO_SERVER_URL are set, so the training child drops those variables before ``trackio.init``. The
store is trackio's own (TRACKIO_DIR, else HF_HOME/trackio); ``trackio show --project PROJECT`` opens it.
Nothing breaks when the setting is off, trackio is not installed, or it fails: the run goes on and
train.log says why nothing was logged.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
REMOTE_VARIABLES = ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID")
# config.yaml fields that are paths on this machine: not sent to the tracker
PATH_FIELDS = ("data", "output_dir")


def project_problem(project: str) -> str | None:
    """Why ``project`` cannot name a trackio project (None when it can, or is "" = off)."""
    if not project or PROJECT_RE.match(project):
        return None
    return (f"trackio must be a project name of letters, digits, '.', '_' or '-' (at most 100), or empty "
            f"for no tracking (got {project[:40]!r})")


def _warn(message: str) -> None:
    # stderr is the run's train.log; stdout may be the CLI's JSON lines
    print(f"trackio: {message}", file=sys.stderr, flush=True)


class Tracker:
    """Forwards metrics records to a trackio run: ``train`` lines as train/loss and train/lr, ``eval``
    lines as val/<metric>, at the record's optimizer step; an ``end`` record finishes the run."""

    def __init__(self, run, trackio):
        self.run, self.trackio = run, trackio

    def __call__(self, record: dict) -> None:
        kind = record.get("type")
        try:
            if kind == "train":
                self.run.log({"train/loss": record["loss"], "train/lr": record["lr"],
                              "train/epoch": record["epoch"]}, step=record["step"])
            elif kind == "eval":
                scores = {f"val/{k}": v for k, v in record.items()
                          if k not in ("type", "epoch", "step", "time") and isinstance(v, (int, float))}
                self.run.log({**scores, "val/epoch": record["epoch"]}, step=record["step"])
            elif kind == "end":
                self.finish()
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            _warn(f"could not log a {kind} record ({type(e).__name__}: {e}); training goes on")

    def finish(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            with contextlib.redirect_stdout(sys.stderr):
                run.finish()


def open_tracker(cfg, run_name: str) -> Tracker | None:
    """A Tracker for ``cfg.trackio`` (None when off, or when trackio is missing or fails to start)."""
    if not getattr(cfg, "trackio", ""):
        return None
    try:
        import trackio
    except ImportError:
        _warn(f"not installed: this run is not logged to project {cfg.trackio!r} "
              "(pip install trackio==0.43.0 to log runs there)")
        return None
    for name in REMOTE_VARIABLES:
        os.environ.pop(name, None)  # this process is the training child: local logging only
    config = {k: v for k, v in cfg.to_dict().items() if k not in PATH_FIELDS and k != "extra"}
    try:
        with contextlib.redirect_stdout(sys.stderr):  # trackio prints its banner on stdout
            run = trackio.init(project=cfg.trackio, name=run_name, config=config, space_id=None, server_url=None,
                               resume="allow", embed=False, auto_log_gpu=False, auto_log_cpu=False)
    except Exception as e:  # noqa: BLE001 - a tracker that cannot start leaves the run as it was
        _warn(f"could not start a run in project {cfg.trackio!r} ({type(e).__name__}: {e}); training goes on")
        return None
    return Tracker(run, trackio)


def listener(cfg, run_name: str, then=None):
    """The metrics listener of a training run: ``then`` (the CLI's progress output) and, when
    ``cfg.trackio`` is set, the trackio run. Returns ``then`` itself when there is nothing to add."""
    tracker = open_tracker(cfg, run_name)
    if tracker is None:
        return then

    def on_record(record: dict) -> None:
        tracker(record)
        if then:
            then(record)

    return on_record
