"""The five findings of PAPER.md, checked against sweep records with the numbers that decide them.

Each ``finding_*`` function returns a :class:`Finding`: the paper's claim, what the records show
(a short text with the numbers) and a verdict: ``"holds"``, ``"partly"``, ``"does not hold"`` or
``"not measured"``. The rules behind each verdict are stated in the docstrings; they are
deliberately simple and come with the numbers, so a reader can judge them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .analysis import (
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
    "Finding",
    "findings",
    "findings_table",
    "beyond_table",
    "HOLDS",
    "PARTLY",
    "FAILS",
    "UNMEASURED",
]


HOLDS, PARTLY, FAILS, UNMEASURED = "holds", "partly", "does not hold", "not measured"


@dataclass(frozen=True)
class Finding:
    """One claim of the paper, what the records say about it, and the verdict."""

    number: int
    claim: str
    measured: str
    verdict: str


def _verdict(*parts: bool) -> str:
    """All sub-claims hold: holds; some: partly; none: does not hold."""
    return HOLDS if all(parts) else PARTLY if any(parts) else FAILS


def _mean_delta(records: list[Record], **where: object) -> dict[float, float]:
    """Mean ΔL over seeds, per λ, of the records matching ``where``."""
    return {lam: mean_std(v)[0] for lam, v in by_lam(select(records, **where), delta_loss).items()}


def finding_stages(records: list[Record]) -> Finding:
    """1. ΔL falls with π for LM/QM/OBD; MP flat.

    Holds when, for every loss model, the best-λ ΔL falls from the smallest to the largest π,
    and MP's ΔL varies by less than 5% across π (MP ignores λ by construction).
    """
    claim = "More stages π drastically reduce ΔL for LM, QM, OBD; MP is flat in λ and π"
    exp = select(records, schedule="exponential")
    stages = values(select(exp, criterion=LOSS_MODELS), "stages")
    if len(stages) < 2:
        return Finding(1, claim, "needs at least two values of π", UNMEASURED)
    parts, falls = [], []
    for criterion in LOSS_MODELS:
        if not select(exp, criterion=criterion):
            continue  # e.g. a sweep without LM
        best = [min(_mean_delta(exp, criterion=criterion, stages=pi).values()) for pi in stages]
        falls.append(best[-1] < best[0])
        parts.append(f"{criterion} " + " → ".join(f"{v:.3f}" for v in best))
    magnitude = [
        mean_std(map(delta_loss, select(exp, criterion="MP", stages=pi)))[0]
        for pi in stages
        if select(exp, criterion="MP", stages=pi)
    ]
    spread = (max(magnitude) - min(magnitude)) / np.mean(magnitude) if magnitude else np.nan
    text = (
        f"best-λ ΔL for π = {', '.join(map(str, stages))}: {'; '.join(parts)}; "
        f"MP " + " / ".join(f"{v:.3f}" for v in magnitude) + f" (relative spread {spread:.1%})"
    )
    return Finding(1, claim, text, _verdict(all(falls), bool(spread < 0.05)))


def finding_lambda(records: list[Record]) -> Finding:
    """2. A moderate λ > 0 helps; OBD with π = 1 and λ = 0 is the worst loss model.

    Sub-claims: the best λ is positive for a majority of (loss model, π) pairs; OBD at π = 1,
    λ = 0 has the largest ΔL of all loss-model runs at π = 1; it collapses a layer (a layer keeps
    no weight in at least one seed).
    """
    claim = "A moderate λ > 0 helps; OBD with π = 1, λ = 0 diverges (layer collapse)"
    exp = select(records, schedule="exponential", criterion=LOSS_MODELS)
    if not exp:
        return Finding(2, claim, "no loss-model runs", UNMEASURED)
    wins, parts = 0, []
    pairs = [
        (c, pi)
        for c in LOSS_MODELS
        for pi in values(exp, "stages")
        if select(exp, criterion=c, stages=pi)
    ]
    for criterion, pi in pairs:
        means = _mean_delta(exp, criterion=criterion, stages=pi)
        best = min(means, key=means.__getitem__)
        wins += best > 0
        if 0.0 in means:
            parts.append(f"{criterion} π={pi}: λ*={best:g} ({means[best]:.3f} vs {means[0.0]:.3f})")
    one_shot = {
        (c, lam): v
        for c in LOSS_MODELS
        for lam, v in _mean_delta(exp, criterion=c, stages=1).items()
    }
    obd = select(exp, criterion="OBD", stages=1, lam=0.0)
    if not one_shot or not obd:
        return Finding(2, claim, "; ".join(parts), UNMEASURED)
    worst = max(one_shot, key=one_shot.__getitem__)
    density = min(min(r["layer_density"].values()) for r in obd)
    collapsed = sum(bool(r["collapsed_layers"]) for r in obd)
    text = (
        f"best λ > 0 in {wins}/{len(pairs)} (criterion, π) pairs; "
        + "; ".join(parts)
        + f". Worst at π=1: {worst[0]} λ={worst[1]:g} (ΔL {one_shot[worst]:.3f}); "
        f"OBD π=1 λ=0: ΔL {one_shot.get(('OBD', 0.0), np.nan):.3f}, smallest layer density "
        f"{density:.4f}, collapsed layers in {collapsed}/{len(obd)} seeds"
    )
    verdict = _verdict(wins > len(pairs) / 2, worst == ("OBD", 0.0), collapsed > 0)
    return Finding(2, claim, text, verdict)


def finding_schedules(records: list[Record]) -> Finding:
    """3. Exponential vs linear schedule.

    Sub-claims: at the smallest π with linear runs, exponential gives a smaller largest per-stage
    ‖Δθ‖² and a smaller ΔL; at the largest π the ΔL ratio linear/exponential is within 5% of 1.
    """
    claim = (
        "Exponential schedule: less ‖Δθ‖² per stage and smaller ΔL than linear at π = 14; "
        "the advantage vanishes at π = 140"
    )
    linear = select(records, schedule="linear")
    if not linear:
        return Finding(3, claim, "no linear-schedule runs", UNMEASURED)
    criterion = linear[0]["config"]["criterion"]
    lams = tuple(values(linear, "lam"))
    ratios, parts, smaller_steps = [], [], []
    for pi in values(linear, "stages"):
        runs = {
            s: select(records, criterion=criterion, stages=pi, lam=lams, schedule=s)
            for s in ("exponential", "linear")
        }
        loss = {s: mean_std(map(delta_loss, r))[0] for s, r in runs.items()}
        step = {
            s: mean_std(max(x["stages"]["step_norm_sq"]) for x in r)[0] for s, r in runs.items()
        }
        ratios.append(loss["linear"] / loss["exponential"])
        smaller_steps.append(step["exponential"] < step["linear"])
        parts.append(
            f"π={pi}: ΔL exp {loss['exponential']:.3f} vs lin {loss['linear']:.3f} "
            f"(ratio {ratios[-1]:.2f}), largest stage ‖Δθ‖² exp "
            f"{step['exponential']:.2f} vs lin {step['linear']:.2f}"
        )
    lam_list = ", ".join(f"{x:g}" for x in lams)
    text = f"{criterion}, mean over λ ∈ {{{lam_list}}}: " + "; ".join(parts)
    if len(ratios) < 2:
        return Finding(3, claim, text + " (one π only)", UNMEASURED)
    return Finding(
        3, claim, text, _verdict(smaller_steps[0] and ratios[0] > 1, abs(ratios[-1] - 1) < 0.05)
    )


def finding_correlation(records: list[Record]) -> Finding:
    """4. ΔL predicts the gap before fine-tuning, only weakly after (except MLP/MNIST).

    Reports Spearman's ρ between ΔL and the validation gap before and after fine-tuning per
    criterion, and GraSP's ΔL and gap. Sub-claims: ρ before fine-tuning is at least 0.5 and
    higher than ρ after it for every loss model (the paper's MLP exception means a strong ρ
    after is no failure); GraSP's gap after fine-tuning is at most the median of the others.
    """
    claim = (
        "Low ΔL gives the best networks right after pruning; after fine-tuning ΔL correlates "
        "weakly with the gap (except MLP on MNIST); GraSP has a huge ΔL yet fine-tunes well"
    )
    parts, before_wins, grasp_ok = [], [], True
    for criterion in LOSS_MODELS:
        runs = select(records, criterion=criterion)
        if not runs:
            continue
        xs = [delta_loss(r) for r in runs]
        rho_b = spearman(xs, [gap_before(r) for r in runs])
        rho_a = spearman(xs, [gap_after(r) for r in runs])
        before_wins.append(rho_b >= 0.5 and rho_b > rho_a)
        parts.append(f"{criterion} ρ before {rho_b:.2f}, after {rho_a:.2f}")
    grasp = select(records, criterion="GraSP")
    if grasp:
        others = select(records, criterion=(*LOSS_MODELS, "MP"))
        median_gap = float(np.median([gap_after(r) for r in others]))
        grasp_ok = mean_std(map(gap_after, grasp))[0] <= median_gap
        parts.append(
            f"GraSP ΔL {mean_std(map(delta_loss, grasp))[0]:.3f}, gap after "
            f"{mean_std(map(gap_after, grasp))[0]:.3f} (median of the others "
            f"{median_gap:.3f})"
        )
    if not before_wins:
        return Finding(4, claim, "no loss-model runs", UNMEASURED)
    return Finding(4, claim, "; ".join(parts), _verdict(all(before_wins), grasp_ok))


def finding_one_epoch(records: list[Record]) -> Finding:
    """5. One epoch of fine-tuning erases most of the difference in loss after pruning.

    Compares the spread (standard deviation over runs of LM/QM/OBD/MP) of the validation loss
    right after pruning with its spread after one fine-tuning epoch. Holds when it shrinks by
    more than half over all runs; partly when only over the multi-stage runs (π > 1), whose
    masks fine-tuning can still repair.
    """
    claim = "The difference in loss right after pruning mostly disappears after one epoch"
    runs = [
        r
        for r in select(records, criterion=(*LOSS_MODELS, "MP"))
        if len(r.get("finetune_history", [])) > 1
    ]
    multi = [r for r in runs if r["config"]["stages"] > 1]
    if len(runs) < 2:
        return Finding(5, claim, "needs runs with at least one fine-tuning epoch", UNMEASURED)
    parts, shrinks = [], []
    for name, group in (("all", runs), ("π > 1", multi)):
        if len(group) < 2:
            continue
        loss = [
            float(np.std([r["finetune_history"][e]["val_loss"] for r in group])) for e in (0, 1)
        ]
        error = [
            float(np.std([r["finetune_history"][e]["val_error"] for r in group])) for e in (0, 1)
        ]
        shrinks.append(loss[1] < 0.5 * loss[0])
        parts.append(
            f"{name} ({len(group)} runs): std of validation loss {loss[0]:.3f} → "
            f"{loss[1]:.3f} ({loss[1] / loss[0]:.0%}), of validation error "
            f"{error[0]:.3f} → {error[1]:.3f}"
        )
    verdict = HOLDS if shrinks[0] else PARTLY if any(shrinks) else FAILS
    return Finding(5, claim, "after pruning → after one epoch, " + "; ".join(parts), verdict)


def findings(records: list[Record]) -> list[Finding]:
    """All five findings, on the finished runs of ``records``."""
    # The paper's runs only: compensation or a minimum density would blur its findings.
    records = paper_records(ok_records(records))
    checks = (
        finding_stages,
        finding_lambda,
        finding_schedules,
        finding_correlation,
        finding_one_epoch,
    )
    return [check(records) for check in checks]


def findings_table(results: list[Finding]) -> str:
    """A Markdown table: finding, claim, holds, numbers."""
    lines = ["| # | paper | on these runs | numbers |", "|---|---|---|---|"]
    for f in results:
        lines.append(f"| {f.number} | {f.claim} | {f.verdict} | {f.measured} |")
    return "\n".join(lines) + "\n"


def _fmt(values: list[float], digits: str = ".3f") -> str:
    return "–" if not values else format(float(np.mean(values)), digits)


def _lam_range(lams: list[float]) -> str:
    if not lams:
        return "–"
    low, high = min(lams), max(lams)
    return f"{low:g}" if low == high else f"{low:g}–{high:g} (median {np.median(lams):g})"


def beyond_table(records: list[Record]) -> str:
    """A Markdown table of the runs beyond the paper, next to the paper's runs of the same setup.

    One row per criterion, π, λ and weight update (see :func:`~.analysis.update_label`), means
    over seeds: ΔL (whole training set), validation gap before and after fine-tuning, CG
    iterations per run, the λ of the compensation step over all stages (``auto_lam`` chooses
    it per stage), the number of stages where ``auto_lam`` fell back to zeroing only, and the
    quadratic model's predicted ΔL summed over the stages next to the measured one (both on the
    scoring data). Empty when no record goes beyond the paper.
    """
    beyond = [r for r in records if update_label(r) != "zero" or r["config"].get("diagnostics")]
    if not beyond:
        return ""
    keys = sorted(
        {(r["config"]["criterion"], r["config"]["stages"], r["config"]["lam"]) for r in beyond},
        key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2]),
    )
    lines = [
        "| criterion | π | λ | update | runs | ΔL | gap before FT | gap after FT "
        "| CG iters/run | λu used | stages not compensated | Σ predicted ΔL | Σ measured ΔL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for criterion, stages, lam in keys:
        runs = select(records, criterion=criterion, stages=stages, lam=lam, schedule="exponential")
        by_update: dict[str, list[Record]] = {}
        for r in runs:
            by_update.setdefault(update_label(r), []).append(r)
        for label in sorted(by_update, key=lambda u: (u != "zero", u)):
            group = by_update[label]
            ok = ok_records(group)
            diverged = len(group) - len(ok)
            count = f"{len(ok)}" + (f" (+{diverged} diverged)" if diverged else "")
            stage = [r["stages"] for r in ok]
            cg = [sum(n or 0 for n in s["cg_iterations"]) for s in stage if "cg_iterations" in s]
            lams = [x for s in stage for x in s.get("update_lam", []) if x is not None]
            fallback = [
                sum(c is False for c in s["compensated"]) for s in stage if "compensated" in s
            ]
            predicted = [sum(s["predicted_delta"]) for s in stage if "predicted_delta" in s]
            measured = [
                sum(a - b for a, b in zip(s["loss_after"], s["loss_before"], strict=True))
                for s in stage
                if "loss_after" in s
            ]
            lam_text = "–" if lam is None else f"{lam:g}"
            lines.append(
                f"| {criterion} | {stages} | {lam_text} | {label} | {count} "
                f"| {_fmt([delta_loss(r) for r in ok])} | {_fmt([gap_before(r) for r in ok])} "
                f"| {_fmt([gap_after(r) for r in ok])} | {_fmt(cg, '.0f')} | {_lam_range(lams)} "
                f"| {_fmt(fallback, '.1f')} | {_fmt(predicted)} | {_fmt(measured)} |"
            )
    return "\n".join(lines) + "\n"
