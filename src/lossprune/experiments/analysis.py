"""Reading sweep records: the measured quantities and their means over seeds.

Shared by the figures and the findings summary, so both read the records the same way.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from scipy.stats import spearmanr

__all__ = [
    "Record",
    "ok_records",
    "paper_records",
    "setting",
    "update_label",
    "delta_loss",
    "gap_before",
    "gap_after",
    "select",
    "by_lam",
    "mean_std",
    "values",
    "spearman",
    "Metric",
    "by_sweep",
    "by_sparsity",
    "DuplicateRunsWarning",
]

Record = dict[str, Any]
Metric = Callable[[Record], float]


def ok_records(records: Iterable[Record]) -> list[Record]:
    """The runs that finished (diverged runs carry no measurements after the divergence)."""
    return [r for r in records if r.get("status") == "ok"]


# Config fields beyond the paper and their defaults: records written before they existed, and
# records of runs that keep the defaults, do not carry them.
_BEYOND = {"update": "zero", "update_lam": None, "auto_lam": False, "min_density": 0.0}


def setting(record: Record, name: str) -> Any:
    """Config field ``name`` of ``record``, with the default of the fields beyond the paper."""
    config = record["config"]
    return config[name] if name in config else _BEYOND[name]


def paper_records(records: Iterable[Record]) -> list[Record]:
    """The runs done as in the paper: pruned weights zeroed, no minimum layer density."""
    return [r for r in records if setting(r, "update") == "zero" and not setting(r, "min_density")]


def update_label(record: Record) -> str:
    """``"zero"``, ``"comp λu=0.1"``, ``"comp auto"``, with ``" min_density=…"`` if any."""
    if setting(record, "update") == "zero":
        label = "zero"
    elif setting(record, "auto_lam"):
        label = "comp auto"
    else:
        label = f"comp λu={setting(record, 'update_lam'):g}"
    density = setting(record, "min_density")
    return label + (f" min_density={density:g}" if density else "")


def delta_loss(record: Record) -> float:
    """ΔL: mean training loss after minus before pruning (eval mode)."""
    return float(record["delta_loss"])


def gap_before(record: Record) -> float:
    """Validation error of the pruned network minus that of the dense one, before fine-tuning."""
    return float(record["pruned"]["val_error"] - record["dense"]["val_error"])


def gap_after(record: Record) -> float:
    """The same after fine-tuning with the mask fixed (best validation checkpoint)."""
    return float(record["finetuned"]["val_error"] - record["dense"]["val_error"])


def select(records: Iterable[Record], **where: Any) -> list[Record]:
    """Records whose config matches every ``field=value`` (a tuple value means any of them)."""

    def matches(record: Record) -> bool:
        config = record["config"]
        for name, value in where.items():
            allowed = value if isinstance(value, tuple) else (value,)
            if config[name] not in allowed:
                return False
        return True

    return [r for r in records if matches(r)]


def by_lam(records: Iterable[Record], metric: Metric) -> dict[float, list[float]]:
    """``metric`` of the records grouped by lambda (over seeds), sorted by lambda."""
    groups: dict[float, list[float]] = defaultdict(list)
    for record in records:
        groups[float(record["config"]["lam"])].append(metric(record))
    return dict(sorted(groups.items()))


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; the std of a single value is 0."""
    array = np.asarray(list(values), dtype=float)
    return float(array.mean()), float(array.std())


def values(records: Iterable[Record], key: str) -> list[Any]:
    """Distinct values of config field ``key``, sorted (``None`` first)."""
    found = {r["config"][key] for r in records}
    return sorted(found, key=lambda v: (v is not None, v if v is not None else 0))


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (:func:`scipy.stats.spearmanr`); NaN when undefined."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return float("nan")
    return float(spearmanr(xs, ys).statistic)


# What every run of one sweep shares; runs that differ here must not be averaged together.
_SWEEP_SETTING = ("dataset", "model", "examples", "loss_examples", "train", "finetune")


class DuplicateRunsWarning(UserWarning):
    """A configuration is recorded more than once; only its first record is used."""


def by_sweep(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records grouped by the sweep that wrote them, each configuration once.

    Runs that differ in what a sweep fixes (dataset, model, scoring examples, training setups)
    are never averaged together. Within one setting, the records of different presets (each
    sweep records its preset's name) are separate groups too: ``digits-quick`` and
    ``digits-beyond`` share a setting and some configurations. Records without a name (from
    ``lossprune prune``, or sweeps older than the name) join the one named preset of their
    setting, or else form a group named after dataset, model and a digest of the setting.

    A configuration recorded twice (two sweeps that wrote one file at once, before results
    files had a lock) counts once: its first record; a :class:`DuplicateRunsWarning` counts the
    others.
    """
    by_setting: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        setting = {name: record["config"].get(name) for name in _SWEEP_SETTING}
        by_setting[json.dumps(setting, sort_keys=True)].append(record)
    keyed: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for key, members in by_setting.items():
        presets = sorted({r["preset"] for r in members if r.get("preset")})
        config = members[0]["config"]
        unnamed = f"{config['dataset']}-{config['model']}-{_digest(key)}"
        for record in members:
            name = record.get("preset") or (presets[0] if len(presets) == 1 else unnamed)
            keyed[key, name].append(record)
    groups: dict[str, list[Record]] = {}
    repeated = 0
    for (key, name), group in keyed.items():
        once = _first_of_each_configuration(group)
        repeated += len(group) - len(once)
        groups[name if name not in groups else f"{name}-{_digest(key)}"] = once
    if repeated:
        warnings.warn(
            DuplicateRunsWarning(
                f"{repeated} records repeat a configuration recorded before them; "
                "each configuration counts once (its first record)"
            ),
            stacklevel=2,
        )
    return groups


def by_sparsity(records: Iterable[Record]) -> dict[float, list[Record]]:
    """Records grouped by target sparsity, in increasing order."""
    groups: dict[float, list[Record]] = defaultdict(list)
    for record in records:
        groups[float(record["config"]["sparsity"])].append(record)
    return dict(sorted(groups.items()))


def _first_of_each_configuration(records: list[Record]) -> list[Record]:
    seen: set[str] = set()
    first = []
    for record in records:
        config = json.dumps(record["config"], sort_keys=True)
        if config not in seen:
            seen.add(config)
            first.append(record)
    return first


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]
