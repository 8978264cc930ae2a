"""Disconnected units against a brute-force twin: path counts through the 0/1-weighted network."""

import copy
import warnings

import pytest
import torch
from torch import nn

from lossprune import LayerCollapseError, LayerCollapseWarning, LinearSchedule, Magnitude, Pruner
from lossprune.selection._connectivity import connectivity, trace_chain
from tests.conftest import make_cnn, make_mlp


def random_masks(model, density, seed):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(p.shape, generator=generator) < density
        for name, p in model.named_parameters()
        if name.endswith("weight")
    }


def path_counts(model, masks, input_shape):
    """Per layer: units reached from an all-ones input, units whose output reaches the output.

    Weights are the 0/1 masks, biases zero and activations the identity, so every activation
    counts the paths from the input into it and every gradient of the output sum counts the
    paths from it to the output.
    """
    twin = copy.deepcopy(model).double()
    layers, outputs = [], []
    for name, module in twin.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            with torch.no_grad():
                module.weight.copy_(masks[f"{name}.weight"].double())
                if module.bias is not None:
                    module.bias.zero_()
            module.register_forward_hook(lambda m, i, o: outputs.append(o.retain_grad() or o))
            layers.append(f"{name}.weight")
        elif isinstance(module, (nn.Tanh, nn.ReLU)):
            module.forward = lambda x: x
    out = twin(torch.ones(1, *input_shape, dtype=torch.float64))
    out.sum().backward()
    reached = [o.detach().flatten(2).sum(-1)[0] > 0 if o.dim() > 2 else o[0] > 0 for o in outputs]
    needed = [o.grad.flatten(2).sum(-1)[0] > 0 if o.dim() > 2 else o.grad[0] > 0 for o in outputs]
    return layers, reached, needed


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("make, shape", [(make_mlp, (6,)), (make_cnn, (2, 5, 5))])
def test_disconnected_units_match_brute_force_path_counts(make, shape, seed):
    model = make()
    masks = random_masks(model, density=0.3, seed=seed)
    got = connectivity(trace_chain(model, masks), masks)
    layers, reached, needed = path_counts(model, masks, shape)
    assert got.checked
    assert got.outputs == int((~reached[-1]).sum())
    for name, r, n in zip(layers[:-1], reached[:-1], needed[:-1], strict=True):
        assert got.hidden[name] == int((~(r & n)).sum()), name


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(x + self.a(x))


def test_graphs_that_are_not_chains_are_not_checked():
    model = Residual().double()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1))
    report = pruner.step()
    assert report.disconnected_outputs is None and report.disconnected_units is None


def test_a_disconnected_class_routes_through_on_collapse_before_anything_changes():
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[2].weight.copy_(
            torch.tensor([[5.0, 5, 5, 5], [5, 5, 5, 5], [1e-3, 1e-3, 1e-3, 1e-3]])
        )
    before = copy.deepcopy(model.state_dict())
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.1, 1), on_collapse="raise")
    with pytest.raises(LayerCollapseError, match="disconnects 1 output units"):
        pruner.step()  # 4 of 36 weights: class 2's four tiny incoming weights, no layer empty
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.1, 1))
    with pytest.warns(LayerCollapseWarning, match="disconnects 1 output units"):
        report = pruner.step()
    assert report.disconnected_outputs == 1 and report.layer_density["2.weight"] > 0


def test_dead_hidden_units_alone_are_counted_but_are_no_collapse():
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].weight[0] = 1e-3  # hidden unit 0: six tiny incoming weights, pruned first
    pruner = Pruner(model, Magnitude(), LinearSchedule(6 / 36, 1), on_collapse="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = pruner.step()
    assert not pruner.masks["0.weight"][0].any()
    assert report.disconnected_units == {"0.weight": 1} and report.disconnected_outputs == 0
