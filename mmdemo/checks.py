"""Parameter values from forms, JSON, YAML and the command line: parsed to their type, or refused by name.

A value may arrive as a number, a string ("3") or a float from a number widget (3.0); whole-number
fields refuse 1.5 rather than round it. Each function raises a UserInputError naming the field.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from .errors import UserInputError

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def shown(value) -> str:
    """A value as the messages quote it, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def as_int(name: str, value) -> int:
    """``value`` as an int: ints, whole floats (3.0) and numeric strings ("3"); never bools or 1.5."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    number = _number(value)
    if number is not None and number == int(number):
        return int(number)
    raise UserInputError(f"{name} must be a whole number (got {shown(value)})")


def as_float(name: str, value) -> float:
    """``value`` as a finite float: numbers and numeric strings; never bools, NaN or infinity."""
    number = _number(value)
    if number is not None:
        return number
    raise UserInputError(f"{name} must be a number (got {shown(value)})")


def _number(value) -> float | None:
    """A finite number from a number or a numeric string; None for anything else (bools included)."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def as_bool(name: str, value) -> bool:
    """``value`` as a bool: bools, 0 / 1 and the words true / false, yes / no, on / off."""
    if isinstance(value, bool):
        return value
    if isinstance(value, Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise UserInputError(f"{name} must be true or false (got {shown(value)})")


def int_in_range(name: str, value, low: int, high: int, default: int) -> int:
    """A whole number in [low, high]; 0, None and "" mean ``default``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    number = as_int(name, value)
    if number == 0:
        return default
    if not low <= number <= high:
        raise UserInputError(f"{name} must be between {low} and {high}, or 0 for the default ({default}) "
                             f"(got {number})")
    return number
