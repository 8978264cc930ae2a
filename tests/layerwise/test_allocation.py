"""Each matrix's share of a global sparsity: the allocation against exhaustive search."""

import itertools

import pytest
import torch

from lossprune import LayerwisePruner, Magnitude, Wanda
from lossprune.layerwise import ErrorAllocation, NetworkAllocation
from lossprune.layerwise.allocation import (
    allocate,
    masked_error_curve,
    network_targets,
    reachable,
)
from lossprune.selection import select_masks
from tests.layerwise.models import batches, tiny
from tests.layerwise.solver_cases import random_problem
from tests.test_contract import raw


def convex(scale, power=2.0, points=6):
    return [(k / (points - 1), scale * (k / (points - 1)) ** power) for k in range(points)]


def test_allocation_minimises_the_total_cost_among_grid_points():
    """On convex curves whose budget falls on grid points, the greedy is optimal: exhaustive."""
    curves = {"a": convex(1.0), "b": convex(3.0), "c": convex(0.5, power=3.0)}
    sizes = {"a": 10, "b": 20, "c": 10}
    grid = [p for p, _ in curves["a"]]
    best = min(
        (
            sum(dict(curves[n])[p] for n, p in zip(sizes, choice))
            for choice in itertools.product(grid, repeat=3)
            if abs(sum(sizes[n] * p for n, p in zip(sizes, choice)) - 0.5 * 40) < 1e-9
        ),
    )
    targets = allocate(curves, sizes, 0.5)
    assert sum(sizes[n] * targets[n] for n in sizes) == pytest.approx(20.0)
    cost = sum(dict(curves[n])[round(targets[n], 6)] for n in sizes)
    assert cost == pytest.approx(best)


def test_a_costly_step_does_not_hide_a_cheap_one_behind_it():
    """A non-convex curve is followed along its lower hull: its costly first half does not hide
    a whole that is cheaper per weight than the other matrix."""
    curves = {"bumpy": [(0.0, 0.0), (0.5, 1.0), (1.0, 1.05)], "linear": convex(1.5, power=1.0)}
    targets = allocate(curves, {"bumpy": 1, "linear": 1}, 0.5)
    assert targets == {"bumpy": pytest.approx(1.0), "linear": 0.0}
    with pytest.raises(ValueError, match="above what min_density allows"):
        allocate({"a": [(0.0, 0.0), (0.5, 1.0)]}, {"a": 4}, 0.75)


def test_rounding_to_reachable_targets_carries_the_shortfall_forward():
    def whole_quarters(name, sparsity):
        return round(4 * sparsity) / 4

    targets = {"a": 0.3, "b": 0.3, "c": 0.3, "d": 0.3}
    got = reachable(targets, dict.fromkeys(targets, 4), whole_quarters)
    assert all(value in (0.25, 0.5) for value in got.values())
    assert sum(4 * value for value in got.values()) == pytest.approx(4 * 0.3 * 4, abs=2)
    assert got == {"a": 0.25, "b": 0.25, "c": 0.5, "d": 0.25}


def test_the_error_curve_is_the_masked_reconstruction_error():
    problem, inputs = random_problem(out=3, inputs=8, tokens=30, seed=1)
    masks = [torch.rand(3, 8, generator=torch.Generator().manual_seed(k)) > 0.4 for k in range(3)]
    curve = masked_error_curve(problem.reference, problem.gram, masks)
    for (sparsity, error), mask in zip(curve, masks):
        pruned = problem.reference * ~mask
        expected = (pruned @ inputs).square().sum() / (problem.reference @ inputs).square().sum()
        assert error == pytest.approx(float(expected), rel=1e-10)
        assert sparsity == pytest.approx(1 - float(mask.float().mean()))


def test_network_targets_are_the_global_ranking():
    scores = {"a": torch.arange(12.0).reshape(3, 4), "b": torch.arange(8.0).reshape(2, 4) + 4}
    targets = network_targets(scores, 0.5, 0.1)
    masks = select_masks(scores, {k: torch.ones_like(v, dtype=bool) for k, v in scores.items()},
                         sparsity=0.5, scope="global", min_density=0.1)  # fmt: skip
    assert targets == {k: 1 - float(m.float().mean()) for k, m in masks.items()}


@pytest.mark.parametrize("allocation", [ErrorAllocation(steps=10), NetworkAllocation()])
def test_a_global_sparsity_is_spread_over_the_matrices(allocation):
    model = tiny("llama")
    pruner = LayerwisePruner(model, Wanda(), 0.6, data=batches(), selection="global",
                             allocation=allocation)  # fmt: skip
    report = pruner.run()
    sizes = [m.shape[0] * m.shape[1] for m in report.matrices]
    # Exact up to one matrix's step (whole entries in every row: Wanda compares rows).
    assert abs(report.sparsity - 0.6) * sum(sizes) <= max(m.shape[0] for m in report.matrices)
    assert len({round(m.sparsity, 3) for m in report.matrices}) > 1
    assert all(m.sparsity <= 1 - allocation.min_density + 1e-9 for m in report.matrices)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"selection": "layerwise", "allocation": ErrorAllocation()}, ValueError, "pass sel"),
        ({"selection": "global", "allocation": "error"}, TypeError, "allocation must be"),
    ],
)
def test_allocation_options_are_checked_before_anything_changes(kwargs, error, match):
    model = tiny("llama")
    before = raw(model.state_dict())
    with pytest.raises(error, match=match):
        LayerwisePruner(model, Magnitude(), 0.5, data=batches(), **kwargs)
    assert raw(model.state_dict()) == before


def test_allocation_settings_are_validated():
    with pytest.raises(ValueError, match="steps must be >= 2"):
        ErrorAllocation(steps=1)
    with pytest.raises(ValueError, match="min_density must satisfy"):
        ErrorAllocation(min_density=1.0)
    with pytest.raises(TypeError, match="criterion must be a Criterion"):
        NetworkAllocation(criterion="obd")
