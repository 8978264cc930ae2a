"""keep_pruned_at_zero: masked_fill (never a product), optimizer wrappers, no hooks left behind."""

import pytest
import torch
from torch import nn

from lossprune import LinearModel, LinearSchedule, Pruner, keep_pruned_at_zero
from lossprune.selection import unwrap_optimizer
from tests.conftest import make_mlp

CE = nn.CrossEntropyLoss()


def batch(n=20):
    return torch.randn(n, 6, dtype=torch.float64), torch.randint(0, 3, (n,))


def pruned_mlp():
    model = make_mlp()
    pruner = Pruner(model, LinearModel(), LinearSchedule(0.5, 1), loss_fn=CE, data=batch(),
                    on_collapse="ignore")  # fmt: skip
    pruner.step()
    return model, pruner


class AcceleratedOptimizer(torch.optim.Optimizer):
    """The shape of accelerate's wrapper: an Optimizer subclass that never calls
    ``Optimizer.__init__`` and keeps the real optimizer in ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        self.optimizer.step(closure)


def test_mask_hook_uses_masked_fill_so_inf_times_zero_never_appears():
    model, pruner = pruned_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = batch()
    inputs[0, 0] = float("inf")  # inf activations: inf gradients for the first layer's column 0
    pruner.attach(optimizer)
    optimizer.zero_grad()
    CE(model(inputs), targets).backward()
    grad = model.get_parameter("0.weight").grad
    pruned = ~pruner.masks["0.weight"]
    assert not torch.isfinite(grad[~pruned]).all()  # the kept entries do see inf / NaN
    assert (grad[pruned] == 0).all()  # a product with the mask would give NaN = inf * 0 here


def test_accelerate_style_wrapper_is_unwrapped():
    model, pruner = pruned_mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1)
    wrapped = AcceleratedOptimizer(inner)
    assert unwrap_optimizer(wrapped) is inner
    handle = pruner.attach(wrapped)
    for _ in range(3):
        wrapped.zero_grad()
        CE(model(batch()[0]), batch()[1]).backward()
        wrapped.step()
    for name, param in pruner.params.items():
        assert (param[~pruner.masks[name]] == 0).all()
    handle.remove()
    with pytest.raises(TypeError, match="wrapper holding one in .optimizer"):
        pruner.attach(object())


def test_a_failed_attach_leaves_no_hooks_behind():
    model, pruner = pruned_mlp()

    class Refusing(torch.optim.SGD):
        def register_step_post_hook(self, hook):
            raise RuntimeError("no hooks here")

    optimizer = Refusing(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="no hooks here"):
        pruner.attach(optimizer)
    assert all(not p._backward_hooks for p in model.parameters())
    with pytest.raises(TypeError, match="bool tensor"):
        keep_pruned_at_zero(optimizer, pruner.params, {"0.weight": torch.ones(5, 6)})
    assert all(not p._backward_hooks for p in model.parameters())


def test_fixed_masks_keep_weights_zero_through_training():
    model = make_mlp()
    params = dict(model.named_parameters())
    masks = {"0.weight": torch.rand(5, 6) > 0.5}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.1)
    handle = keep_pruned_at_zero(optimizer, params, masks)
    for _ in range(5):
        optimizer.zero_grad()
        CE(model(batch()[0]), batch()[1]).backward()
        optimizer.step()
        assert (params["0.weight"][~masks["0.weight"]] == 0).all()
    handle.remove()
    handle.remove()  # a second call does nothing
