"""Model coverage: module kinds, tied and frozen weights, dtypes, devices (DESIGN.md, issue 6)."""

import copy
import math
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lossprune import ExponentialSchedule, LinearSchedule, Magnitude, Pruner, QuadraticModel, scores
from lossprune.selection import from_torch_prune, to_torch_prune
from tests import brute_force as bf

CE = nn.CrossEntropyLoss()


class Residual(nn.Module):
    """Not a Sequential: a skip connection and a functional call in forward."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.block = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.block(h))
        return self.out(h)


def conv_net(conv: type[nn.Module], dims: int, groups: int = 1, depthwise: bool = False):
    channels = 4
    first = conv(2, channels, 3, padding=1)
    second = conv(channels, channels, 3, groups=channels if depthwise else groups, bias=False)
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims](1)
    return nn.Sequential(
        first, nn.Tanh(), second, nn.Tanh(), pool, nn.Flatten(), nn.Linear(channels, 3)
    ).double()


def qm_reference(model, params, batch, lam=1e-2):
    theta = bf.flatten(params)
    g = bf.gradient(model, params, *batch, CE)
    d = bf.fisher_diagonal_loop(model, params, *batch)
    return (-g * theta + 0.5 * d * theta**2).abs() + 0.5 * lam * theta**2


@pytest.mark.parametrize(
    "conv,dims,kwargs",
    [
        (nn.Conv1d, 1, {}),
        (nn.Conv2d, 2, {"groups": 2}),
        (nn.Conv2d, 2, {"depthwise": True}),
        (nn.Conv3d, 3, {}),
    ],
    ids=["conv1d", "conv2d-grouped", "conv2d-depthwise", "conv3d"],
)
def test_quadratic_model_on_convolutions_matches_brute_force(conv, dims, kwargs):
    model = conv_net(conv, dims, **kwargs)
    spatial = (5,) * dims
    batch = (torch.randn(4, 2, *spatial, dtype=torch.float64), torch.randint(0, 3, (4,)))
    got = scores(model, QuadraticModel(lam=1e-2), batch, loss_fn=CE)
    params = {k: dict(model.named_parameters())[k].detach() for k in got}
    torch.testing.assert_close(bf.flatten(got), qm_reference(model, params, batch))


def test_non_sequential_model_matches_brute_force():
    model = Residual().double()
    batch = (torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,)))
    got = scores(model, QuadraticModel(lam=1e-2), batch, loss_fn=CE)
    assert list(got) == ["inp.weight", "block.weight", "out.weight"]
    params = {k: dict(model.named_parameters())[k].detach() for k in got}
    torch.testing.assert_close(bf.flatten(got), qm_reference(model, params, batch))


def test_tied_weights_are_counted_once_and_stay_tied():
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    model[2].weight = model[0].weight  # tied
    model = model.double()
    batch = (torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,)))
    pruner = Pruner(model, QuadraticModel(), LinearSchedule(0.5, 1), loss_fn=CE, data=batch)
    assert list(pruner.params) == ["0.weight", "4.weight"]
    pruner.run()
    assert pruner.num_pruned() == round(0.5 * (36 + 18))
    assert model[2].weight is model[0].weight
    # The tied weight's statistics include both uses: compare with the brute-force gradient.
    s = scores(model, QuadraticModel(lam=0.0), batch, loss_fn=CE)
    params = {k: dict(model.named_parameters())[k].detach() for k in s}
    torch.testing.assert_close(bf.flatten(s), qm_reference(model, params, batch, lam=0.0))


def test_frozen_parameters_are_skipped():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    batch = (torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,)))
    pruner = Pruner(model, QuadraticModel(), LinearSchedule(0.5, 1), loss_fn=CE, data=batch)
    assert list(pruner.params) == ["2.weight"]
    pruner.run()
    assert torch.equal(model[0].weight, frozen)


def test_batch_norm_and_dropout_in_eval_mode():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).double()
    model.train()
    batch = (torch.randn(8, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (8,)))
    model(batch[0])  # non-trivial running statistics
    model.eval()
    running = copy.deepcopy(model[1].state_dict())
    got = scores(model, QuadraticModel(lam=1e-2), batch, loss_fn=CE)
    params = {k: dict(model.named_parameters())[k].detach() for k in got}
    torch.testing.assert_close(bf.flatten(got), qm_reference(model, params, batch))
    assert all(torch.equal(v, running[k]) for k, v in model[1].state_dict().items())


def test_parametrized_weights_are_refused_by_default_and_original_can_be_included():
    class Symmetric(nn.Module):
        def forward(self, x):
            return x.triu() + x.triu(1).transpose(0, 1)

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    batch = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    with pytest.raises(ValueError, match=r"'0\.weight' is computed by a torch parametrization"):
        Pruner(model, QuadraticModel(), LinearSchedule(0.5, 1), loss_fn=CE, data=batch)
    pruner = Pruner(
        model,
        QuadraticModel(),
        LinearSchedule(0.5, 1),
        loss_fn=CE,
        data=batch,
        include=[r"0\.parametrizations\.weight\.original", "2.weight"],
    )
    pruner.run()
    assert pruner.num_pruned() == round(0.5 * (16 + 12))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    batch = (torch.randn(32, 6).to(dtype), torch.randint(0, 3, (32,)))
    pruner = Pruner(
        model, QuadraticModel(1e-3), ExponentialSchedule(0.8, 3), loss_fn=CE, data=batch
    )
    for report in pruner.run():
        assert math.isfinite(report.loss_after)  # not NaN, not ±inf
    assert pruner.num_pruned() == round(0.8 * (96 + 48))
    assert all(p.dtype == dtype for p in model.parameters())
    for name, p in pruner.params.items():
        assert (p[~pruner.masks[name]] == 0).all() and torch.isfinite(p).all()


def test_pruned_model_round_trips_through_pickle_deepcopy_and_torch_prune():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.6, 1))
    pruner.run()
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        for name, mask in pruner.masks.items():
            assert (dict(clone.named_parameters())[name][~mask] == 0).all()
    x = torch.randn(4, 6)
    expected = model(x)
    to_torch_prune(model, pruner.masks)
    torch.testing.assert_close(model(x), expected)
    back = from_torch_prune(model, remove=True)
    assert all(torch.equal(back[k], pruner.masks[k]) for k in pruner.masks)
    torch.testing.assert_close(model(x), expected)
    # And a model pruned with torch.nn.utils.prune can be continued with lossprune's masks.
    fresh = Pruner(model, Magnitude(), LinearSchedule(0.8, 1))
    fresh.masks = back
    fresh.run()
    assert all(not (fresh.masks[k] & ~back[k]).any() for k in back)  # masks only grew
    assert fresh.num_pruned() == round(0.8 * 45)


def test_keyboard_interrupt_leaves_a_consistent_state(monkeypatch):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    batch = (torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,)))
    pruner = Pruner(model, QuadraticModel(), ExponentialSchedule(0.8, 4), loss_fn=CE, data=batch)
    pruner.step()
    weights = copy.deepcopy(model.state_dict())
    masks = {k: m.clone() for k, m in pruner.masks.items()}
    import lossprune.selection.structures as selection_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(selection_module, "select_masks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pruner.run()
    assert pruner.stage == 1
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(m, masks[k]) for k, m in pruner.masks.items())
    monkeypatch.undo()
    assert len(pruner.run()) == 3 and pruner.finished


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    batch = (torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,)))
    cpu = Pruner(
        copy.deepcopy(model),
        QuadraticModel(1e-3),
        ExponentialSchedule(0.8, 3),
        loss_fn=CE,
        data=batch,
    )
    cuda_model = copy.deepcopy(model).cuda()
    gpu = Pruner(
        cuda_model,
        QuadraticModel(1e-3),
        ExponentialSchedule(0.8, 3),
        loss_fn=CE,
        data=(batch[0].cuda(), batch[1].cuda()),
    )
    cpu.run()
    gpu.run()
    for name in cpu.masks:
        assert gpu.masks[name].device.type == "cuda"
        assert torch.equal(cpu.masks[name], gpu.masks[name].cpu())
