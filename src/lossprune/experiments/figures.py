"""The reproduction's figures, drawn from sweep records (numbers follow Laurent et al. 2020).

Each ``fig_*`` function draws one figure from a list of records and returns a
:class:`matplotlib.figure.Figure` (or ``None`` when the records hold nothing to draw, e.g. no
linear-schedule runs). :func:`write_figures` saves every figure as PNG and PDF. Figures are built
with the object-oriented API (no ``pyplot``), so no display and no global backend are involved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from .analysis import (
    Metric,
    Record,
    by_lam,
    delta_loss,
    gap_after,
    gap_before,
    mean_std,
    ok_records,
    paper_records,
    select,
    spearman,
    update_label,
    values,
)
from .presets import LOSS_MODELS

__all__ = [
    "FIGURES",
    "BEYOND_FIGURES",
    "fig_predicted_vs_measured",
    "fig_compensation",
    "fig1_delta_loss",
    "fig2_schedules",
    "fig3_gap_vs_delta_loss",
    "fig6_gap_before_finetuning",
    "fig7_gap_after_finetuning",
    "fig15_finetuning_curves",
    "fig16_baselines",
    "fig_lm_perplexity",
    "LM_FIGURES",
    "write_figures",
    "write_lm_figures",
]

COLORS = {
    "LM": "tab:blue",
    "QM": "tab:orange",
    "OBD": "tab:green",
    "MP": "black",
    "GraSP": "tab:red",
    "SynFlow": "tab:purple",
}
SCHEDULE_STYLE = {"exponential": "-", "linear": "--"}


def _lam_axis(lams: Sequence[float]) -> Callable[[float], float]:
    """Map lambda to an x position on a log axis: 0 sits one decade left of the smallest λ > 0."""
    positive = [lam for lam in lams if lam > 0]
    zero_at = min(positive) / 10 if positive else 1.0
    return lambda lam: lam if lam > 0 else zero_at


def _format_lam_axis(ax: Axes, lams: Sequence[float]) -> None:
    position = _lam_axis(lams)
    ax.set_xscale("log")
    ax.set_xticks([position(lam) for lam in lams])
    ax.set_xticklabels(["0" if lam == 0 else f"{lam:g}" for lam in lams], rotation=45)
    ax.minorticks_off()
    ax.set_xlabel("λ")


def _positive_log_y(ax: Axes, data: Sequence[float]) -> None:
    if len(data) and min(data) > 0:
        ax.set_yscale("log")


def _lam_panels(records: list[Record], metric: Metric, ylabel: str, title: str) -> Figure | None:
    """One panel per π: metric vs λ for LM/QM/OBD (mean ± std over seeds), MP dashed."""
    records = select(ok_records(records), schedule="exponential")
    models = select(records, criterion=LOSS_MODELS)
    if not models:
        return None
    stages = values(models, "stages")
    lams = values(models, "lam")
    position = _lam_axis(lams)
    figure = Figure(figsize=(4 * len(stages), 3.4), layout="constrained")
    axes = figure.subplots(1, len(stages), sharey=True, squeeze=False)[0]
    for ax, pi in zip(axes, stages, strict=True):
        plotted: list[float] = []
        for criterion in LOSS_MODELS:
            groups = by_lam(select(models, criterion=criterion, stages=pi), metric)
            if not groups:
                continue
            xs = [position(lam) for lam in groups]
            stats = np.array([mean_std(v) for v in groups.values()])
            ax.plot(xs, stats[:, 0], "o-", color=COLORS[criterion], label=criterion, ms=3)
            ax.fill_between(
                xs,
                *(stats[:, 0] + s * stats[:, 1] for s in (-1, 1)),
                color=COLORS[criterion],
                alpha=0.2,
            )
            plotted.extend(stats[:, 0])
        magnitude = [metric(r) for r in select(records, criterion="MP", stages=pi)]
        if magnitude:
            # Magnitude pruning ignores λ: one run per seed, drawn across the whole λ range.
            mean, _ = mean_std(magnitude)
            ax.axhline(mean, color=COLORS["MP"], ls="--", label="MP")
            plotted.append(mean)
        _format_lam_axis(ax, lams)
        _positive_log_y(ax, plotted)
        ax.set_title(f"π = {pi}")
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize="small")
    figure.suptitle(title)
    return figure


def fig1_delta_loss(records: list[Record]) -> Figure | None:
    """Fig. 1: ΔL after pruning vs λ, one panel per number of stages π."""
    return _lam_panels(records, delta_loss, "ΔL (training loss)", "Loss change after pruning")


def fig6_gap_before_finetuning(records: list[Record]) -> Figure | None:
    """Fig. 6: validation error gap right after pruning vs λ."""
    return _lam_panels(records, gap_before, "val. error gap", "Validation gap before fine-tuning")


def fig7_gap_after_finetuning(records: list[Record]) -> Figure | None:
    """Fig. 7: validation error gap after fine-tuning vs λ."""
    return _lam_panels(records, gap_after, "val. error gap", "Validation gap after fine-tuning")


def _schedule_lam(records: list[Record]) -> float | None:
    """The λ for the per-stage panels: the middle one of those run with the linear schedule."""
    lams = values(select(records, schedule="linear"), "lam")
    return lams[len(lams) // 2] if lams else None


def fig2_schedules(records: list[Record], criterion: str = "QM") -> Figure | None:
    """Fig. 2: linear vs exponential schedule for ``criterion``.

    Panels: ΔL vs λ; ‖Δθ‖² removed at each stage; training loss vs sparsity along the stages.
    """
    records = select(ok_records(records), criterion=criterion)
    lam = _schedule_lam(records)
    if lam is None:
        return None
    stages = values(select(records, schedule="linear"), "stages")
    lams = values(select(records, stages=tuple(stages)), "lam")
    position = _lam_axis(lams)
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    ax_lam, ax_step, ax_curve = figure.subplots(1, 3)
    shades = dict(zip(stages, ("tab:blue", "tab:red", "tab:green", "tab:olive"), strict=False))
    for pi in stages:
        for schedule, style in SCHEDULE_STYLE.items():
            runs = select(records, stages=pi, schedule=schedule)
            groups = by_lam(runs, delta_loss)
            if not groups:
                continue
            label = f"π={pi} {schedule}"
            means = [mean_std(v)[0] for v in groups.values()]
            ax_lam.plot(
                [position(x) for x in groups],
                means,
                style,
                marker="o",
                ms=3,
                color=shades[pi],
                label=label,
            )
            chosen = select(runs, lam=lam)
            steps = np.array([r["stages"]["step_norm_sq"] for r in chosen])
            if steps.size:
                ax_step.plot(
                    np.arange(1, pi + 1), steps.mean(axis=0), style, color=shades[pi], label=label
                )
            curves = [r["loss_curve"] for r in chosen if "loss_curve" in r]
            if curves:
                sparsity = [p["sparsity"] for p in curves[0]]
                loss = np.mean([[p["train_loss"] for p in c] for c in curves], axis=0)
                ax_curve.plot(sparsity, loss - loss[0], style, color=shades[pi], label=label)
    _format_lam_axis(ax_lam, lams)
    ax_lam.set_yscale("log")
    ax_lam.set_ylabel("ΔL")
    ax_lam.set_title(f"{criterion}: ΔL vs λ")
    ax_step.set_yscale("log")
    ax_step.set_xscale("log")
    ax_step.set(xlabel="stage", ylabel="‖Δθ‖² removed", title=f"per stage (λ={lam:g})")
    ax_curve.set(xlabel="sparsity", ylabel="ΔL so far", title=f"along the stages (λ={lam:g})")
    ax_curve.set_yscale("symlog", linthresh=1e-2)
    ax_lam.legend(fontsize="small")
    return figure


def fig3_gap_vs_delta_loss(records: list[Record]) -> Figure | None:
    """Fig. 3: validation gap after fine-tuning vs ΔL, Spearman's ρ per loss model.

    ρ is taken over all runs of a criterion (seeds x π x λ x schedules); Magnitude runs, which
    differ only by seed, are drawn in every panel for reference.
    """
    records = ok_records(records)
    criteria = [c for c in LOSS_MODELS if select(records, criterion=c)]
    if not criteria:
        return None
    magnitude = select(records, criterion="MP")
    figure = Figure(figsize=(3.8 * len(criteria), 3.4), layout="constrained")
    axes = figure.subplots(1, len(criteria), sharex=True, sharey=True, squeeze=False)[0]
    for ax, criterion in zip(axes, criteria, strict=True):
        runs = select(records, criterion=criterion)
        xs, ys = [delta_loss(r) for r in runs], [gap_after(r) for r in runs]
        ax.scatter(xs, ys, s=12, color=COLORS[criterion], alpha=0.7, label=criterion)
        ax.scatter(
            [delta_loss(r) for r in magnitude],
            [gap_after(r) for r in magnitude],
            s=12,
            color=COLORS["MP"],
            label="MP",
        )
        ax.set_title(f"{criterion}: ρ = {spearman(xs, ys):.2f} (n={len(xs)})")
        ax.set(xlabel="ΔL", xscale="symlog", xlim=(0, None))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.legend(fontsize="small")
    axes[0].set_ylabel("val. error gap after fine-tuning")
    return figure


def fig15_finetuning_curves(records: list[Record]) -> Figure | None:
    """Fig. 15: validation error along fine-tuning (epoch 0 = right after pruning).

    One panel per π of the loss models, each at its λ of lowest mean ΔL, with MP; GraSP and
    SynFlow (whatever their number of stages) are drawn dotted in every panel for reference.
    """
    records = select(ok_records(records), schedule="exponential")
    stages = values(select(records, criterion=(*LOSS_MODELS, "MP")), "stages")
    if not stages:
        return None
    baselines = _representatives(select(records, criterion=("GraSP", "SynFlow")))
    figure = Figure(figsize=(4 * len(stages), 3.4), layout="constrained")
    axes = figure.subplots(1, len(stages), sharey=True, squeeze=False)[0]
    for ax, pi in zip(axes, stages, strict=True):
        chosen = _representatives(select(records, stages=pi, criterion=(*LOSS_MODELS, "MP")))
        for criterion, runs in (chosen | baselines).items():
            curves = np.array([[e["val_error"] for e in r["finetune_history"]] for r in runs])
            style = ":" if criterion in baselines else "-"
            label = criterion
            if criterion in baselines:
                label += f" (π={runs[0]['config']['stages']})"
            ax.plot(
                curves.mean(axis=0), style, marker="o", ms=3, color=COLORS[criterion], label=label
            )
        ax.set(title=f"π = {pi}", xlabel="fine-tuning epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("validation error")
    axes[-1].legend(fontsize="small")
    return figure


def _representatives(records: list[Record]) -> dict[str, list[Record]]:
    """Per criterion, the runs (all seeds) of its λ with the lowest mean ΔL."""
    chosen: dict[str, list[Record]] = {}
    for criterion in COLORS:
        runs = select(records, criterion=criterion)
        if not runs:
            continue
        if criterion in LOSS_MODELS:
            groups = by_lam(runs, delta_loss)
            best = min(groups, key=lambda lam: mean_std(groups[lam])[0])
            runs = select(runs, lam=best)
        chosen[criterion] = runs
    return chosen


def fig16_baselines(records: list[Record]) -> Figure | None:
    """Fig. 16: GraSP and SynFlow among the other runs, validation gap vs ΔL."""
    records = ok_records(records)
    baselines = select(records, criterion=("GraSP", "SynFlow"))
    if not baselines:
        return None
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    ax_before, ax_after = figure.subplots(1, 2, sharex=True)
    for criterion, color in COLORS.items():
        runs = select(records, criterion=criterion)
        if not runs:
            continue
        big = criterion in ("GraSP", "SynFlow")
        for ax, metric in ((ax_before, gap_before), (ax_after, gap_after)):
            ax.scatter(
                [delta_loss(r) for r in runs],
                [metric(r) for r in runs],
                color=color,
                s=60 if big else 10,
                marker="*" if big else "o",
                alpha=1.0 if big else 0.5,
                label=criterion,
                zorder=3 if big else 2,
            )
    for ax, when in ((ax_before, "before"), (ax_after, "after")):
        ax.set(xlabel="ΔL", ylabel=f"val. error gap {when} fine-tuning", xscale="symlog")
    ax_after.legend(fontsize="small")
    return figure


FIGURES: dict[str, Callable[[list[Record]], Figure | None]] = {
    "fig1_delta_loss_vs_lambda": fig1_delta_loss,
    "fig2_linear_vs_exponential": fig2_schedules,
    "fig3_gap_vs_delta_loss": fig3_gap_vs_delta_loss,
    "fig6_gap_before_finetuning": fig6_gap_before_finetuning,
    "fig7_gap_after_finetuning": fig7_gap_after_finetuning,
    "fig15_finetuning_curves": fig15_finetuning_curves,
    "fig16_grasp_synflow": fig16_baselines,
}
"""File stem -> figure function."""


# ------------------------------------------------------------------------------------------------
# Beyond the paper: compensation updates and layer-collapse protection (issue 5)
# ------------------------------------------------------------------------------------------------

UPDATE_COLORS = {
    "zero": "black",
    "comp λu=0.1": "tab:blue",
    "comp λu=1": "tab:cyan",
    "comp auto": "tab:red",
}
_OTHER_COLORS = ("tab:olive", "tab:brown", "tab:pink", "tab:gray", "tab:purple")


def _update_colors(labels: Sequence[str]) -> dict[str, str]:
    """A color per update label: the digits-beyond ones fixed, others in turn."""
    others = iter(_OTHER_COLORS * 4)
    return {u: UPDATE_COLORS.get(u) or next(others) for u in labels}


def _sorted_updates(records: list[Record]) -> list[str]:
    return sorted({update_label(r) for r in records}, key=lambda u: (u != "zero", u))


def fig_predicted_vs_measured(records: list[Record]) -> Figure | None:
    r"""Quadratic model's predicted ΔL vs measured ΔL, per stage, one panel per criterion.

    Predicted: :math:`g^\top\Delta\theta + \tfrac12\Delta\theta^\top H\Delta\theta` (exact
    Hessian) of the stage's whole step; measured: the loss after minus before the step; both on
    the stage's scoring data (``diagnostics=True`` runs). Symmetric-log axes, identity dashed;
    circles are one-shot runs (π = 1), dots the stages of multi-stage runs.
    """
    records = [r for r in ok_records(records) if "predicted_delta" in r.get("stages", {})]
    if not records:
        return None
    criteria = [c for c in COLORS if select(records, criterion=c)]
    colors = _update_colors(_sorted_updates(records))
    figure = Figure(figsize=(4.2 * len(criteria), 3.9), layout="constrained")
    axes = figure.subplots(1, len(criteria), sharex=True, sharey=True, squeeze=False)[0]
    extent = 0.0
    for ax, criterion in zip(axes, criteria, strict=True):
        runs = select(records, criterion=criterion)
        labelled: set[str] = set()
        for label in _sorted_updates(runs):
            for one_shot in (True, False):
                chosen = [
                    r
                    for r in runs
                    if update_label(r) == label and (r["config"]["stages"] == 1) == one_shot
                ]
                xs = [x for r in chosen for x in r["stages"]["predicted_delta"]]
                ys = [
                    a - b
                    for r in chosen
                    for a, b in zip(r["stages"]["loss_after"], r["stages"]["loss_before"])
                ]
                if not xs:
                    continue
                extent = max(extent, *map(abs, xs), *map(abs, ys))
                ax.scatter(
                    xs,
                    ys,
                    s=30 if one_shot else 8,
                    marker="o",
                    facecolors="none" if one_shot else colors[label],
                    edgecolors=colors[label],
                    alpha=0.9 if one_shot else 0.6,
                    label=None if label in labelled else label,
                )
                labelled.add(label)
        ax.set_title(criterion)
        ax.set_xlabel("predicted ΔL (quadratic model)")
    limit = 1.5 * extent if extent else 1.0
    for ax in axes:
        ax.plot([-limit, limit], [-limit, limit], "--", color="gray", lw=1, zorder=0)
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit))
    axes[0].set_ylabel("measured ΔL (scoring data)")
    axes[-1].legend(fontsize="small", title="○ π=1, • π>1 stages", title_fontsize="small")
    figure.suptitle("Per-stage loss change: quadratic model vs measured")
    return figure


def fig_compensation(records: list[Record]) -> Figure | None:
    """ΔL and validation gap before/after fine-tuning, per setting, with each weight update.

    One x position per criterion, π and λ that has runs beyond the paper; one marker per update
    (mean over seeds, bars from the lowest to the highest seed). Diverged runs are left out.
    """
    records = ok_records(records)
    beyond = [r for r in records if update_label(r) != "zero"]
    if not beyond:
        return None
    settings = sorted(
        {(r["config"]["criterion"], r["config"]["stages"], r["config"]["lam"]) for r in beyond},
        key=lambda k: (k[0], k[1], k[2]),
    )
    labels = _sorted_updates(
        [
            r
            for r in records
            if (r["config"]["criterion"], r["config"]["stages"], r["config"]["lam"]) in settings
        ]
    )
    colors = _update_colors(labels)
    figure = Figure(figsize=(13, 3.8), layout="constrained")
    axes = figure.subplots(1, 3, sharex=True)
    width = 0.8 / len(labels)
    metrics = (
        (delta_loss, "ΔL (training loss)"),
        (gap_before, "val. error gap before FT"),
        (gap_after, "val. error gap after FT"),
    )
    for ax, (metric, title) in zip(axes, metrics, strict=True):
        for i, label in enumerate(labels):
            xs, means, lows, highs = [], [], [], []
            for x, (criterion, stages, lam) in enumerate(settings):
                runs = [
                    r
                    for r in select(records, criterion=criterion, stages=stages, lam=lam)
                    if update_label(r) == label
                ]
                if not runs:
                    continue
                found = [metric(r) for r in runs]
                xs.append(x - 0.4 + width * (i + 0.5))
                means.append(float(np.mean(found)))
                lows.append(means[-1] - min(found))
                highs.append(max(found) - means[-1])
            ax.errorbar(
                xs, means, yerr=[lows, highs], fmt="o", ms=4, color=colors[label], label=label
            )
        ax.set_title(title)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(
            [f"{c} π={s}\nλ={lam:g}" for c, s, lam in settings], rotation=60, fontsize="small"
        )
        ax.grid(axis="y", alpha=0.3)
    # symlog, not log: compensation can leave the pruned network BELOW the dense loss (ΔL < 0).
    axes[0].set_yscale("symlog", linthresh=1e-2)
    axes[0].axhline(0.0, color="grey", lw=0.5)
    axes[-1].legend(fontsize="small", loc="upper right")
    figure.suptitle("Zeroing (the paper) vs compensating the kept weights")
    return figure


BEYOND_FIGURES: dict[str, Callable[[list[Record]], Figure | None]] = {
    "beyond_predicted_vs_measured": fig_predicted_vs_measured,
    "beyond_compensation": fig_compensation,
}
"""Figures of the runs beyond the paper (drawn only when the records hold such runs)."""


# ------------------------------------------------------------------------------------------------
# Beyond the paper: language models (issue 13)
# ------------------------------------------------------------------------------------------------


def fig_lm_perplexity(records: list[Record]) -> Figure | None:
    """Validation perplexity vs λ of a language model, right after pruning and after fine-tuning.

    One column per target sparsity, one row per number of stages π; solid lines and circles are
    right after pruning, dashed lines and squares after the fine-tune with fixed masks (means over
    seeds); MP (invariant to λ) is drawn across the λ range, the dense model dotted. Drawn only
    for records that carry perplexities (:mod:`.lm_run`).
    """
    records = [
        r
        for r in select(ok_records(records), schedule="exponential")
        if "val_perplexity" in r["dense"]
    ]
    models = select(records, criterion=LOSS_MODELS)
    if not models:
        return None
    sparsities, stages = values(records, "sparsity"), values(records, "stages")
    lams = values(models, "lam")
    position = _lam_axis(lams)
    figure = Figure(figsize=(3.6 * len(sparsities), 3.0 * len(stages)), layout="constrained")
    axes = figure.subplots(len(stages), len(sparsities), sharey=True, squeeze=False)
    dense = mean_std(r["dense"]["val_perplexity"] for r in records)[0]
    phases = (("pruned", "o-", "after pruning"), ("finetuned", "s--", "after fine-tuning"))
    for row, pi in enumerate(stages):
        for col, sparsity in enumerate(sparsities):
            ax = axes[row, col]
            for phase, style, when in phases:
                metric = _val_perplexity(phase)
                for criterion in LOSS_MODELS:
                    runs = select(models, criterion=criterion, stages=pi, sparsity=sparsity)
                    groups = by_lam(runs, metric)
                    if groups:
                        ax.plot(
                            [position(lam) for lam in groups],
                            [mean_std(v)[0] for v in groups.values()],
                            style,
                            color=COLORS[criterion],
                            ms=3,
                            label=f"{criterion} {when}",
                        )
                magnitude = select(records, criterion="MP", stages=pi, sparsity=sparsity)
                if magnitude:
                    ax.axhline(
                        mean_std(map(metric, magnitude))[0],
                        color=COLORS["MP"],
                        ls="-" if phase == "pruned" else "--",
                        lw=1,
                        label=f"MP {when}",
                    )
            ax.axhline(dense, color="gray", ls=":", label="dense")
            _format_lam_axis(ax, lams)
            ax.set_yscale("log")
            ax.set_title(f"sparsity {sparsity:.0%}, π = {pi}")
        axes[row, 0].set_ylabel("validation perplexity")
    axes[0, 0].legend(fontsize="x-small", ncol=2)
    figure.suptitle("Language model: validation perplexity after pruning and after fine-tuning")
    return figure


def _val_perplexity(phase: str) -> Metric:
    """The validation perplexity of ``phase`` (``"pruned"`` or ``"finetuned"``) of a record."""
    return lambda record: float(record[phase]["val_perplexity"])


LM_FIGURES: dict[str, Callable[[list[Record]], Figure | None]] = {
    "lm_perplexity_vs_lambda": fig_lm_perplexity,
}
"""Figures of language-model sweeps, over all their target sparsities at once."""


def write_figures(
    records: list[Record], out_dir: str | Path, formats: Sequence[str] = ("png", "pdf")
) -> list[Path]:
    """Draw every figure that the records support; return the files written.

    The paper's figures (:data:`FIGURES`) are drawn from the runs done as in the paper only
    (:func:`~.analysis.paper_records`); :data:`BEYOND_FIGURES` and :data:`LM_FIGURES` from all
    of them. The records should share one target sparsity (the paper's figures average over
    whatever they are given); :func:`write_lm_figures` draws a language-model sweep over all of
    its sparsities.
    """
    paper = paper_records(records)
    drawings = [(stem, draw, paper) for stem, draw in FIGURES.items()]
    drawings += [(stem, draw, records) for stem, draw in (BEYOND_FIGURES | LM_FIGURES).items()]
    return _save(drawings, Path(out_dir), formats)


def write_lm_figures(
    records: list[Record], out_dir: str | Path, formats: Sequence[str] = ("png", "pdf")
) -> list[Path]:
    """Draw :data:`LM_FIGURES` (one panel per target sparsity); return the files written."""
    drawings = [(stem, draw, records) for stem, draw in LM_FIGURES.items()]
    return _save(drawings, Path(out_dir), formats)


def _save(
    drawings: list[tuple[str, Callable[[list[Record]], Figure | None], list[Record]]],
    out: Path,
    formats: Sequence[str],
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, draw, chosen in drawings:
        figure = draw(chosen)
        if figure is None:
            continue
        for extension in formats:
            path = out / f"{stem}.{extension}"
            figure.savefig(path, dpi=110)
            written.append(path)
    return written
