"""mmdemo: fine-tune vision and vision-language models; the engine under the web app.

The public calls are those of ``mmdemo.api`` (``from mmdemo import start`` works too) plus
``TrainConfig`` and ``UserInputError``. They are loaded on first use, so ``import mmdemo`` stays light.
"""

from __future__ import annotations

import importlib

_API = ("ingest", "start", "status", "stop", "resume", "list_runs", "classify", "caption", "answer", "push",
        "export", "resolve_checkpoint", "job_manager", "search", "match_captions", "zero_shot")
_API += ("dataset_baselines", "compare_runs")  # advice before training, the Compare view
_HOMES = {**{name: "mmdemo.api" for name in _API}, "TrainConfig": "mmdemo.config",
          "UserInputError": "mmdemo.errors"}

__all__ = [*_API, "TrainConfig", "UserInputError"]


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'mmdemo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
