"""Figures and the findings summary, drawn from the smoke sweep's records."""

from __future__ import annotations

from pathlib import Path

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
