"""Checks of the command line's input, made before any work starts.

A sweep may run for hours: a device that does not exist or an output folder that cannot be
written must fail in the first second, not after training (and never after old results were set
aside). The checks raise :class:`UsageError` for arguments that cannot work and
:class:`OutputFolderError` for a folder the operating system refuses; the command line turns both
into one line on stderr.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

__all__ = [
    "SEED_LIMIT",
    "UsageError",
    "OutputFolderError",
    "check_device",
    "check_output_folder",
    "check_int",
    "check_fraction",
    "check_number",
]


SEED_LIMIT = 2**32 - 1
"""Largest seed: scikit-learn's ``random_state`` (the digits split) takes 32-bit seeds."""


class UsageError(ValueError):
    """An argument that cannot work (exit status 2 on the command line)."""


class OutputFolderError(OSError):
    """The output folder cannot be created or written (exit status 1 on the command line)."""


def check_device(name: str) -> str:
    """The torch device ``name`` means (``"auto"``: CUDA when available), checked to exist here.

    Raises:
        UsageError: for a name torch does not know, a device type other than CPU and CUDA, or a
            CUDA device this machine does not have.
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {name!r}: CUDA is not available on this machine; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
    return name


def check_output_folder(path: str | Path) -> Path:
    """Create ``path`` if needed and prove that files can be written in it; return it.

    Writing a probe file is the only test that also holds for root (who passes every permission
    check of ``os.access``), read-only mounts and full disks.

    Raises:
        OutputFolderError: naming the folder and the operating system's reason.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputFolderError(f"cannot write to the output folder {folder}: {reason}") from None
    return folder


def check_int(name: str, value: int, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an int in ``[minimum, maximum]``.

    Raises:
        UsageError: naming the argument.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{name} must be an integer <= {maximum}, got {value!r}")
    return value


def check_fraction(name: str, value: float) -> float:
    """``value`` if it is a number in ``[0, 1)`` (a sparsity: 1 would remove every weight).

    Raises:
        UsageError: naming the argument.
    """
    if not 0.0 <= value < 1.0:
        raise UsageError(f"{name} must satisfy 0 <= {name} < 1, got {value!r}")
    return value


def check_number(name: str, value: float, *, positive: bool) -> float:
    """``value`` if it is finite and ``> 0`` (``positive``) or ``>= 0``.

    Raises:
        UsageError: naming the argument.
    """
    bound = "> 0" if positive else ">= 0"
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise UsageError(f"{name} must be finite and {bound}, got {value!r}")
    return value
