"""Errors of the error table (docs/errors.csv) that no other test reaches.

Each test checks the exception type, that the message names the offending argument, and, where
weights could be touched, that nothing was modified.
"""

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset

from lossprune import (
    Compensation,
    Criterion,
    LinearModel,
    LinearSchedule,
    Magnitude,
    NonFiniteError,
    Pruner,
    QuadraticModel,
    SynFlow,
    scores,
)
from lossprune import curvature as cv
from lossprune import selection as lm
from tests.conftest import make_mlp

CE = nn.CrossEntropyLoss()


def batch(n=10):
    return torch.randn(n, 6, dtype=torch.float64), torch.randint(0, 3, (n,))


def params_of(model):
    return {k: p.detach() for k, p in model.named_parameters()}


def test_compensation_rejects_wrong_types():
    with pytest.raises(TypeError, match="lam must be a real number"):
        Compensation(lam="0.1")
    with pytest.raises(ValueError, match="cg_iters must be >= 1"):
        Compensation(cg_iters=0)
    with pytest.raises(TypeError, match="auto_lam must be a bool"):
        Compensation(auto_lam=1)


def test_statistics_need_data():
    model = make_mlp()
    with pytest.raises(TypeError, match="got None"):
        cv.compute_statistics(model, params_of(model), None, CE)


@pytest.mark.parametrize(
    "data, error, match",
    [
        ((torch.zeros(0, 6), torch.zeros(0)), ValueError, "batch has no examples"),
        ((torch.zeros(3, 6), torch.zeros(2)), ValueError, "differ in length: 3 != 2"),
        (5, TypeError, "got int"),
    ],
)
def test_scores_rejects_malformed_data(data, error, match):
    with pytest.raises(error, match=match):
        scores(make_mlp(), LinearModel(), data, loss_fn=CE)


@pytest.mark.parametrize(
    "data, error, match",
    [
        ([torch.zeros(3, 6)], TypeError, "must be an \\(inputs, targets\\) pair.*got Tensor"),
        ([(torch.zeros(3, 6), [0, 1, 2])], TypeError, "got a tuple of 2 \\(Tensor, list\\)"),
        ([(["a"], torch.zeros(3))], TypeError, "its inputs are list"),
        ([(torch.zeros(3, 6), torch.zeros(2))], ValueError, "differ in length"),
    ],
)
def test_scores_rejects_malformed_batches(data, error, match):
    with pytest.raises(error, match=match):
        scores(make_mlp(), LinearModel(), data, loss_fn=CE)


class _Stream(IterableDataset):
    def __iter__(self):
        yield batch()


def test_examples_needs_data_that_can_be_sampled():
    model = make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="examples=n needs data that can be sampled"):
        Pruner(model, LinearModel(), LinearSchedule(0.5, 2), loss_fn=CE, data=[batch()], examples=5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="examples=n needs data to draw from"):
        Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 2), examples=5)


def test_curvature_functions_reject_unknown_parameter_names():
    model = make_mlp()
    with pytest.raises(ValueError, match="not parameters of the model: \\['nope'\\]"):
        cv.loss_and_grad(model, {"nope": torch.zeros(1)}, batch(), CE)


def test_curvature_options_are_validated():
    with pytest.raises(TypeError, match="mc_samples must be an int"):
        QuadraticModel(curvature="fisher_mc", mc_samples=2.0)
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        SynFlow(dtype=torch.int64)
    model = make_mlp()
    with pytest.raises(TypeError, match="samples must be an int"):
        cv.fisher_diag_mc(model, params_of(model), batch(), CE, samples=1.5)
    with pytest.raises(ValueError, match="probes must be >= 1"):
        cv.hutchinson_diag(model, params_of(model), batch(), CE, probes=0)
    with pytest.raises(ValueError, match="unknown statistic 'hessian'"):
        cv.Statistic("hessian")


def test_vector_products_reject_ragged_stacks():
    model = make_mlp()
    params = params_of(model)
    vectors = {
        k: torch.zeros(2 if i == 0 else 3, *p.shape) for i, (k, p) in enumerate(params.items())
    }
    with pytest.raises(ValueError, match="same number k of vectors"):
        cv.hvp(model, params, batch(), CE, vectors)


def test_mask_utilities_reject_wrong_containers():
    with pytest.raises(ValueError, match="masks is empty"):
        lm.select_masks({}, {}, sparsity=0.5)
    with pytest.raises(TypeError, match="params and masks must be dicts"):
        lm.apply_masks([torch.zeros(2)], {})
    with pytest.raises(TypeError, match="masks must be a dict of bool tensors, got list"):
        lm.sparsity_of([torch.ones(2, dtype=torch.bool)])
    model = make_mlp()
    with pytest.raises(TypeError, match="must be a bool tensor"):
        lm.to_torch_prune(model, {"0.weight": torch.ones(5, 6)})
    with pytest.raises(ValueError, match="has shape \\(2,\\) but the parameter has shape"):
        lm.to_torch_prune(model, {"0.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lm.from_torch_prune("model")


def test_pruner_rejects_bad_min_density_type_and_chunk_size():
    with pytest.raises(TypeError, match="min_density must be a real number"):
        Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 2), min_density="0.1")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 2), chunk_size=0)


def test_attach_needs_an_optimizer():
    pruner = Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 2))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        pruner.attach([torch.zeros(1)])


def test_load_state_dict_rejects_incomplete_or_foreign_states():
    pruner = Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 2))
    pruner.step()
    state = pruner.state_dict()
    fresh = Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 2))
    with pytest.raises(ValueError, match="state lacks \\['masks'\\]"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "masks"})
    with pytest.raises(ValueError, match="state has masks for"):
        fresh.load_state_dict({**state, "masks": {"0.weight": state["masks"]["0.weight"]}})
    wrong = {k: m.clone() for k, m in state["masks"].items()}
    wrong["0.weight"] = wrong["0.weight"].float()
    with pytest.raises(TypeError, match="state mask '0.weight' must be a bool tensor"):
        fresh.load_state_dict({**state, "masks": wrong})
    with pytest.raises(ValueError, match="state stage 7 is out of range"):
        fresh.load_state_dict({**state, "stage": 7})
    assert fresh.stage == 0 and all(m.all() for m in fresh.masks.values())


class _Schedule:
    def __init__(self, targets, length=None):
        self.targets = targets
        self.length = len(targets) if length is None else length

    def sparsity(self, stage):
        return self.targets[stage - 1]

    def __len__(self):
        return self.length

    def __iter__(self):
        return iter(self.targets)


def test_user_schedules_are_validated():
    with pytest.raises(ValueError, match="len\\(schedule\\) >= 1 targets"):
        Pruner(make_mlp(), Magnitude(), _Schedule([0.5], length=2))
    with pytest.raises(ValueError, match="target 1.0 at stage 2 is not in \\[0, 1\\)"):
        Pruner(make_mlp(), Magnitude(), _Schedule([0.5, 1.0]))
    with pytest.raises(TypeError, match="stage must be an int"):
        LinearSchedule(0.5, 2).sparsity(1.0)


class _WrongShape(Criterion):
    def score(self, context):
        return {k: p.flatten() for k, p in context.params.items()}


class _NaN(Criterion):
    def score(self, context):
        return {k: torch.full_like(p, float("nan")) for k, p in context.params.items()}


def test_criteria_of_users_must_return_finite_scores_of_the_right_shape():
    with pytest.raises(RuntimeError, match="no score of the right shape for '0.weight'"):
        scores(make_mlp(), _WrongShape())
    model = make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match="non-finite score for '0.weight'"):
        Pruner(model, _NaN(), LinearSchedule(0.5, 2)).step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_non_finite_loss_after_the_step_leaves_the_model_unchanged():
    # Finite before pruning, infinite once a weight is zero: log(|w|) of the pruned weight.
    class LogWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1, bias=False).double()
            with torch.no_grad():
                self.linear.weight.copy_(torch.tensor([[1.0, 2.0]]))

        def forward(self, x):
            return x * torch.log(self.linear.weight.abs()).sum()

    model = LogWeight()
    data = (torch.ones(4, 1, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64))
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1), loss_fn=nn.MSELoss(), data=data)
    with pytest.raises(NonFiniteError, match="loss after stage 1 is not finite"):
        pruner.step()
    assert torch.equal(
        model.linear.weight.detach(), torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    )
    assert pruner.stage == 0 and pruner.masks["linear.weight"].all()
