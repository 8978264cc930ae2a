"""Run configurations and the JSON-lines results file that makes sweeps resumable.

Every finished run is appended to the results file as one JSON object per line, immediately, so
that an interrupted sweep loses at most the run in progress. A run is identified by its
canonical configuration (:meth:`RunConfig.key`): a resumed sweep skips every configuration whose
key is already in the file, so no run is ever recorded twice.

Reading is forgiving where it must be and loud about it: a line that is not a run record (not
JSON, a truncated last line, ``[1, 2, 3]``, a record without a valid configuration) is skipped
and counted in one :class:`SkippedLinesWarning`, so neither figures nor resumed sweeps fail on a
damaged file, and neither pretends it was intact.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .presets import LOSS_MODELS, UPDATES, TrainSetup

__all__ = ["RunConfig", "ResultsFile", "SkippedLinesWarning", "record_problem", "set_aside"]


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one pruning run (and nothing that does not, like the device).

    ``lam`` is ``None`` for criteria without a step-size constraint (MP, GraSP, SynFlow).
    The fields after ``finetune`` go beyond the paper (``update``, ``update_lam``, ``auto_lam``,
    ``min_density``, ``diagnostics``); they are left out of :meth:`as_dict`, and so of the key,
    while they hold their defaults, so records written before they existed still resume.
    """

    dataset: str
    model: str
    sparsity: float
    criterion: str
    lam: float | None
    stages: int
    schedule: str
    seed: int
    examples: int
    curvature: str
    loss_examples: int | None
    train: TrainSetup
    finetune: TrainSetup
    update: str = "zero"
    update_lam: float | None = None
    auto_lam: bool = False
    min_density: float = 0.0
    diagnostics: bool = False

    def __post_init__(self) -> None:
        # Normalise so that equal runs get equal keys: lambda only matters for loss models.
        lam = float(self.lam) if self.criterion in LOSS_MODELS and self.lam is not None else None
        object.__setattr__(self, "lam", lam)
        if self.criterion not in ("QM", "OBD"):
            object.__setattr__(self, "curvature", "none")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {self.update!r}")
        if self.update == "zero":
            object.__setattr__(self, "update_lam", None)
            object.__setattr__(self, "auto_lam", False)
        else:
            # The library's default λ of the compensation step (lossprune.Compensation).
            update_lam = 1e-3 if self.update_lam is None else float(self.update_lam)
            object.__setattr__(self, "update_lam", update_lam)
            object.__setattr__(self, "auto_lam", bool(self.auto_lam))
        object.__setattr__(self, "min_density", float(self.min_density))
        object.__setattr__(self, "diagnostics", bool(self.diagnostics))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (nested dicts for the training setups).

        The fields beyond the paper are only present where they differ from their defaults.
        """
        data = asdict(self)
        for name, default in _BEYOND_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        return data

    def key(self) -> str:
        """Canonical identity: sorted-key JSON of :meth:`as_dict`."""
        return canonical_key(self.as_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`as_dict`."""
        fields = dict(data)
        fields["train"] = TrainSetup(**fields["train"])
        fields["finetune"] = TrainSetup(**fields["finetune"])
        return cls(**fields)

    def label(self) -> str:
        """Short human-readable name, e.g. ``QM λ=0.01 π=14 exp seed 0``."""
        lam = "" if self.lam is None else f" λ={self.lam:g}"
        extra = ""
        if self.update == "compensate":
            extra += " comp auto" if self.auto_lam else f" comp λu={self.update_lam:g}"
        if self.min_density:
            extra += f" min_density={self.min_density:g}"
        return f"{self.criterion}{lam} π={self.stages} {self.schedule[:3]}{extra} seed {self.seed}"


_BEYOND_DEFAULTS: dict[str, Any] = {
    "update": "zero",
    "update_lam": None,
    "auto_lam": False,
    "min_density": 0.0,
    "diagnostics": False,
}
"""Fields of :class:`RunConfig` kept out of the key while they hold these values."""


class SkippedLinesWarning(UserWarning):
    """Lines of a results file that are not run records were skipped while reading it."""


RECORD_STATUSES = ("ok", "diverged")
"""Values of a record's ``"status"``: ``"diverged"`` records stop at the divergence."""

_MEASUREMENTS: dict[str, tuple[type, ...]] = {
    "dense": (dict,),
    "pruned": (dict,),
    "finetuned": (dict,),
    "delta_loss": (int, float),
    "sparsity": (int, float),
    "finetune_history": (list,),
}
"""Entries every ``"ok"`` record has (:func:`~lossprune.experiments.run.prune_run`), by type."""


def record_problem(record: object) -> str | None:
    """Why ``record`` (a parsed JSON line) is not a run record, or ``None`` if it is one."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    config = record.get("config")
    if not isinstance(config, dict):
        return "has no config object"
    try:
        RunConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as error:
        return f"has an invalid config ({type(error).__name__}: {error})"
    status = record.get("status")
    if status not in RECORD_STATUSES:
        return f"has status {status!r}, not one of {RECORD_STATUSES}"
    if status != "ok":
        return None
    missing = [name for name in _MEASUREMENTS if name not in record]
    if missing:
        return f"lacks {', '.join(missing)}"
    wrong = [
        name
        for name, types in _MEASUREMENTS.items()
        if not isinstance(record[name], types) or isinstance(record[name], bool)
    ]
    if wrong:
        return f"has {', '.join(wrong)} of the wrong type"
    return None


def set_aside(path: Path) -> Path | None:
    """Rename ``path`` (a file or folder) to ``<path>.bak-<time>``; return the new name.

    Results are never deleted: a sweep started with the wrong arguments must not cost the old
    ones. Returns ``None`` when ``path`` does not exist.
    """
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.bak-{stamp}")
    counter = 1
    while target.exists():  # two overwrites within one second
        target = path.with_name(f"{path.name}.bak-{stamp}-{counter}")
        counter += 1
    path.rename(target)
    return target


def canonical_key(config: dict[str, Any]) -> str:
    """Sorted, whitespace-free JSON: the same configuration always gives the same string."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


class ResultsFile:
    """Append-only JSON-lines file of run records (each with a ``"config"`` entry).

    Args:
        path: the file; created, with its folder, on the first :meth:`append`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The records in file order; lines that are not records are skipped with a warning.

        Warns:
            SkippedLinesWarning: once, counting the skipped lines and saying why for the first.
        """
        if not self.path.exists():
            return
        skipped: list[str] = []
        # errors="replace": a damaged byte spoils its line only, which is then skipped below.
        with open(self.path, encoding="utf-8", errors="replace") as file:
            for number, line in enumerate(file, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    # Typically the last line of a run killed while writing it.
                    skipped.append(f"line {number} is not complete JSON")
                    continue
                problem = record_problem(record)
                if problem is None:
                    yield record
                else:
                    skipped.append(f"line {number} {problem}")
        if skipped:
            warnings.warn(
                SkippedLinesWarning(
                    f"{self.path}: skipped {len(skipped)} lines that are not run records "
                    f"({'; '.join(skipped[:3])}{'; ...' if len(skipped) > 3 else ''})"
                ),
                stacklevel=2,
            )

    def records(self) -> list[dict[str, Any]]:
        """All records."""
        return list(self)

    def keys(self) -> set[str]:
        """Canonical keys of the configurations already recorded."""
        return {RunConfig.from_dict(record["config"]).key() for record in self}

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line and flush it to disk before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, allow_nan=True) + "\n"
        # Start on a fresh line if an earlier run was killed in the middle of writing one.
        prefix = "\n" if self._ends_mid_line() else ""
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(prefix + line)
            file.flush()
            os.fsync(file.fileno())

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        """:meth:`append` each record."""
        for record in records:
            self.append(record)

    def _ends_mid_line(self) -> bool:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with open(self.path, "rb") as file:
            file.seek(-1, os.SEEK_END)
            return file.read(1) != b"\n"
