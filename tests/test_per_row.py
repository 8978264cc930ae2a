"""Per-row selection (``scope=PerRow()``): exact counts per output row, brute force, refusals."""

import pytest
import torch
from torch import nn

from lossprune import (
    ExponentialSchedule,
    LinearSchedule,
    Magnitude,
    PerRow,
    Pruner,
    Targets,
    scores,
)
from lossprune.selection import ParameterLayout, as_selection, parameter_layouts
from tests.test_contract import raw
from tests.test_nm import CE, CRITERIA, MODELS, batch


def rows_of(tensor, layout):
    """The (outputs, inputs) matrix, input axes flattened, by explicit permutation."""
    inputs = list(layout.input_dims)
    outputs = [d for d in range(tensor.dim()) if d not in inputs]
    return tensor.permute(outputs + inputs).reshape(-1, int(torch.tensor(
        [tensor.shape[d] for d in inputs]).prod()))  # fmt: skip


def brute_force_per_row(score, kept, layout, sparsity):
    """Row by row: already-pruned entries first, then the lowest scores, lower index first."""
    score_rows, kept_rows = rows_of(score, layout), rows_of(kept, layout)
    new = torch.ones_like(kept_rows)
    pruned = round(score_rows.shape[1] * sparsity)
    for r in range(score_rows.shape[0]):
        order = sorted(
            range(score_rows.shape[1]),
            key=lambda j: (bool(kept_rows[r, j]), float(score_rows[r, j]), j),
        )
        for j in order[:pruned]:
            new[r, j] = False
    return new


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("criterion_name", ["magnitude", "qm", "wanda"])
def test_every_row_loses_its_lowest_scores(model_name, criterion_name):
    make, shape = MODELS[model_name]
    model = make().double().eval()
    criterion = CRITERIA[criterion_name]
    data = batch(shape)
    pruner = Pruner(model, criterion, ExponentialSchedule(0.6, 2), loss_fn=CE, data=data,
                    scope=PerRow())  # fmt: skip
    layouts = parameter_layouts(model, pruner.params)
    for target in ExponentialSchedule(0.6, 2):
        before = {k: v.clone() for k, v in pruner.masks.items()}
        expected_scores = scores(model, criterion, data, loss_fn=CE)
        pruner.step()
        for name, mask in pruner.masks.items():
            expected = brute_force_per_row(expected_scores[name], before[name], layouts[name],
                                           target)  # fmt: skip
            assert torch.equal(rows_of(mask, layouts[name]), expected), name
            assert not bool((mask & ~before[name]).any())  # masks only grow


def test_ties_go_to_the_lower_index_and_earlier_pruned_entries_count_first():
    layout = ParameterLayout((2, 4), "Linear", (1,))
    score = torch.tensor([[1.0, 1.0, 0.0, 1.0], [5.0, 2.0, 3.0, 4.0]])
    kept = torch.tensor([[True, True, True, True], [False, True, True, True]])
    mask = PerRow().select({"w": score}, {"w": kept}, sparsity=0.5, min_density=0.0,
                           layouts={"w": layout})["w"]  # fmt: skip
    assert mask.tolist() == [[False, True, False, True], [False, False, True, True]]


def test_shorthand_and_targets_accept_per_row():
    assert as_selection("per_row") == PerRow()
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1),
                    scope=Targets({r"0\.weight": 0.75}, structure="per_row"))  # fmt: skip
    pruner.step()
    assert pruner.masks["0.weight"].sum(1).tolist() == [2, 2, 2, 2]
    assert pruner.masks["2.weight"].sum(1).tolist() == [2, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_density": 0.6}, "min_density=0.6 allows at most"),
        ({"include": r".*bias"}, "not the weight matrix"),
    ],
)
def test_impossible_requests_are_refused_before_anything_changes(kwargs, match):
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    before = raw(model.state_dict())
    with pytest.raises(ValueError, match=match):
        Pruner(model, Magnitude(), LinearSchedule(0.5, 2), scope=PerRow(), **kwargs)
    assert raw(model.state_dict()) == before


def test_masks_that_cannot_be_followed_are_refused():
    layout = ParameterLayout((1, 4), "Linear", (1,))
    kept = torch.tensor([[False, False, True, True]])
    with pytest.raises(ValueError, match="already has more than 1 pruned"):
        PerRow().select({"w": torch.zeros(1, 4)}, {"w": kept}, sparsity=0.25, min_density=0.0,
                        layouts={"w": layout})  # fmt: skip
    with pytest.raises(ValueError, match="non-finite values on kept entries"):
        PerRow().select({"w": torch.tensor([[0.0, float("nan"), 1.0, 2.0]])},
                        {"w": torch.ones(1, 4, dtype=torch.bool)}, sparsity=0.5,
                        min_density=0.0, layouts={"w": layout})  # fmt: skip
