r"""The table of per-layer rules read by both fast paths.

A rule knows one module type exactly: its forward pass, its backward pass, the forward and
backward passes of ``k`` stacked tangents (Pearlmutter's 1994 R-operator, used by the fused chain
in :mod:`.chain`) and, for layers with parameters, the squared contraction that gives the
Gauss-Newton diagonal of its parameters from output cotangents (used by :mod:`.contractions`).
:data:`RULES` maps a module type to its rule class; adding a layer type is one class and one line
there. :func:`rule_for` is the ONE eligibility check both fast paths use: exact type, no hooks,
no parametrisation, no tied parameter and the rule's own conditions. Whatever it refuses takes
the exact generic :mod:`torch.func` path.

The tensor layout conventions of every rule are written once, in :class:`LayerRule`.

For :math:`z = Wa + b` the R-operator equations are

.. math::
    Rz = V a + W\, Ra, \qquad
    R(\nabla W) = R\delta\, a^\top + \delta\, Ra^\top, \qquad
    R(\nabla a) = W^\top R\delta + V^\top \delta,

and for :math:`y = \sigma(z)`: :math:`R\delta_z = \sigma'(z) R\delta_y + \sigma''(z)\, Rz\,
\delta_y`. The Gauss-Newton variant drops the terms that multiply :math:`\delta` (Schraudolph
2002). The squared contraction of a linear map is :math:`\sum_n\sum_r (\delta_{nr} a_n^\top)
^{\odot 2}` (Dangel et al. 2020, BackPACK's DiagGGN).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.nn.utils import parametrize

from .._common.linear_maps import is_hf_conv1d
from .per_example import fit_at_once

__all__ = [
    "RULES",
    "LayerRule",
    "NotAChain",
    "fast_paths_allowed",
    "parameter_uses",
    "rule_for",
]

Params = dict[str, Tensor]


class NotAChain(Exception):
    """Raised during the primal pass when a layer meets inputs its rule does not cover."""


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


class LayerRule:
    """One module type's pieces: forward, backward, tangents, squared contraction.

    Tensor layouts, the same for every rule:

    * ``a``: the layer input, ``(N, *in)``, dim 0 indexes examples; ``z``: its output
      ``(N, *out)``;
    * ``p``: the differentiated tensors of the module's OWN parameters, by local name
      (``"weight"``, ``"bias"``); parameters absent from ``p`` are read from the module and held
      fixed;
    * ``v``: tangents of ``p``, ``(k, *param.shape)``;
    * ``ra``, ``rz``: input and output tangents, ``(N, k, *in)`` and ``(N, k, *out)``, ``None``
      when zero;
    * ``dz``: the gradient of the loss at the output ``(N, *out)``; ``rdz`` its tangent
      ``(N, k, *out)``;
    * ``delta``: output cotangent columns of :mod:`.contractions`, ``(R, N, *out)``.

    Args:
        module: the module (read, never modified).
        names: its own parameters' local names -> qualified names, restricted by the caller to
            the differentiated ones.
    """

    #: Whether the rule has parameters (and hence a squared contraction).
    parametric = False

    def __init__(self, module: nn.Module, names: dict[str, str]) -> None:
        # Typed Any: each rule reads the attributes of its own module type (weight, stride...).
        self.module: Any = module
        self.names = names

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """The rule's own conditions on the module's configuration (default: none)."""
        return True

    def chain_capable(self) -> bool:
        """Whether the fused chain pieces below cover this configuration."""
        return True

    def forward(self, a: Tensor, p: Params) -> Tensor:
        """``z`` from ``a``; raises :class:`NotAChain` for an input layout it does not cover."""
        raise NotImplementedError

    def backward(
        self, dz: Tensor, a: Tensor, p: Params, need_input: bool
    ) -> tuple[Tensor | None, Params]:
        """``(dL/da or None, {local name: dL/dparam})``."""
        raise NotImplementedError

    def tangent(self, a: Tensor, ra: Tensor | None, p: Params, v: Params) -> Tensor | None:
        """``Rz`` from ``Ra`` and the parameter tangents."""
        raise NotImplementedError

    def tangent_backward(
        self,
        dz: Tensor,
        rdz: Tensor,
        a: Tensor,
        ra: Tensor | None,
        p: Params,
        v: Params,
        need_input: bool,
        hessian: bool,
    ) -> tuple[Tensor | None, Params]:
        """``(R(dL/da), {local name: R(dL/dparam)})``; ``hessian=False``: Gauss-Newton."""
        raise NotImplementedError

    def squared_contraction(
        self, a: Tensor, delta: Tensor, local: list[str], elements: int | None = None
    ) -> Params:
        r""":math:`\sum_n\sum_r` of squared per-example gradients of the parameters ``local``.

        ``elements``: the most per-example weight gradients that exist at once, in numbers
        (``None``: ``2**24``).
        """
        raise NotImplementedError

    def _w(self, p: Params) -> Tensor:
        return p.get("weight", self.module.weight.detach())

    def _b(self, p: Params) -> Tensor | None:
        b = self.module.bias
        return p.get("bias", None if b is None else b.detach())


class LinearRule(LayerRule):
    """:class:`~torch.nn.Linear`; the chain takes ``(N, in)`` inputs, contractions any layout."""

    parametric = True

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

    def squared_contraction(self, a, delta, local, elements=None):
        return _linear_contraction(a, delta, local, self.module.weight.shape, elements)


def _linear_contraction(
    a: Tensor, delta: Tensor, local: list[str], weight_shape: torch.Size, elements: int | None
) -> Params:
    """The squared contraction of :math:`z = Wa + b`, ``W`` of ``weight_shape`` ``(out, in)``."""
    out: Params = {}
    if a.dim() == 2:
        # The square of an outer product is the outer product of the squares: one matmul.
        squares = (delta * delta).sum(0)  # (N, out): the columns summed first
        if "weight" in local:
            out["weight"] = squares.T @ (a * a)
        if "bias" in local:
            out["bias"] = squares.sum(0)
        return out
    # (N, T, in) inputs: a per-example gradient sums over positions before it is squared.
    unfolded = a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2)  # (N, in, T)
    delta = delta.reshape(*delta.shape[:2], -1, delta.shape[-1]).transpose(2, 3)  # (R,N,out,T)
    return _positions_contraction(unfolded, delta, 1, local, weight_shape, elements)


class HFConv1DRule(LayerRule):
    r"""Hugging Face's ``Conv1D`` (GPT-2's projections): :math:`z = a W + b`, ``W`` ``(in, out)``.

    The map of :class:`LinearRule` with the weight stored transposed: a per-example weight
    gradient is :math:`\sum_t a_t \delta_t^\top`. Squared contractions only: the chain never
    meets it (a Hugging Face model is not a chain of modules).
    """

    parametric = True

    def chain_capable(self):
        return False

    def forward(self, a, p):
        raise NotAChain

    def squared_contraction(self, a, delta, local, elements=None):
        fan_in, fan_out = self.module.weight.shape
        out = _linear_contraction(a, delta, local, torch.Size((fan_out, fan_in)), elements)
        if "weight" in out:
            out["weight"] = out["weight"].T.contiguous()  # stored (in, out)
        return out


class ConvRule(LayerRule):
    """Conv1d/Conv2d with zero padding given as integers (the chain: ``groups == 1`` only)."""

    parametric = True

    def __init__(self, module: nn.Module, names: dict[str, str]) -> None:
        super().__init__(module, names)
        m = module
        assert isinstance(m, nn.Conv1d | nn.Conv2d)
        assert not isinstance(m.padding, str)  # refused by supports()
        self.args: tuple[list[int], list[int], list[int]] = (
            list(m.stride),
            [int(p) for p in m.padding],
            list(m.dilation),
        )
        self.conv = nn.functional.conv1d if isinstance(m, nn.Conv1d) else nn.functional.conv2d

    @classmethod
    def supports(cls, module):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def chain_capable(self):
        return self.module.groups == 1

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
        mask = [need_input, "weight" in self.names, False]
        da, dw, _ = torch.ops.aten.convolution_backward(
            dz, a, self._w(p), None, stride, padding, dilation, False, [0] * len(stride), 1, mask
        )
        grads = {}
        if "weight" in self.names:
            grads["weight"] = dw
        if "bias" in self.names:
            grads["bias"] = dz.sum([0, *range(2, dz.dim())])
        return da, grads

    def tangent(self, a, ra, p, v):
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

    def squared_contraction(self, a, delta, local, elements=None):
        unfolded = _unfold(self.module, a)  # (N, in*kk, P)
        delta = delta.flatten(3) if delta.dim() > 4 else delta  # (R, N, out, P)
        return _positions_contraction(
            unfolded, delta, self.module.groups, local, self.module.weight.shape, elements
        )


def _positions_contraction(
    unfolded: Tensor,
    delta: Tensor,
    groups: int,
    local: list[str],
    weight_shape: torch.Size,
    elements: int | None,
) -> Params:
    """Bias and weight sums of a linear map applied at several positions per example."""
    out: Params = {}
    if "bias" in local:
        per_example = delta.sum(3)
        out["bias"] = (per_example * per_example).sum((0, 1))
    if "weight" in local:
        out["weight"] = _squared_contraction(unfolded, delta, groups, elements).reshape(
            weight_shape
        )
    return out


def _unfold(module: nn.Module, a: Tensor) -> Tensor:
    """Patches ``(N, in * prod(kernel), positions)`` of a Conv1d/Conv2d input (zero padding).

    The same layout as :func:`torch.nn.functional.unfold`, built from one strided slice per
    kernel offset: on CPU this is about ten times faster than ``im2col``.
    """
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    spatial = a.dim() - 2
    kernel, stride = module.kernel_size, module.stride
    dilation, padding = module.dilation, module.padding
    assert not isinstance(padding, str)  # refused by ConvRule.supports
    pads = [p for pad in reversed(padding) for p in (pad, pad)]
    padded = nn.functional.pad(a, pads) if any(pads) else a
    sizes = [
        (padded.shape[2 + d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1
        for d in range(spatial)
    ]
    patches = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(
            slice(o * dil, o * dil + st * (size - 1) + 1, st)
            for o, dil, st, size in zip(offset, dilation, stride, sizes, strict=True)
        )
        patches.append(padded[(slice(None), slice(None)) + index])
    return torch.stack(patches, 2).reshape(a.shape[0], -1, math.prod(sizes))


def _squared_contraction(
    unfolded: Tensor, delta: Tensor, groups: int, elements: int | None
) -> Tensor:
    r""":math:`\sum_{r,n} (\delta_{rn} U_n^\top)^{\odot 2}` per group, examples in chunks.

    Args:
        unfolded: ``(N, in_total, P)`` inputs per position.
        delta: ``(R, N, out_total, P)`` output gradients per position.
        groups: convolution groups (1 for a Linear layer); channels only mix within a group.
        elements: the most per-example gradients that exist at once, in numbers (``None``:
            ``2**24``).
    """
    columns, n, out_total, positions = delta.shape
    in_total = unfolded.shape[1]
    u = unfolded.reshape(n, groups, in_total // groups, positions)
    d = delta.reshape(columns, n, groups, out_total // groups, positions)
    per_example = columns * out_total * in_total // groups
    step = fit_at_once(per_example, elements)
    total = delta.new_zeros(groups, out_total // groups, in_total // groups)
    for start in range(0, n, step):
        stop = start + step
        grads = torch.einsum("rngop,ngip->rngoi", d[:, start:stop], u[start:stop])
        total += (grads * grads).sum((0, 1))
    return total.reshape(out_total, in_total // groups)


class ElementwiseRule(LayerRule):
    """``y = sigma(z)``, first and second derivatives from the saved output."""

    function: Callable[[Tensor], Tensor] = staticmethod(torch.tanh)

    def derivatives(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(sigma'(z), sigma''(z) or None when it is zero)`` from ``y = sigma(z)``."""
        raise NotImplementedError

    def forward(self, a, p):
        self.y = type(self).function(a)
        return self.y

    def backward(self, dz, a, p, need_input):
        self.d1, self.d2 = self.derivatives(self.y)
        return dz * self.d1, {}

    def tangent(self, a, ra, p, v):
        return None if ra is None else ra * self.d1.unsqueeze(1)

    def tangent_backward(self, dz, rdz, a, ra, p, v, need_input, hessian):
        rda = rdz * self.d1.unsqueeze(1)
        if hessian and ra is not None and self.d2 is not None:
            rda = rda + ra * (self.d2 * dz).unsqueeze(1)
        return rda, {}


class TanhRule(ElementwiseRule):
    r""":class:`~torch.nn.Tanh`: :math:`\sigma' = 1 - y^2`, :math:`\sigma'' = -2y\sigma'`."""

    function = staticmethod(torch.tanh)

    def derivatives(self, y):
        d1 = 1 - y * y
        return d1, -2 * y * d1


class SigmoidRule(ElementwiseRule):
    r""":class:`~torch.nn.Sigmoid`: :math:`\sigma' = y(1-y)`, :math:`\sigma''=\sigma'(1-2y)`."""

    function = staticmethod(torch.sigmoid)

    def derivatives(self, y):
        d1 = y * (1 - y)
        return d1, d1 * (1 - 2 * y)


class ReLURule(ElementwiseRule):
    r""":class:`~torch.nn.ReLU`: :math:`\sigma'' = 0` almost everywhere."""

    function = staticmethod(torch.relu)

    @classmethod
    def supports(cls, module):
        return not module.inplace

    def derivatives(self, y):
        return (y > 0).to(y.dtype), None


class MaxPoolRule(LayerRule):
    """Max pooling: routes through the argmax, pattern fixed by the primal pass."""

    @classmethod
    def supports(cls, module):
        return not module.return_indices

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


class FixedLinearRule(LayerRule):
    """A fixed linear map of each example (average pooling, flatten, identity, inactive dropout).

    Applied with the ``N * k`` tangents folded into the batch; its adjoint comes from
    :func:`torch.func.vjp`.
    """

    def map(self, a: Tensor) -> Tensor:
        """The map itself (default: the module)."""
        return self.module(a)

    def forward(self, a, p):
        primal = vjp(self.map, a)
        self.adjoint = primal[1]
        return primal[0]

    def backward(self, dz, a, p, need_input):
        return (self.adjoint(dz)[0] if need_input else None), {}

    def tangent(self, a, ra, p, v):
        if ra is None:
            return None
        n, k = ra.shape[:2]
        return _unbatched(self.map(_batched(ra, k)), n)

    def tangent_backward(self, dz, rdz, a, ra, p, v, need_input, hessian):
        # A fixed linear map's adjoint, batched over the k tangents by vmap (no primal needed).
        return vmap(lambda r: self.adjoint(r)[0], in_dims=1, out_dims=1)(rdz), {}


class FlattenRule(FixedLinearRule):
    """:class:`~torch.nn.Flatten` from a dim >= 1 (dim 0 keeps indexing examples)."""

    @classmethod
    def supports(cls, module):
        return module.start_dim >= 1  # a negative start could reach dim 0 and mix examples


class IdentityRule(FixedLinearRule):
    """Identity, and dropout that drops nothing (eval mode or ``p == 0``)."""

    @classmethod
    def supports(cls, module):
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return not module.training or module.p == 0
        return True

    def map(self, a: Tensor) -> Tensor:
        return a


_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_AVERAGE_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)

#: Module type (exact) -> rule class. Adding a layer type: one rule class and one line here.
RULES: dict[type[nn.Module], type[LayerRule]] = {
    nn.Linear: LinearRule,
    nn.Conv1d: ConvRule,
    nn.Conv2d: ConvRule,
    nn.Tanh: TanhRule,
    nn.Sigmoid: SigmoidRule,
    nn.ReLU: ReLURule,
    nn.MaxPool1d: MaxPoolRule,
    nn.MaxPool2d: MaxPoolRule,
    nn.Flatten: FlattenRule,
    nn.Identity: IdentityRule,
    **dict.fromkeys(_AVERAGE_POOLS, FixedLinearRule),
    **dict.fromkeys(_DROPOUT, IdentityRule),
}


def parameter_uses(model: nn.Module) -> dict[int, int]:
    """How many (module, name) slots hold each parameter, by ``id``: the ONE tied-weight count."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return uses


def _has_hooks(module: nn.Module) -> bool:
    return any(
        getattr(module, name, None)
        for name in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        )
    )


def fast_paths_allowed(model: nn.Module) -> bool:
    """No hook anywhere (module or global): a fast path does not run them, the generic one does.

    Hooks include the forward pre-hooks of :mod:`torch.nn.utils.prune`'s reparametrisation.
    """
    hooks = nn.modules.module
    global_hooks = (
        hooks._global_forward_hooks,
        hooks._global_forward_pre_hooks,
        hooks._global_backward_hooks,
        hooks._global_backward_pre_hooks,
    )
    if any(global_hooks):
        return False
    return not any(_has_hooks(m) or parametrize.is_parametrized(m) for m in model.modules())


def rule_for(
    module: nn.Module, prefix: str, params: dict[str, Tensor], uses: dict[int, int]
) -> LayerRule | None:
    """The rule of ``module`` when it is provably eligible, else ``None`` (generic path).

    Eligible: its exact type is in :data:`RULES` (or it is Hugging Face's ``Conv1D``, matched by
    name), it has no hooks and no parametrisation, none of its own parameters is tied to another
    slot, and the rule's :meth:`LayerRule.supports` holds.
    ``names`` of the rule keep only the differentiated parameters (those in ``params``).

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(3, 2)
        >>> rule = rule_for(layer, "fc", {"fc.weight": layer.weight}, parameter_uses(layer))
        >>> type(rule).__name__, rule.names
        ('LinearRule', {'weight': 'fc.weight'})
        >>> _ = layer.register_forward_hook(lambda module, args, output: 2 * output)
        >>> rule_for(layer, "fc", {"fc.weight": layer.weight}, parameter_uses(layer)) is None
        True
    """
    rule_class = RULES.get(type(module))
    if rule_class is None and is_hf_conv1d(module):  # matched by name: transformers is optional
        rule_class = HFConv1DRule
    if rule_class is None or _has_hooks(module) or parametrize.is_parametrized(module):
        return None
    own = dict(module.named_parameters(recurse=False))
    if any(uses.get(id(p), 0) != 1 for p in own.values()):
        return None
    if own and not rule_class.parametric:
        return None
    if not rule_class.supports(module):
        return None
    names = {k: f"{prefix}.{k}" if prefix else k for k in own}
    return rule_class(module, {k: q for k, q in names.items() if q in params})
