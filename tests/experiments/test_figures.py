"""Figures and the findings summary, drawn from the smoke sweep's records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lossprune.experiments.analysis import DuplicateRunsWarning, by_sweep
from lossprune.experiments.figures import FIGURES, fig2_schedules, write_figures
from lossprune.experiments.findings import HOLDS, UNMEASURED, findings, findings_table


def test_every_figure_is_written_as_png_and_pdf(smoke_records: list, tmp_path: Path) -> None:
    written = write_figures(smoke_records, tmp_path)
    assert {p.name for p in written} == {f"{s}.{e}" for s in FIGURES for e in ("png", "pdf")}
    assert all(p.stat().st_size > 1000 for p in written)


def test_figures_without_their_runs_are_skipped(smoke_records: list, tmp_path: Path) -> None:
    exponential = [r for r in smoke_records if r["config"]["schedule"] == "exponential"]
    assert fig2_schedules(exponential) is None
    written = write_figures(exponential, tmp_path, formats=("png",))
    assert "fig2_linear_vs_exponential.png" not in {p.name for p in written}
    assert write_figures([], tmp_path / "empty") == []


def test_findings_report_numbers(smoke_records: list) -> None:
    results = findings(smoke_records)
    assert [f.number for f in results] == [1, 2, 3, 4, 5]
    assert results[0].verdict == HOLDS  # even three stages beat one on digits
    assert results[2].verdict == UNMEASURED  # a single π with the linear schedule
    table = findings_table(results)
    assert table.count("\n") == 7 and "MP" in table
    assert findings([])[0].verdict == UNMEASURED


def _as_preset(record: dict, preset: str | None) -> dict:
    record = json.loads(json.dumps(record))
    record.pop("preset", None)
    return record if preset is None else {**record, "preset": preset}


def test_sweeps_are_grouped_and_each_configuration_counts_once(smoke_records: list[dict]) -> None:
    quick = [_as_preset(r, "digits-quick") for r in smoke_records[:2]]
    beyond = [_as_preset(r, "digits-beyond") for r in smoke_records[:3]]  # same setting
    unnamed = [_as_preset(r, None) for r in smoke_records[2:4]]
    # Unnamed records join the only named preset of their setting ...
    assert by_sweep([*quick, *unnamed]) == {"digits-quick": [*quick, *unnamed]}
    # ... and form their own group when two presets share the setting.
    groups = by_sweep([*quick, *beyond, *unnamed])
    assert groups["digits-quick"] == quick and groups["digits-beyond"] == beyond
    (other,) = set(groups) - {"digits-quick", "digits-beyond"}
    assert other.startswith("digits-mlp-") and groups[other] == unnamed
    with pytest.warns(DuplicateRunsWarning, match="2 records repeat a configuration"):
        assert by_sweep([*quick, *quick]) == {"digits-quick": quick}
