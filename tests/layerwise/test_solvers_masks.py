"""Mask-choosing solvers: invariants on random and real (digits) layers in float64, OBS's sweep
against a brute-force OBS, and their refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lossprune import NM, Blocks
from lossprune.layerwise.solvers import (
    ADMM,
    OBS,
    Damping,
    IterativeThresholding,
    LayerProblem,
    Pattern,
    Stages,
    refit,
)
from lossprune.layerwise.solvers.problem import damped_objective
from lossprune.selection import Layerwise, Targets, is_nm

from .solver_cases import DEVICES, digits_problems, random_problem


@dataclasses.dataclass(frozen=True)
class RowSelection:
    """Test-only per-row selection: each row keeps exactly round(in * (1 - p)) entries (lowest
    scores pruned first, ties to the lower index, already pruned entries first)."""

    def check_schedule(self, layouts, targets, min_density):
        pass

    def select(self, scores, masks, *, sparsity, min_density, layouts):
        out = {}
        for name, score in scores.items():
            kept = masks[name]
            keep = round(kept.shape[1] * (1 - sparsity))
            key = score.masked_fill(~kept, -math.inf)
            order = key.sort(dim=1, stable=True, descending=False).indices
            mask = torch.zeros_like(kept)
            mask.scatter_(1, order[:, kept.shape[1] - keep :], True)
            assert not (mask & ~kept).any()
            out[name] = mask
        return out


SOLVERS = {
    "obs": OBS(block_size=5),
    "admm": ADMM(max_iter=60, min_iter=6),
    "iht": IterativeThresholding(max_iter=5),
    "stages-obs": Stages(6, "obs"),
    "stages-obd": Stages(6, "obd"),
}
PATTERNS = {
    "layerwise-50": (Layerwise(), 0.5),
    "layerwise-70": (Layerwise(), 0.7),
    "row-50": (RowSelection(), 0.5),
    "2:4": (NM(2, 4), 0.5),
}


def check_pattern(name: str, mask: torch.Tensor, sparsity: float) -> None:
    if name.startswith("layerwise"):
        assert int((~mask).sum()) == round(mask.numel() * sparsity)
    elif name.startswith("row"):
        assert (mask.sum(1) == round(mask.shape[1] * (1 - sparsity))).all()
    else:
        assert is_nm(mask, 2, 4, dim=1)
        assert int(mask.sum()) == mask.numel() // 2


def check_invariants(solver, problem, pattern_name) -> None:
    selection, sparsity = PATTERNS[pattern_name]
    solved = solver.solve(problem, Pattern(selection), sparsity)
    assert not (solved.mask & ~problem.kept).any()
    assert torch.equal(solved.weight != 0, solved.mask & (solved.weight != 0))
    check_pattern(pattern_name, solved.mask, sparsity)
    delta = solver.damping.value(problem.gram)
    objective = float(damped_objective(problem, solved.weight, delta).sum())
    exact = refit(problem, solved.mask, solver.damping, method="cholesky")
    best = float(damped_objective(problem, exact.weight, delta).sum())
    untouched = float(damped_objective(problem, problem.reference * solved.mask, delta).sum())
    assert objective <= best * (1 + 1e-9) + 1e-12
    assert objective <= untouched * (1 + 1e-12)
    again = solver.solve(problem, Pattern(selection), sparsity)
    assert torch.equal(again.mask, solved.mask) and torch.equal(again.weight, solved.weight)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_on_random_layers(solver, pattern):
    problem, _ = random_problem(6, 16, 48, seed=4)
    check_invariants(SOLVERS[solver], problem, pattern)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("pattern", ["layerwise-70", "2:4", pytest.param("row-50", marks=SLOW)])
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    "layer", [pytest.param(0, id="pixels", marks=SLOW), pytest.param(1, id="relu1")]
)
def test_solvers_on_real_layers(solver, pattern, layer):
    problem = digits_problems()[layer]
    check_invariants(SOLVERS[solver], problem, pattern)


@pytest.mark.parametrize("solver", SOLVERS)
def test_kept_masks_only_shrink(solver):
    problem, _ = random_problem(6, 16, 48, seed=5)
    generator = torch.Generator().manual_seed(5)
    kept = torch.rand(problem.kept.shape, generator=generator) > 0.25
    kept[:, 0] = True  # some columns fully kept, others not
    problem = problem._replace(kept=kept)
    solved = SOLVERS[solver].solve(problem, Pattern(Layerwise()), 0.6)
    assert not (solved.mask & ~kept).any()
    assert int((~solved.mask).sum()) == round(kept.numel() * 0.6)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("pattern", ["layerwise-50", "2:4"])
def test_ties_follow_the_selection_rule(solver, pattern):
    """Equal weights and uncorrelated, equal inputs: every score ties, so the mask is the
    selection's own tie rule (lower index pruned first). ADMM's first projection is, but its
    dual then lifts the pruned entries above the kept ones (every mask is as good here): its
    answer is the same on every run."""
    reference = torch.ones(4, 8, dtype=torch.float64)
    problem = LayerProblem(reference, torch.eye(8, dtype=torch.float64), reference > 0)
    selection, sparsity = PATTERNS[pattern]
    solved = SOLVERS[solver].solve(problem, Pattern(selection), sparsity)
    expected = Pattern(selection)(torch.zeros_like(reference), problem.kept, sparsity)
    if solver == "admm":
        again = SOLVERS[solver].solve(problem, Pattern(selection), sparsity)
        assert torch.equal(solved.mask, again.mask)
        assert solved.error == pytest.approx(refit(problem, expected).error)
    else:
        assert torch.equal(solved.mask, expected)


def test_one_stage_is_prune_then_refit():
    problem, _ = random_problem(6, 16, 48, seed=6)
    hessian_diagonal = problem.gram.diagonal() + Damping().value(problem.gram)
    scores = problem.reference.square() * hessian_diagonal
    mask = Pattern()(scores, problem.kept, 0.5)
    solved = Stages(1, "obd").solve(problem, Pattern(), 0.5)
    assert torch.equal(solved.mask, mask)
    torch.testing.assert_close(solved.weight, refit(problem, mask, method="cholesky").weight)


def test_blocks_pattern_prunes_whole_tiles():
    problem, _ = random_problem(6, 16, 48, seed=7)
    solved = ADMM(max_iter=30).solve(problem, Pattern(Blocks(2, 4, scope="layerwise")), 0.5)
    tiles = solved.mask.reshape(3, 2, 4, 4).permute(0, 2, 1, 3).reshape(3, 4, 8)
    assert ((tiles.all(-1)) | (~tiles.any(-1))).all()
    assert int((~solved.mask).sum()) == 48


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_solves_agree_with_float64(solver, device):
    problem, _ = random_problem(6, 16, 48, seed=8, device=device)
    single = LayerProblem(problem.reference.float(), problem.gram.float(), problem.kept)
    exact = SOLVERS[solver].solve(problem, Pattern(NM(2, 4)), 0.5)
    solved = SOLVERS[solver].solve(single, Pattern(NM(2, 4)), 0.5)
    assert solved.weight.dtype == torch.float32 and solved.weight.device == single.gram.device
    # The same solve up to rounding; a near-tie may go the other way in float32.
    assert solved.relative_error == pytest.approx(exact.relative_error, rel=1e-2)


# --------------------------------------------------------------------------------------------
# OBS's sweep against a brute-force OBS
# --------------------------------------------------------------------------------------------


def brute_force_obs(problem, pattern, sparsity, block_size, delta):
    """Column by column, each time inverting the Hessian of the columns not yet visited."""
    weight = problem.reference.clone()
    hessian = problem.gram + delta * torch.eye(weight.shape[1], dtype=weight.dtype)
    mask = problem.kept.clone()
    inputs = weight.shape[1]
    group = pattern.local_columns
    for column in range(inputs):
        inverse = torch.linalg.inv(hessian[column:, column:])
        if group is None and column % block_size == 0:  # the prefix rule of OBS's docstring
            stop = min(column + block_size, inputs)
            scores = weight[:, :stop].square().clone()
            costs = torch.stack([torch.linalg.inv(hessian[j:, j:])[0, 0] for j in range(stop)])
            scores /= costs
            scores[:, :column] = torch.finfo(weight.dtype).max
            mask[:, :stop] = pattern(scores, mask[:, :stop], sparsity)
        if group and column % group == 0:
            costs = torch.stack(
                [torch.linalg.inv(hessian[j:, j:])[0, 0] for j in range(column, column + group)]
            )
            local = weight[:, column : column + group].square() / costs
            mask[:, column : column + group] = pattern(
                local, mask[:, column : column + group], sparsity
            )
        pruned = ~mask[:, column]
        step = weight[pruned, column : column + 1] / inverse[0, 0]
        weight[pruned, column:] -= step * inverse[0]
    return weight.masked_fill(~mask, 0.0), mask


@pytest.mark.parametrize("block_size", [1, 4, 7, 128])
@pytest.mark.parametrize("selection", [Layerwise(), NM(2, 4), RowSelection()], ids=str)
def test_obs_sweep_is_optimal_brain_surgeon_column_by_column(selection, block_size):
    problem, _ = random_problem(5, 12, 40, seed=9)
    damping = Damping(relative=0.05)
    solved = OBS(block_size=block_size, damping=damping, refit=False).solve(
        problem, Pattern(selection), 0.5
    )
    effective = block_size if not isinstance(selection, NM) else -(-block_size // 4) * 4
    weight, mask = brute_force_obs(
        problem, Pattern(selection), 0.5, effective, damping.value(problem.gram)
    )
    assert torch.equal(solved.mask, mask)
    torch.testing.assert_close(solved.weight, weight, atol=1e-10, rtol=1e-9)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    ("pattern", "sparsity", "error", "message"),
    [
        (Targets({"w": 0.5}), 0.5, TypeError, "Pattern: selection must be a Selection"),
        ("layerwise", 0.5, TypeError, "Pattern: selection must be a Selection"),
        (Layerwise(), 1.0, ValueError, "sparsity must satisfy"),
        (Layerwise(), "half", TypeError, "sparsity must be a real number"),
        (NM(2, 4), 0.7, ValueError, "final sparsity must be 1 - n/m"),
        (NM(2, 5), 0.6, ValueError, "m = 5 must divide"),
    ],
)
def test_bad_patterns_and_sparsities_are_refused(solver, pattern, sparsity, error, message):
    problem, _ = random_problem(6, 16, 48)
    with pytest.raises(error, match=message):
        SOLVERS[solver].solve(problem, pattern, sparsity)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: OBS(block_size=0), "OBS: block_size must be >= 1"),
        (lambda: OBS(damping=0.1), "OBS: damping must be a Damping"),
        (lambda: ADMM(rho=0.0), "ADMM: rho must be > 0"),
        (lambda: ADMM(tol=-1.0), "ADMM: tol must be finite and >= 0"),
        (lambda: ADMM(max_iter=0), "ADMM: max_iter must be >= 1"),
        (lambda: ADMM(damping=None), "ADMM: damping must be a Damping"),
        (lambda: ADMM(growth=(1.2, 0.9, 1.1)), "ADMM: growth must be three factors >= 1"),
        (lambda: ADMM(growth=(1.2, 1.1)), "ADMM: growth must be three factors >= 1"),
        (lambda: ADMM(growth=(1.2, "fast", 1.1)), "ADMM: growth must be a real number"),
        (lambda: Stages(0), "Stages: stages must be >= 1"),
        (lambda: Stages(4, "wanda"), "Stages: score must be one of"),
        (lambda: Stages(damping=1), "Stages: damping must be a Damping"),
        (lambda: IterativeThresholding(step=0), "IterativeThresholding: step must be > 0"),
        (lambda: IterativeThresholding(max_iter=1.5), "IterativeThresholding: max_iter must be"),
        (lambda: IterativeThresholding(damping="x"), "IterativeThresholding: damping must be"),
    ],
)
def test_bad_solver_options_are_refused(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()
