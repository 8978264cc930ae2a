r"""Fused gradient and batched curvature-vector products for chains of standard layers.

A model whose forward pass is a chain ``x -> m_1 -> m_2 -> ... -> f`` of known layers (Linear,
Conv1d/2d, tanh/ReLU/sigmoid, max/avg pooling, flatten, dropout in eval mode) gets its loss,
gradient and ``k`` Hessian- (or GGN-) vector products from a hand-written forward-over-reverse
pass: Pearlmutter's (1994, "Fast exact multiplication by the Hessian") R-operator applied layer
by layer. The primal forward and backward passes run once; the ``k`` tangents are then carried
through every layer TOGETHER, laid out ``(N, k, ...)``, so that each Linear layer does one matmul
with a ``(k * out, in)`` stacked weight and each convolution one convolution with ``k * C_out``
output channels (instead of ``k`` small products under ``vmap``). For a layer :math:`z = W a`
with output gradient :math:`\delta`:

.. math::
    Rz = V a + W\, Ra, \qquad
    R(\nabla W) = R\delta\, a^\top + \delta\, Ra^\top, \qquad
    R(\nabla a) = W^\top R\delta + V^\top \delta,

and for an activation :math:`y = \sigma(z)`: :math:`R\delta_z = \sigma'(z) R\delta_y +
\sigma''(z)\, Rz\, \delta_y`. The GGN product :math:`J^\top H_f J v` (Schraudolph 2002) is the
same pass without the terms that multiply :math:`\delta` (they carry the curvature of the
network, not of the loss). Softmax cross-entropy uses its closed forms :math:`\delta_f = (p -
e_y)/N`, :math:`H_f = (\operatorname{diag} p - pp^\top)/N`; any other loss gets its output-space
Hessian products from ``torch.func``.

The chain is found once per model with :func:`torch.fx.symbolic_trace` and cached; a model that
does not trace to such a chain, or whose differentiated parameters are not all owned by
(untied) layers of the chain, gets ``None`` and the caller uses its generic path.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn
from torch.func import grad as func_grad
from torch.func import vjp, vmap

__all__ = ["Chain", "NotAChain", "find_chain", "run_chain"]

Params = dict[str, Tensor]
Products = dict[str, Tensor]


# --------------------------------------------------------------------------------------------
# Layers: primal forward/backward, tangent forward/backward
# --------------------------------------------------------------------------------------------


class NotAChain(Exception):
    """Raised during the primal pass when a layer meets inputs its rule does not cover."""


class _Layer:
    """One link of the chain. ``names`` maps the module's parameter names to qualified names."""

    names: dict[str, str] = {}

    def forward(self, a: Tensor, p: Params) -> Tensor:
        raise NotImplementedError

    def backward(self, dz: Tensor, a: Tensor, p: Params, need_input: bool):
        raise NotImplementedError

    def tangent(self, a: Tensor, ra: Tensor | None, p: Params, v: Params) -> Tensor | None:
        raise NotImplementedError

    def tangent_backward(self, dz, rdz, a, ra, p, v, need_input, hessian):
        raise NotImplementedError


def _batched(t: Tensor, k: int) -> Tensor:
    """``(N, k, *rest)`` -> ``(N * k, *rest)``."""
    return t.reshape(t.shape[0] * k, *t.shape[2:])


def _unbatched(t: Tensor, n: int) -> Tensor:
    """``(N * k, *rest)`` -> ``(N, k, *rest)``."""
    return t.reshape(n, t.shape[0] // n, *t.shape[1:])


def _add(x: Tensor | None, y: Tensor | None) -> Tensor | None:
    if x is None:
        return y
    if y is None:
        return x
    return x + y


class _Linear(_Layer):
    def __init__(self, module: nn.Linear, names: dict[str, str]) -> None:
        self.module, self.names = module, names

    def _w(self, p: Params) -> Tensor:
        return p.get("weight", self.module.weight.detach())

    def _b(self, p: Params) -> Tensor | None:
        b = self.module.bias
        return p.get("bias", None if b is None else b.detach())

    def forward(self, a, p):
        if a.dim() != 2:  # a sequence dimension: per-position products need other contractions
            raise NotAChain
        return nn.functional.linear(a, self._w(p), self._b(p))

    def backward(self, dz, a, p, need_input):
        grads = {}
        if "weight" in self.names:
            grads["weight"] = dz.T @ a
        if "bias" in self.names:
            grads["bias"] = dz.sum(0)
        return (dz @ self._w(p) if need_input else None), grads

    def tangent(self, a, ra, p, v):
        n = a.shape[0]
        rz = None
        if ra is not None:
            rz = _unbatched(_batched(ra, ra.shape[1]) @ self._w(p).T, n)
        if "weight" in v:
            vw = v["weight"]
            k, out, fan_in = vw.shape
            rz = _add(rz, (a @ vw.reshape(k * out, fan_in).T).view(n, k, out))
        if "bias" in v:
            rz = _add(rz, v["bias"].unsqueeze(0))
        return rz

    def tangent_backward(self, dz, rdz, a, ra, p, v, need_input, hessian):
        n, k, out = rdz.shape
        fan_in = a.shape[1]
        products = {}
        if "weight" in self.names:
            rw = (rdz.reshape(n, k * out).T @ a).view(k, out, fan_in)
            if hessian and ra is not None:
                rw = rw + (dz.T @ ra.reshape(n, k * fan_in)).view(out, k, fan_in).transpose(0, 1)
            products["weight"] = rw
        if "bias" in self.names:
            products["bias"] = rdz.sum(0)
        rda = None
        if need_input:
            rda = _unbatched(_batched(rdz, k) @ self._w(p), n)
            if hessian and "weight" in v:
                vt = v["weight"].transpose(0, 1).reshape(out, k * fan_in)
                rda = rda + (dz @ vt).view(n, k, fan_in)
        return rda, products


class _Conv(_Layer):
    """Conv1d/Conv2d, ``groups == 1``, zero padding given as integers."""

    def __init__(self, module: nn.Conv1d | nn.Conv2d, names: dict[str, str]) -> None:
        self.module, self.names = module, names
        m = module
        self.args = (list(m.stride), list(m.padding), list(m.dilation))
        self.conv = nn.functional.conv1d if isinstance(m, nn.Conv1d) else nn.functional.conv2d

    def _w(self, p: Params) -> Tensor:
        return p.get("weight", self.module.weight.detach())

    def _b(self, p: Params) -> Tensor | None:
        b = self.module.bias
        return p.get("bias", None if b is None else b.detach())

    def _backward(self, dz, a_shape, w_shape, like, mask, weight=None):
        """``aten.convolution_backward``; tensors only needed for their shape are expanded."""
        stride, padding, dilation = self.args
        a = like.new_empty(1).expand(a_shape) if not mask[1] else like
        w = weight if weight is not None else dz.new_empty(1).expand(w_shape)
        return torch.ops.aten.convolution_backward(
            dz, a, w, None, stride, padding, dilation, False, [0] * len(stride), 1, mask
        )

    def forward(self, a, p):
        if a.dim() != len(self.args[0]) + 2:  # unbatched input
            raise NotAChain
        stride, padding, dilation = self.args
        return self.conv(a, self._w(p), self._b(p), stride, padding, dilation)

    def backward(self, dz, a, p, need_input):
        stride, padding, dilation = self.args
        w = self._w(p)
        da, dw, _ = torch.ops.aten.convolution_backward(
            dz,
            a,
            w,
            None,
            stride,
            padding,
            dilation,
            False,
            [0] * len(stride),
            1,
            [need_input, "weight" in self.names, False],
        )
        grads = {}
        if "weight" in self.names:
            grads["weight"] = dw
        if "bias" in self.names:
            grads["bias"] = dz.sum([0, *range(2, dz.dim())])
        return da, grads

    def tangent(self, a, ra, p, v):
        stride, padding, dilation = self.args
        n = a.shape[0]
        rz = None
        if ra is not None:
            rz = _unbatched(self.conv(_batched(ra, ra.shape[1]), self._w(p), None, *self.args), n)
        if "weight" in v:
            vw = v["weight"]
            k, out = vw.shape[:2]
            stacked = self.conv(a, vw.reshape(k * out, *vw.shape[2:]), None, *self.args)
            rz = _add(rz, stacked.view(n, k, out, *stacked.shape[2:]))
        if "bias" in v:
            vb = v["bias"]
            rz = _add(rz, vb.view(1, *vb.shape, *([1] * (a.dim() - 2))))
        return rz

    def tangent_backward(self, dz, rdz, a, ra, p, v, need_input, hessian):
        n, k, out = rdz.shape[:3]
        w = self._w(p)
        c = a.shape[1]
        kernel = w.shape[2:]
        products = {}
        if "weight" in self.names:
            # All k weight tangents at once: a convolution with k * out output channels.
            stacked = rdz.reshape(n, k * out, *rdz.shape[3:])
            _, rw, _ = self._backward(
                stacked, a.shape, (k * out, c, *kernel), a, [False, True, False]
            )
            rw = rw.view(k, out, c, *kernel)
            if hessian and ra is not None:
                # dz against the k input tangents at once: k * c input channels.
                wide = ra.reshape(n, k * c, *ra.shape[3:])
                _, cross, _ = self._backward(
                    dz, wide.shape, (out, k * c, *kernel), wide, [False, True, False]
                )
                rw = rw + cross.view(out, k, c, *kernel).transpose(0, 1)
            products["weight"] = rw
        if "bias" in self.names:
            products["bias"] = rdz.sum([0, *range(3, rdz.dim())])
        rda = None
        if need_input:
            batched = _batched(rdz, k)
            rda, _, _ = self._backward(
                batched, (n * k, *a.shape[1:]), None, a, [True, False, False], weight=w
            )
            rda = _unbatched(rda, n)
            if hessian and "weight" in v:
                vt = v["weight"].transpose(0, 1).reshape(out, k * c, *kernel)
                cross, _, _ = self._backward(
                    dz, (n, k * c, *a.shape[2:]), None, a, [True, False, False], weight=vt
                )
                rda = rda + cross.view(n, k, c, *a.shape[2:])
        return rda, products


class _Elementwise(_Layer):
    """``y = sigma(z)`` with its first and second derivatives from the saved output."""

    names: dict[str, str] = {}

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def forward(self, a, p):
        y = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}[self.kind](a)
        self.y = y
        return y

    def _derivatives(self, second: bool):
        y = self.y
        if self.kind == "tanh":
            d1 = 1 - y * y
            return d1, (-2 * y * d1 if second else None)
        if self.kind == "sigmoid":
            d1 = y * (1 - y)
            return d1, (d1 * (1 - 2 * y) if second else None)
        return (y > 0).to(y.dtype), None

    def backward(self, dz, a, p, need_input):
        d1, _ = self._derivatives(False)
        self.d1 = d1
        return dz * d1, {}

    def tangent(self, a, ra, p, v):
        return None if ra is None else ra * self.d1.unsqueeze(1)

    def tangent_backward(self, dz, rdz, a, ra, p, v, need_input, hessian):
        rda = rdz * self.d1.unsqueeze(1)
        if hessian and ra is not None and self.kind != "relu":  # relu'' = 0 almost everywhere
            _, d2 = self._derivatives(True)
            if d2 is not None:
                rda = rda + ra * (d2 * dz).unsqueeze(1)
        return rda, {}


class _Pool(_Layer):
    """Max pooling: routes through the argmax, pattern fixed by the primal pass."""

    names: dict[str, str] = {}

    def __init__(self, module: nn.MaxPool1d | nn.MaxPool2d) -> None:
        self.module = module

    def forward(self, a, p):
        m = self.module
        fn = nn.functional.max_pool1d if isinstance(m, nn.MaxPool1d) else nn.functional.max_pool2d
        y, self.index = fn(a, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
        self.in_shape = a.shape
        return y

    def _gather(self, t: Tensor) -> Tensor:
        n, k = t.shape[:2]
        flat = t.reshape(n, k, *self.in_shape[1:2], -1)
        index = self.index.reshape(n, 1, self.index.shape[1], -1).expand(n, k, -1, -1)
        return flat.gather(3, index).reshape(n, k, *self.index.shape[1:])

    def _scatter(self, t: Tensor) -> Tensor:
        n, k = t.shape[:2]
        index = self.index.reshape(n, 1, self.index.shape[1], -1).expand(n, k, -1, -1)
        out = t.new_zeros(n, k, self.in_shape[1], self.in_shape[2:].numel())
        out.scatter_add_(3, index, t.reshape(n, k, t.shape[2], -1))
        return out.reshape(n, k, *self.in_shape[1:])

    def backward(self, dz, a, p, need_input):
        return (self._scatter(dz.unsqueeze(1))[:, 0] if need_input else None), {}

    def tangent(self, a, ra, p, v):
        return None if ra is None else self._gather(ra)

    def tangent_backward(self, dz, rdz, a, ra, p, v, need_input, hessian):
        return self._scatter(rdz), {}


class _Reshape(_Layer):
    """Flatten, average pooling, identity: fixed linear maps applied with ``N * k`` folded."""

    names: dict[str, str] = {}

    def __init__(self, fn) -> None:
        self.fn = fn

    def forward(self, a, p):
        out, self.adjoint = vjp(self.fn, a)
        self.in_shape, self.out_shape = a.shape, out.shape
        return out

    def backward(self, dz, a, p, need_input):
        return (self.adjoint(dz)[0] if need_input else None), {}

    def tangent(self, a, ra, p, v):
        if ra is None:
            return None
        n, k = ra.shape[:2]
        return _unbatched(self.fn(_batched(ra, k)), n)

    def tangent_backward(self, dz, rdz, a, ra, p, v, need_input, hessian):
        n, k = rdz.shape[:2]
        # A fixed linear map's adjoint, batched over the k tangents by vmap (no primal needed).
        return vmap(lambda r: self.adjoint(r)[0], in_dims=1, out_dims=1)(rdz), {}


# --------------------------------------------------------------------------------------------
# Finding the chain
# --------------------------------------------------------------------------------------------


_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}


def _flatten_fn(start: int, end: int):
    def flatten(a: Tensor) -> Tensor:
        return a.flatten(start, end)

    return flatten


def _module_layer(module: nn.Module, prefix: str) -> _Layer | None:
    names = {k: f"{prefix}.{k}" if prefix else k for k, _ in module.named_parameters(recurse=False)}
    kind = type(module)
    if kind is nn.Linear:
        return _Linear(module, names)
    if kind in (nn.Conv1d, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        return _Conv(module, names)
    if names:
        return None  # any other parametrised module is unknown here
    if kind in _ACTIVATIONS:
        return _Elementwise(_ACTIVATIONS[kind])
    if kind in (nn.MaxPool1d, nn.MaxPool2d) and not module.return_indices:
        return _Pool(module)
    if kind is nn.Flatten and module.start_dim != 0:
        return _Reshape(_flatten_fn(module.start_dim, module.end_dim))
    if kind in (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
        return _Reshape(module)
    if kind is nn.Identity or (
        isinstance(module, nn.modules.dropout._DropoutNd) and (not module.training or module.p == 0)
    ):
        return _Reshape(lambda a: a)
    return None


def _trace(model: nn.Module) -> list[tuple[nn.Module | None, str, object]] | None:
    """``[(module, qualified name, function)]`` of a chain-shaped forward, or ``None``.

    Only calls of leaf modules (and ``torch.flatten``) are accepted: tracing runs through
    functions, including the forward of a custom :class:`torch.autograd.Function`, whose own
    backward the chain would silently ignore.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure just means "not a chain"
        return None
    links = []
    previous = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                return None
            previous = node
            continue
        if node.op == "output":
            return links if node.args == (previous,) and links else None
        if len(previous.users) != 1 or not node.args or node.args[0] is not previous:
            return None
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            links.append((model.get_submodule(node.target), node.target, None))
        elif node.op == "call_function" and node.target is torch.flatten and not node.kwargs:
            start = node.args[1] if len(node.args) > 1 else 0
            end = node.args[2] if len(node.args) > 2 else -1
            if start == 0 or not isinstance(start, int) or not isinstance(end, int):
                return None
            links.append((None, "", ("flatten", start, end)))
        else:
            return None
        previous = node
    return None


# model -> its chain links (or None); layers are rebuilt per call so that no activation
# outlives the call that saved it.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Chain:
    """The layers of a chain-shaped model, with the differentiated parameters each one owns."""

    layers: list[_Layer]


def _layer(link: tuple[nn.Module | None, str, object], params: Mapping[str, Tensor]):
    module, name, fn = link
    if module is None:
        return _Reshape(_flatten_fn(fn[1], fn[2]))
    layer = _module_layer(module, name)
    if layer is not None:
        layer.names = {k: q for k, q in layer.names.items() if q in params}
    return layer


def find_chain(model: nn.Module, params: Mapping[str, Tensor]) -> Chain | None:
    """The chain of ``model`` when the fast path applies to it and to ``params``, else ``None``.

    Checked every call (cheap): the traced modules are still the model's, no module appears
    twice, every differentiated parameter is owned by a layer of the chain and tied to no other,
    dropout is inactive.
    """
    if model not in _CACHE:
        _CACHE[model] = _trace(model)
    links = _CACHE[model]
    if links is None:
        return None
    modules = [m for m, _, _ in links if m is not None]
    if len({id(m) for m in modules}) != len(modules):
        return None
    if any(model.get_submodule(name) is not m for m, name, _ in links if m is not None):
        _CACHE.pop(model)
        return find_chain(model, params)
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    if any(c > 1 for c in counts.values()):
        return None
    layers = [_layer(link, params) for link in links]
    if any(layer is None for layer in layers):
        return None
    owned = {q for layer in layers for q in layer.names.values()}
    if owned != set(params):
        return None
    return Chain(layers)


# --------------------------------------------------------------------------------------------
# The fused pass
# --------------------------------------------------------------------------------------------


def _is_plain_cross_entropy(loss_fn: object, outputs: Tensor, targets: Tensor) -> bool:
    if loss_fn is nn.functional.cross_entropy:
        plain = True
    elif isinstance(loss_fn, nn.CrossEntropyLoss):
        plain = loss_fn.weight is None and loss_fn.label_smoothing == 0.0
        plain = plain and loss_fn.ignore_index < 0
    else:
        return False
    return plain and outputs.dim() == 2 and not targets.is_floating_point() and targets.dim() == 1


def run_chain(
    chain: Chain,
    params: Params,
    batch: tuple[Tensor, Tensor],
    loss_fn,
    vectors: Mapping[str, Tensor] | None,
    *,
    hessian: bool = True,
    chunk_size: int | None = None,
) -> tuple[Tensor, Params, Products | None]:
    """Loss, gradient and (when ``vectors`` is given) the ``k`` curvature-vector products."""
    inputs, targets = batch
    layers = chain.layers
    local = [{k: params[q] for k, q in layer.names.items() if q in params} for layer in layers]
    # The input gradient of link i is needed when an earlier link holds a differentiated param.
    need = [any(local[j] for j in range(i)) for i in range(len(layers))]
    first = min(i for i, p in enumerate(local) if p)  # nothing below it is differentiated
    with torch.no_grad():
        acts = [inputs]
        for layer, p in zip(layers, local, strict=True):
            acts.append(layer.forward(acts[-1], p))
        outputs = acts[-1]
        plain_ce = _is_plain_cross_entropy(loss_fn, outputs, targets)
        if plain_ce:
            loss = nn.functional.cross_entropy(outputs, targets)
            prob = outputs.softmax(1)
            d_out = prob.clone()
            d_out[torch.arange(len(targets)), targets] -= 1
            d_out /= len(targets)
        else:
            d_out, loss = torch.func.grad_and_value(loss_fn)(outputs, targets)
        deltas: list[Tensor | None] = [None] * len(layers)  # gradient at each link's OUTPUT
        grads: Params = {}
        delta = d_out
        for i in reversed(range(first, len(layers))):
            deltas[i] = delta
            delta, g = layers[i].backward(delta, acts[i], local[i], need[i])
            grads.update({layers[i].names[k]: v for k, v in g.items()})
        if vectors is None:
            return loss, grads, None
        if not plain_ce:
            _, output_hessian = vjp(lambda o: func_grad(loss_fn)(o, targets), outputs)
        k = next(iter(vectors.values())).shape[0]
        step = k if chunk_size is None else max(1, chunk_size)
        parts: list[Products] = []
        for start in range(0, k, step):
            v_all = {q: t[start : start + step] for q, t in vectors.items()}
            v = [{k_: v_all[q] for k_, q in layer.names.items() if q in v_all} for layer in layers]
            tangents: list[Tensor | None] = [None]
            for i, layer in enumerate(layers):
                tangents.append(layer.tangent(acts[i], tangents[-1], local[i], v[i]))
            r_out = tangents[-1]  # (N, k, *out)
            if plain_ce:
                pr = prob.unsqueeze(1)
                r_delta = (pr * r_out - pr * (pr * r_out).sum(-1, keepdim=True)) / len(targets)
            else:
                r_delta = vmap(lambda r: output_hessian(r)[0], in_dims=1, out_dims=1)(r_out)
            products: Products = {}
            for i in reversed(range(first, len(layers))):
                r_delta, prod = layers[i].tangent_backward(
                    deltas[i], r_delta, acts[i], tangents[i], local[i], v[i], need[i], hessian
                )
                products.update({layers[i].names[k_]: t for k_, t in prod.items()})
            parts.append(products)
    if len(parts) == 1:
        return loss, grads, parts[0]
    return loss, grads, {q: torch.cat([part[q] for part in parts]) for q in parts[0]}
