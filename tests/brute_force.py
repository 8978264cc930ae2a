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


def dense_ggn(model, params, inputs, targets, loss_fn) -> Tensor:
    """J^T (d^2 L / d f^2) J over the WHOLE batch: the Gauss-Newton matrix of the batch loss L,
    with no assumption on how L splits into examples or units."""
    theta = flatten(params)

    def outputs_of(t):
        return outputs_at(model, unflatten(t, params), inputs)

    f = outputs_of(theta).detach()
    jac = torch.func.jacrev(outputs_of)(theta).reshape(f.numel(), -1)
    h = torch.func.hessian(lambda o: loss_fn(o.view_as(f), targets))(f.reshape(-1))
    return jac.T @ h @ jac


def products(matrix: Tensor, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``matrix @ v`` for each of the k stacked vectors ``{name: (k, *shape)}``."""
    k = next(iter(vectors.values())).shape[0]
    like = {name: v[0] for name, v in vectors.items()}
    columns = [
        unflatten(matrix @ flatten({n: v[j] for n, v in vectors.items()}), like) for j in range(k)
    ]
    return {name: torch.stack([c[name] for c in columns]) for name in vectors}


def diagonal(matrix: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in unflatten(torch.diagonal(matrix).clone(), like).items()}
