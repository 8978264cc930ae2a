"""N:M selection (``scope=NM(n, m)``): exact per-group counts, brute-force selection, refusals."""

import math

import pytest
import torch
from torch import nn

from lossprune import (
    NM,
    OBD,
    Compensation,
    ExponentialSchedule,
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
from lossprune.selection import ParameterLayout, parameter_layouts
from lossprune.sparse import is_nm, nm_mask
from tests import brute_force as bf
from tests.hf_models import tiny_gpt2
from tests.test_contract import raw

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D
CE = nn.CrossEntropyLoss()


def mlp():
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3))


def cnn():
    return nn.Sequential(
        nn.Conv2d(4, 4, 2),  # inputs 4·2·2 = 16
        nn.Tanh(),
        nn.Conv2d(4, 2, 1),  # inputs 4
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    )


def conv1d_mlp():
    """Hugging Face Conv1D layers, weights stored (in, out): the inputs are dim 0."""
    return nn.Sequential(Conv1D(8, 8), nn.Tanh(), Conv1D(3, 8))


MODELS = {
    "mlp": (mlp, (8,)),
    "cnn": (cnn, (4, 3, 3)),
    "conv1d": (conv1d_mlp, (8,)),
}


def batch(shape, n=12):
    return torch.randn(n, *shape, dtype=torch.float64), torch.randint(0, 3, (n,))


def brute_force_nm(scores, kept, layout, pruned_per_group, m):
    """A plain loop over the groups of the (outputs, inputs) view: sort by (already pruned,
    score, input index) and prune the first ``pruned_per_group``."""
    dims = list(layout.input_dims)
    order = [d for d in range(len(layout.shape)) if d not in dims] + dims
    inputs = 1
    for d in dims:
        inputs *= layout.shape[d]
    s = scores.permute(order).reshape(-1, inputs).tolist()
    k = kept.permute(order).reshape(-1, inputs).tolist()
    new = [[True] * inputs for _ in s]
    for row in range(len(s)):
        for start in range(0, inputs, m):
            group = range(start, start + m)
            ranked = sorted(group, key=lambda j: (k[row][j], s[row][j], j))
            for j in ranked[:pruned_per_group]:
                new[row][j] = False
    shaped = torch.tensor(new).reshape([layout.shape[d] for d in order])
    return shaped.permute([order.index(d) for d in range(len(order))])


def group_counts(mask, layout, m):
    dims = list(layout.input_dims)
    order = [d for d in range(mask.dim()) if d not in dims] + dims
    inputs = 1
    for d in dims:
        inputs *= mask.shape[d]
    matrix = mask.permute(order).reshape(-1, inputs)
    return m - matrix.reshape(matrix.shape[0], -1, m).sum(-1)


CRITERIA = {
    "magnitude": Magnitude(),
    "lm": LinearModel(lam=1e-3),
    "qm": QuadraticModel(lam=1e-3),
    "obd": OBD(lam=1e-3),
    "grasp": GraSP(),
    "synflow": SynFlow(),
    "wanda": Wanda(),
}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("criterion_name", sorted(CRITERIA))
def test_every_criterion_selects_the_lowest_scores_of_every_group(model_name, criterion_name):
    make, shape = MODELS[model_name]
    model = make().double().eval()
    criterion = CRITERIA[criterion_name]
    data = batch(shape)
    pruner = Pruner(model, criterion, LinearSchedule(0.5, 2), loss_fn=CE, data=data, scope=NM(2, 4))
    layouts = parameter_layouts(model, pruner.params)
    for stage, pruned_per_group in ((1, 1), (2, 2)):
        before = {k: v.clone() for k, v in pruner.masks.items()}
        expected_scores = scores(model, criterion, data, loss_fn=CE)
        pruner.step()
        for name, mask in pruner.masks.items():
            layout = layouts[name]
            expected = brute_force_nm(
                expected_scores[name], before[name], layout, pruned_per_group, 4
            )
            assert torch.equal(mask, expected), (stage, name)
            assert bool((group_counts(mask, layout, 4) == pruned_per_group).all())
            assert not bool((mask & ~before[name]).any())  # masks only grow
            assert bool((pruner.params[name][~mask] == 0).all())


@pytest.mark.parametrize(
    "schedule", [LinearSchedule(0.75, 3), ExponentialSchedule(0.75, 4), LinearSchedule(0.75, 1)]
)
def test_exact_counts_after_every_stage_of_a_schedule(schedule):
    model = mlp().double()
    pruner = Pruner(model, Magnitude(), schedule, scope=NM(1, 4))
    layouts = parameter_layouts(model, pruner.params)
    for target in schedule:
        pruner.step()
        for name, mask in pruner.masks.items():
            assert bool((group_counts(mask, layouts[name], 4) == round(4 * target)).all())
    assert all(is_nm(mask, 1, 4, dim=1) for mask in pruner.masks.values())


def test_ties_go_to_the_lower_input_index_and_already_pruned_count_first():
    layout = ParameterLayout((1, 8), "Linear", (1,))
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0, 5.0, 0.0, 3.0, 0.0]])
    kept = torch.tensor([[True, True, True, True, True, True, True, True]])
    first = NM(2, 4).select({"w": score}, {"w": kept}, sparsity=0.25, min_density=0.0,
                           layouts={"w": layout})["w"]  # fmt: skip
    assert first.tolist() == [[False, True, True, True, True, False, True, True]]
    # A high score pruned earlier still counts first: the group's second victim is the lowest.
    kept = torch.tensor([[True, True, True, True, False, True, True, True]])
    second = NM(2, 4).select({"w": score}, {"w": kept}, sparsity=0.5, min_density=0.0,
                            layouts={"w": layout})["w"]  # fmt: skip
    assert second.tolist() == [[False, False, True, True, False, False, True, True]]
    assert torch.equal(second, brute_force_nm(score, kept, layout, 2, 4))


def test_layouts_of_convolutions_conv1d_transposed_and_gpt2():
    torch.manual_seed(1)
    transposed = nn.Sequential(nn.ConvTranspose2d(2, 3, 2), nn.Flatten(), nn.LazyLinear(3))
    transposed(torch.randn(1, 2, 3, 3))  # the lazy layer's inputs: 3·4·4 = 48
    pruner = Pruner(transposed, Magnitude(), LinearSchedule(0.5, 1), scope=NM(2, 4))
    pruner.step()
    weight = pruner.masks["0.weight"]  # (in 2, out 3, 2, 2): inputs per output are in·kh·kw
    per_output = weight.permute(1, 0, 2, 3).reshape(3, 8)
    assert bool((per_output.reshape(3, 2, 4).sum(-1) == 2).all())

    gpt2 = tiny_gpt2()
    pruner = Pruner(gpt2, Magnitude(), LinearSchedule(0.5, 1), scope=NM(2, 4))
    pruner.step()
    conv1d = ("c_attn.weight", "c_fc.weight")
    weights = {k: v for k, v in pruner.masks.items() if k.endswith(conv1d)}
    assert weights and all(is_nm(mask, 2, 4, dim=0) for mask in weights.values())
    assert all(is_nm(p != 0, 2, 4, dim=0) for k, p in pruner.params.items() if k in weights)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"scope": NM(2, 4), "schedule": LinearSchedule(0.6, 2)}, ValueError, "must be 1 - n/m"),
        ({"scope": NM(1, 3), "schedule": LinearSchedule(2 / 3, 2)}, ValueError, "must divide"),
        (
            {"scope": NM(2, 4), "schedule": LinearSchedule(0.5, 2), "min_density": 0.6},
            ValueError,
            "less than min_density",
        ),
        (
            {"scope": NM(2, 4), "schedule": LinearSchedule(0.5, 2), "include": r".*bias"},
            ValueError,
            "not the weight matrix",
        ),
    ],
)
def test_bad_structures_are_refused_before_anything_changes(kwargs, error, match):
    model = mlp().double()
    before = raw(model.state_dict())
    schedule = kwargs.pop("schedule")
    with pytest.raises(error, match=match):
        Pruner(model, Magnitude(), schedule, **kwargs)
    assert raw(model.state_dict()) == before


def test_nm_arguments_are_validated():
    with pytest.raises(ValueError, match="1 <= n < m"):
        NM(3, 2)
    with pytest.raises(ValueError, match="1 <= n < m"):
        NM(4, 4)
    with pytest.raises(TypeError, match="n must be an int"):
        NM(2.0, 4)
    assert NM(2, 4) == NM(2, 4) and repr(NM(2, 4)) == "NM(n=2, m=4)"


def test_masks_with_more_pruned_than_the_stage_allows_are_refused():
    layout = ParameterLayout((1, 4), "Linear", (1,))
    kept = torch.tensor([[False, False, True, True]])
    with pytest.raises(ValueError, match="already has more than 1 pruned"):
        NM(2, 4).select({"w": torch.zeros(1, 4)}, {"w": kept}, sparsity=0.25, min_density=0.0,
                        layouts={"w": layout})  # fmt: skip
    with pytest.raises(ValueError, match="non-finite values on kept entries"):
        NM(2, 4).select({"w": torch.tensor([[0.0, float("nan"), 1.0, 2.0]])},
                        {"w": torch.ones(1, 4, dtype=torch.bool)}, sparsity=0.5,
                        min_density=0.0, layouts={"w": layout})  # fmt: skip


@pytest.mark.parametrize("lam", [1e-2, 1.0])
def test_compensation_with_nm_masks_matches_a_dense_solve_on_the_kept_weights(lam):
    """Stage 2 of 2:4 (1:4 → 2:4): the step solves (C + λI)_KK δ_K = −g_K + C_KP θ_P."""
    torch.manual_seed(3)
    model = mlp().double()
    data = batch((8,), 20)
    pruner = Pruner(
        model, QuadraticModel(lam=1e-3), LinearSchedule(0.5, 2), loss_fn=CE, data=data,
        scope=NM(2, 4), update=Compensation(lam=lam, cg_iters=500, cg_tol=1e-13),
    )  # fmt: skip
    pruner.step()
    before = {k: v.clone() for k, v in pruner.masks.items()}
    params = bf.weights(model)  # the prunable weights; biases stay fixed
    theta = bf.flatten(params)
    g = bf.gradient(model, params, *data, CE)
    c = bf.dense_ggn(model, params, *data, CE)
    pruner.step()
    k_mask = bf.flatten(pruner.masks)
    p_mask = bf.flatten({k: before[k] & ~pruner.masks[k] for k in params})
    a = (c + lam * torch.eye(len(theta), dtype=theta.dtype))[k_mask][:, k_mask]
    rhs = -g[k_mask] + c[k_mask][:, p_mask] @ theta[p_mask]
    expected = torch.zeros_like(theta)  # pruned now or before: exactly zero
    expected[k_mask] = theta[k_mask] + torch.linalg.solve(a, rhs)
    torch.testing.assert_close(bf.flatten(bf.weights(model)), expected, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("rows", [5, 2048])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_nm_mask_is_a_stable_sort_of_each_group(m, rows):
    """Many short groups are ranked by pairwise comparisons, the rest by a stable sort: both are
    the stable ascending order (many ties, infinities and integers included)."""
    generator = torch.Generator().manual_seed(m)
    scores = torch.randint(0, 3, (rows, 4 * m), generator=generator).float()
    scores[0, :m] = -math.inf
    scores[1, :m] = math.inf
    for n in range(1, m + 1):
        for tensor in (scores, scores.long()):
            grouped = tensor.reshape(rows, 4, m)
            pruned = grouped.sort(dim=-1, stable=True).indices[..., : m - n]
            expected = torch.ones_like(grouped, dtype=torch.bool).scatter_(-1, pruned, False)
            assert torch.equal(nm_mask(tensor, n, m, dim=1), expected.reshape(rows, 4 * m))
