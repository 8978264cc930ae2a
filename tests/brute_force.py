"""Slow, obviously-correct reference computations for float64 tests (no lossprune code)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call


def flatten(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(vector: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, t in like.items():
        out[name] = vector[start : start + t.numel()].view_as(t)
        start += t.numel()
    return out


def weights(model: nn.Module) -> dict[str, Tensor]:
    """The default prunable parameters: every Linear/Conv weight, detached."""
    return {
        f"{name}.weight" if name else "weight": m.weight.detach()
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
    }


def outputs_at(model: nn.Module, params: dict[str, Tensor], inputs: Tensor) -> Tensor:
    full = {k: v.detach() for k, v in model.named_parameters()}
    full.update({k: v.detach() for k, v in model.named_buffers()})
    full.update(params)
    return functional_call(model, full, (inputs,))


def mean_loss(model, params, inputs, targets, loss_fn) -> Tensor:
    return loss_fn(outputs_at(model, params, inputs), targets)


def gradient(model, params, inputs, targets, loss_fn) -> Tensor:
    theta = flatten(params).clone().requires_grad_(True)
    loss = mean_loss(model, unflatten(theta, params), inputs, targets, loss_fn)
    return torch.autograd.grad(loss, theta)[0]


def dense_hessian(model, params, inputs, targets, loss_fn) -> Tensor:
    def f(theta):
        return mean_loss(model, unflatten(theta, params), inputs, targets, loss_fn)

    return torch.func.hessian(f)(flatten(params))


def fisher_diagonal_loop(model, params, inputs, targets) -> Tensor:
    """Paper's formula, one example and one class at a time:
    D_q = mean_n sum_c p_nc (d log p_c(x_n) / d theta_q)^2."""
    theta0 = flatten(params)
    total = torch.zeros_like(theta0)
    for n in range(len(inputs)):
        theta = theta0.clone().requires_grad_(True)
        log_p = outputs_at(model, unflatten(theta, params), inputs[n : n + 1])[0].log_softmax(0)
        for c in range(len(log_p)):
            (g,) = torch.autograd.grad(log_p[c], theta, retain_graph=True)
            total += log_p[c].exp().detach() * g**2
    return total / len(inputs)
