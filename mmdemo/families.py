"""The model-family registry: a name -> the family class that builds, adapts, saves and loads it.

A family is a class registered with ``@register_family``; its class attributes are the spec (the name
recorded in mmdemo.json, the model card's library, the LoRA targets, the sub-module that carries the
PEFT adapter) and its classmethods the behaviour. Classifier families (``kind = "classifier"``) live in
``mmdemo.models``, image-to-text families (``kind = "image-text"``, the model classes themselves) in
``mmdemo.vlm``. Adding a family: write its module with one decorated class and add the module to
``FAMILY_MODULES``.
"""

from __future__ import annotations

import importlib

# The modules that define families, imported on first lookup; within a kind, earlier families are tried first.
FAMILY_MODULES = ("mmdemo.models", "mmdemo.vlm.composed", "mmdemo.vlm.hf", "mmdemo.vlm.answers", "mmdemo.fusion",
                  "mmdemo.dualenc", "mmdemo.dualhf")

_FAMILIES: dict[str, type] = {}


def register_family(cls: type) -> type:
    """Class decorator: adds a family under ``cls.family``."""
    if _FAMILIES.get(cls.family, cls) is not cls:
        raise ValueError(f"model family {cls.family!r} is registered twice")
    _FAMILIES[cls.family] = cls
    return cls


def families(kind: str | None = None) -> dict[str, type]:
    """The registered families (of one kind), in the order names are resolved."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    found = [cls for cls in _FAMILIES.values() if kind is None or cls.kind == kind]
    # A catch-all (e.g. "any transformers id") comes after every family that recognises names itself.
    return {cls.family: cls for cls in sorted(found, key=lambda cls: cls.fallback)}


def get_family(name: str) -> type:
    """The family recorded as ``name`` in a saved model's mmdemo.json."""
    found = families().get(name)
    if found is None:
        raise KeyError(f"unknown model family {name!r}; registered: {', '.join(families())}")
    return found


def resolve_family(kind: str, name: str, *args) -> type | None:
    """The first family of ``kind`` whose ``matches(name, *args)`` is true; None when none is."""
    return next((cls for cls in families(kind).values() if cls.matches(name, *args)), None)
