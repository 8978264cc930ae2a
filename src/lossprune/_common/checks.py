"""Argument checks shared by every layer: precise TypeError/ValueError naming the argument.

``bool`` is refused where a number is expected (``True`` is an ``int`` to Python, never a
sparsity or a stage count to a user).
"""

from __future__ import annotations

import math
import numbers

__all__ = [
    "is_int",
    "is_real",
    "check_fraction",
    "check_nonnegative",
    "check_lam",
    "check_positive_int",
    "check_optional_positive_int",
]


def is_real(value: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: object) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_fraction(name: str, value: object) -> float:
    """A real number in ``[0, 1)`` (a sparsity or a density), returned as float."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]
    if not 0.0 <= number < 1.0:
        raise ValueError(f"{name} must satisfy 0 <= {name} < 1, got {value}")
    return number


def check_nonnegative(name: str, value: object) -> float:
    """A finite real number ``>= 0``, returned as float."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return number


#: λ beyond this is not representable in float32, where ½·λ·θ² is evaluated for float32 models.
LAM_MAX = 3.4028234663852886e38


def check_lam(value: object, name: str = "lam") -> float:
    """λ, the strength of the step-size constraint: a real number in ``[0, 3.4e38]``.

    The upper bound is float32's largest number: a larger λ passes as a Python float but
    overflows to inf as soon as ½·λ·θ² is computed for a float32 model.
    """
    number = check_nonnegative(name, value)
    if number > LAM_MAX:
        raise ValueError(
            f"{name} must be at most {LAM_MAX:.4g} (float32's largest number), got {value}"
        )
    return number


def check_positive_int(name: str, value: object) -> int:
    """An integer ``>= 1``, returned as int."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    number = int(value)  # type: ignore[call-overload]
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return number


def check_optional_positive_int(name: str, value: object) -> int | None:
    """``None`` or an integer ``>= 1``."""
    return None if value is None else check_positive_int(name, value)
