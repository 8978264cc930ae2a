"""Blocks(h, w): whole tiles scored as one step, exact counts in tiles, against brute force."""

import pytest
import torch
from torch import nn

from lossprune import (
    OBD,
    Blocks,
    GraSP,
    LinearModel,
    LinearSchedule,
    Magnitude,
    Pruner,
    QuadraticModel,
    SynFlow,
    Wanda,
    scores,
)
from lossprune.curvature import Statistic, compute_statistics
from lossprune.selection import ParameterLayout, parameter_layouts
from tests import brute_force as bf
from tests.test_contract import raw
from tests.test_nm import CE, MODELS, batch

ADDITIVE = {
    "magnitude": Magnitude(),
    "obd": OBD(lam=1e-3),
    "grasp": GraSP(),
    "synflow": SynFlow(),
    "wanda": Wanda(),
}
LOSS_MODELS = {"lm": LinearModel(lam=1e-3), "qm": QuadraticModel(lam=1e-3)}


def tiles_of(tensor, layout, h, w):
    """(rows/h, h, cols/w, w) tiles of the (outputs, inputs) view, by plain permute/reshape."""
    dims = list(layout.input_dims)
    order = [d for d in range(tensor.dim()) if d not in dims] + dims
    inputs = 1
    for d in dims:
        inputs *= tensor.shape[d]
    matrix = tensor.permute(order).reshape(-1, inputs)
    return matrix.reshape(matrix.shape[0] // h, h, inputs // w, w)


def expected_tile_scores(name, model, params, data, layouts, h, w):
    """Each tile's score from the formulas: sums of per-weight terms, |·| outside the sum."""
    if name in ADDITIVE:
        per_weight = scores(model, ADDITIVE[name], data, loss_fn=CE)
        return {k: tiles_of(v, layouts[k], h, w).sum((1, 3)) for k, v in per_weight.items()}
    lam = 1e-3
    stats = compute_statistics(model, params, data, CE, [Statistic("fisher")])
    result = {}
    for k, p in params.items():
        g = stats.grad[k]
        if name == "lm":
            signed = g * p
        else:
            signed = -g * p + 0.5 * stats[Statistic("fisher")][k] * p**2
        tile_sums = [tiles_of(t, layouts[k], h, w).sum((1, 3)) for t in (signed, p**2)]
        result[k] = tile_sums[0].abs() + 0.5 * lam * tile_sums[1]
    return result


def brute_force_tiles(tile_scores, fraction):
    """Global exact-k over all tiles: sort by (score, tensor order, row-major index)."""
    entries = []
    for order, (name, t) in enumerate(tile_scores.items()):
        for index, value in enumerate(t.reshape(-1).tolist()):
            entries.append((value, order, index, name))
    k = round(len(entries) * fraction)
    pruned = {name: torch.zeros(t.numel(), dtype=torch.bool) for name, t in tile_scores.items()}
    for _, _, index, name in sorted(entries)[:k]:
        pruned[name][index] = True
    return {name: ~p.reshape(tile_scores[name].shape) for name, p in pruned.items()}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("criterion_name", sorted({**ADDITIVE, **LOSS_MODELS}))
def test_every_criterion_prunes_the_tiles_its_group_score_ranks_lowest(model_name, criterion_name):
    make, shape = MODELS[model_name]
    model = make().double().eval()
    data = batch(shape)
    criterion = {**ADDITIVE, **LOSS_MODELS}[criterion_name]
    pruner = Pruner(model, criterion, LinearSchedule(0.5, 1), loss_fn=CE, data=data,
                    scope=Blocks(1, 2), on_collapse="ignore")  # fmt: skip
    layouts = parameter_layouts(model, pruner.params)
    params = {k: p.detach() for k, p in pruner.params.items()}
    expected = brute_force_tiles(
        expected_tile_scores(criterion_name, model, params, data, layouts, 1, 2), 0.5
    )
    pruner.step()
    for name, mask in pruner.masks.items():
        tiles = tiles_of(mask, layouts[name], 1, 2)
        assert bool((tiles == tiles[:, :1, :, :1]).all())  # whole tiles
        assert torch.equal(tiles[:, 0, :, 0], expected[name]), name


def test_the_quadratic_model_sums_inside_the_absolute_value_against_brute_force():
    """QM's 2x2 tile score from a brute-force gradient and per-example Fisher loop."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    inputs, targets = torch.randn(15, 4, dtype=torch.float64), torch.randint(0, 2, (15,))
    params = bf.weights(model)
    g = bf.unflatten(bf.gradient(model, params, inputs, targets, CE), params)
    d = bf.unflatten(bf.fisher_diagonal_loop(model, params, inputs, targets), params)
    lam = 0.1
    layout = {k: ParameterLayout(tuple(p.shape), "Linear", (1,)) for k, p in params.items()}
    reference = {}
    for k, p in params.items():
        signed = tiles_of(-g[k] * p + 0.5 * d[k] * p**2, layout[k], 2, 2).sum((1, 3))
        reference[k] = signed.abs() + 0.5 * lam * tiles_of(p**2, layout[k], 2, 2).sum((1, 3))
    selection = Blocks(2, 2)
    got = QuadraticModel(lam=lam, curvature="fisher").group_score(
        _context(model, params, inputs, targets),
        lambda name, t: selection.group_sum(layout[name], t),
    )
    for k in params:
        torch.testing.assert_close(tiles_of(got[k], layout[k], 2, 2)[:, 0, :, 0], reference[k])
    # Not the sum of the weights' own scores: signs cancel inside the tile.
    per_weight = scores(model, QuadraticModel(lam=lam), (inputs, targets), loss_fn=CE)
    summed = {k: tiles_of(v, layout[k], 2, 2).sum((1, 3)) for k, v in per_weight.items()}
    assert any(bool((summed[k] > reference[k] + 1e-9).any()) for k in params)


def _context(model, params, inputs, targets):
    from lossprune import ScoringContext

    stats = compute_statistics(model, params, (inputs, targets), CE, [Statistic("fisher")])
    return ScoringContext(model, params, stats, (inputs, targets))


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_exact_counts_in_tiles_over_a_schedule_and_masks_only_grow(scope):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    data = batch((8,), 20)
    schedule = LinearSchedule(0.6, 3)
    pruner = Pruner(model, QuadraticModel(lam=1e-3), schedule, loss_fn=CE, data=data,
                    scope=Blocks(2, 2, scope=scope))  # fmt: skip
    layouts = parameter_layouts(model, pruner.params)
    counts = {k: tiles_of(m, layouts[k], 2, 2)[:, 0, :, 0].numel() for k, m in pruner.masks.items()}
    total = sum(counts.values())
    previous = dict(pruner.masks)
    for target in schedule:
        pruner.step()
        pruned = {
            k: int((~tiles_of(m, layouts[k], 2, 2)[:, 0, :, 0]).sum())
            for k, m in pruner.masks.items()
        }
        if scope == "global":
            assert sum(pruned.values()) == round(total * target)
        else:
            assert pruned == {k: round(n * target) for k, n in counts.items()}
        assert all(not bool((pruner.masks[k] & ~previous[k]).any()) for k in previous)
        previous = dict(pruner.masks)


@pytest.mark.parametrize(
    "scope, match",
    [
        (Blocks(4, 2), "does not divide into 4 x 2 tiles"),
        (Blocks(1, 3), "does not divide into 1 x 3 tiles"),
    ],
)
def test_tiles_that_do_not_divide_a_matrix_are_refused_before_anything_changes(scope, match):
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    before = raw(model.state_dict())
    with pytest.raises(ValueError, match=match):
        Pruner(model, Magnitude(), LinearSchedule(0.5, 2), scope=scope)
    assert raw(model.state_dict()) == before


def test_blocks_arguments_and_per_weight_scores_are_refused():
    with pytest.raises(TypeError, match="h must be an int"):
        Blocks(1.5, 2)
    with pytest.raises(ValueError, match="w must be >= 1"):
        Blocks(2, 0)
    with pytest.raises(ValueError, match="scope must be 'global' or 'layerwise'"):
        Blocks(2, 2, scope="row")
    layout = ParameterLayout((2, 2), "Linear", (1,))
    with pytest.raises(ValueError, match="differ within a tile"):
        Blocks(2, 2).select({"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])},
                            {"w": torch.ones(2, 2, dtype=torch.bool)}, sparsity=0.5,
                            min_density=0.0, layouts={"w": layout})  # fmt: skip
