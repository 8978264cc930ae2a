r"""Second moments of the inputs of each weight matrix, over the tokens that count.

A linear map :math:`y = W x` (a convolution: :math:`y = W \operatorname{unfold}(x)`) multiplies
input feature :math:`j` by column :math:`j` of :math:`W`. Stack as the rows of :math:`X`
(:math:`n \times d_{in}`) every input vector the map sees in the data at a position that COUNTS
(:func:`lossprune._common.batches.counted_positions`: not padding, label not ``-100``; every
position of a batch without them): every example, every counted position of a sequence, every
patch of an image, and, for a weight shared by several modules (tied weights), the inputs of
EVERY module that uses it. This module computes the means over those :math:`n` rows

.. math::

    s_j = \frac1n \sum_t x_{tj}^2 \quad\text{(mean squared input)}, \qquad
    G = \frac1n X^\top X = \frac1n \sum_t x_t x_t^\top \quad\text{(mean Gram matrix)}.

Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models",
Eq. 1) scores :math:`|W_{ij}| \, \|X_j\|_2 = |W_{ij}| \sqrt{n s_j}`; the layer-wise
reconstruction loss :math:`E(\hat W) = \|W_0 X^\top - \hat W X^\top\|_F^2 / n` of SparseGPT
(Frantar and Alistarh 2023) and ALPS has Hessian :math:`2G` per output row, and :math:`s` is
its diagonal. Both are MEANS, like every other statistic of the library, so duplicating the
data changes nothing and a batch contributes exactly its counted rows, whatever the batch size.

:class:`InputStatistics` accumulates the sums :math:`\sum_t x_t^2` (and :math:`\sum_t x_t
x_t^\top` when asked) and the row counts with forward pre-hooks, one ``addmm`` per batch into
float32 (float64 when asked) whatever the model's dtype, all-reduces sums and counts under
:mod:`torch.distributed` (every rank gets the statistics of the union of the shards), then
divides. The result for a parameter is shaped to broadcast against it: ``(1, in)`` for
``nn.Linear``, ``(in, 1)`` for Hugging Face's ``Conv1D`` (stored ``(in, out)``), and ``(1, in,
*kernel)`` for a convolution (``(out, in/groups, *kernel)`` with groups, where each output
channel sees only its group's inputs); the Gram matrix is ``(in, in)``, for ``nn.Linear`` and
``Conv1D`` only.

Which rows of a module's input are the counted positions: an input shaped ``(N, T, in)`` has one
row per position, ``(N·T, in)`` the same flattened, ``(N, in)`` one row per example (counted
when any of its positions counts). Any other layout (the tokens routed to one expert of a
mixture of experts, a convolution over a sequence) is supported only when every position counts.
The fused experts of a Hugging Face mixture of experts (one ``(experts, out, in)`` parameter) are
read by :mod:`.expert_inputs`: each expert's matrix from the tokens routed to it, a mean per
expert (an expert no counted token reached has 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._common.distributed import all_reduce_sum
from .._common.linear_maps import is_hf_conv1d
from .expert_inputs import expert_input_sums, is_expert_matrix

__all__ = ["InputMoments", "InputStatistics"]


class InputMoments(NamedTuple):
    r"""The input moments of one weight matrix (module docstring).

    Attributes:
        sq_norms: :math:`s_j`, the mean over counted rows of input feature :math:`j` squared,
            shaped to broadcast against the parameter.
        gram: :math:`G`, the mean of :math:`x x^\top`, ``(in, in)``; ``None`` unless asked for.
        rows: :math:`n`, the number of counted rows (all ranks together).
        mean: :math:`\bar x`, the mean row, ``(in,)``, with the Gram matrix (``None``
            without): an affine map :math:`W x + b` has the Gram matrix
            :math:`\begin{pmatrix} G & \bar x \\ \bar x^\top & 1\end{pmatrix}` of
            :math:`(x, 1)`, which a refit of its bias needs.
    """

    sq_norms: Tensor
    gram: Tensor | None
    rows: int
    mean: Tensor | None = None


class _Contribution(NamedTuple):
    """What one call of a module adds: the sum of its inputs squared, the rows, their number."""

    sq_sum: Tensor
    rows: Tensor | None  # (r, in), for the Gram matrix; None for a grouped convolution
    rows_counted: int


# A rule maps (module, input, counted positions) to its contribution.
_Rule = Callable[[nn.Module, Tensor, "Tensor | None"], _Contribution]


def _counted_rows(x: Tensor, counted: Tensor | None, module: nn.Module) -> Tensor:
    """The input vectors of ``x`` (``(..., in)``) at counted positions, as rows ``(r, in)``."""
    flat = x.reshape(-1, x.shape[-1])
    if counted is None:
        return flat
    lead = tuple(x.shape[:-1])
    # One row per position, in the positions' order: the same shape, flattened, or with
    # dimensions of size one put in (DeepSeek-V3's kv_b_proj reads (N, 1, T, rank)).
    if lead in ((counted.numel(),), tuple(counted.shape)) or (
        _without_ones(lead) == _without_ones(counted.shape)
    ):
        keep = counted.reshape(-1)
    elif lead == tuple(counted.shape[:1]):  # one row per example (e.g. a classifier head)
        keep = counted.any(1)
    elif bool(counted.all()):
        return flat
    else:
        raise TypeError(
            f"input statistics: the input of {type(module).__name__} has shape "
            f"{tuple(x.shape)}, which does not say which rows are the counted positions "
            f"{tuple(counted.shape)} (e.g. the tokens routed to one expert); pass batches "
            "without padding or ignored labels"
        )
    return flat[keep.to(flat.device)]


def _without_ones(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _linear(module: nn.Module, x: Tensor, counted: Tensor | None) -> _Contribution:
    rows = _counted_rows(x, counted, module)
    return _Contribution(rows.square().sum(0).unsqueeze(0), rows, rows.shape[0])  # (1, in)


def _hf_conv1d(module: nn.Module, x: Tensor, counted: Tensor | None) -> _Contribution:
    rows = _counted_rows(x, counted, module)  # the weight is (in, out): the sum is (in, 1)
    return _Contribution(rows.square().sum(0).unsqueeze(1), rows, rows.shape[0])


def _conv(module: nn.Module, x: Tensor, counted: Tensor | None) -> _Contribution:
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    if counted is not None and not bool(counted.all()):
        raise TypeError(
            f"input statistics: a {type(module).__name__} has no per-position rows to leave "
            "padding or ignored labels out of; pass batches without them"
        )
    if isinstance(module, nn.Conv1d):  # as a 2-d convolution of height 1
        x = x.unsqueeze(-2)
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *module.padding), (1, *module.stride)
    else:
        kernel, dilation = module.kernel_size, module.dilation
        padding, stride = module.padding, module.stride  # type: ignore[assignment]
    if x.dim() == 3:  # an unbatched input
        x = x.unsqueeze(0)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    per_feature = patches.square().sum((0, 2))  # (in · prod(kernel),)
    count = patches.shape[0] * patches.shape[2]  # examples x positions of the kernel
    weight = module.weight
    groups = module.groups
    # Output channels of group g see only the inputs of group g.
    per_group = per_feature.reshape(groups, 1, *weight.shape[1:])
    if groups == 1:  # each patch is one row of the map's (out, in·kh·kw) matrix
        rows = patches.transpose(1, 2).reshape(count, patches.shape[1])
        return _Contribution(per_group[0], rows, count)
    expanded = per_group.expand(groups, weight.shape[0] // groups, *weight.shape[1:])
    return _Contribution(expanded.reshape(weight.shape), None, count)


def _rule(module: nn.Module, attribute: str) -> _Rule | str:
    """The rule for a parameter, or why it has none."""
    if attribute != "weight":
        return "it is not the weight matrix of a linear map"
    if isinstance(module, nn.Linear):
        return _linear
    if is_hf_conv1d(module):
        return _hf_conv1d
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return "string padding and non-zero padding modes are not supported"
        return _conv
    return (
        "only nn.Linear, nn.Conv1d, nn.Conv2d and Hugging Face's Conv1D are supported "
        "(not transposed or 3-d convolutions, embeddings, nor nn.MultiheadAttention's input "
        "projections)"
    )


def _sum_shape(module: nn.Module, weight: Tensor) -> tuple[int, ...]:
    """The shape of the sum of squares of a module's inputs (module docstring)."""
    if isinstance(module, nn.Linear):
        return (1, weight.shape[1])
    if is_hf_conv1d(module):
        return (weight.shape[0], 1)
    groups = getattr(module, "groups", 1)
    return tuple(weight.shape) if groups > 1 else (1, *weight.shape[1:])


def _users(model: nn.Module, name: str) -> list[tuple[str, nn.Module, str]]:
    """Every (module name, module, attribute) holding the parameter ``name`` (tied weights)."""
    param = model.get_parameter(name)
    return [
        (module_name, module, attribute)
        for module_name, module in model.named_modules(remove_duplicate=False)
        for attribute, value in module._parameters.items()
        if value is param
    ]


class InputStatistics:
    r"""Accumulates the input moments of weight matrices over batches (module docstring).

    Usage: build it, run forward passes inside :meth:`recording` (one per batch, with that
    batch's counted positions), then read :meth:`means`.

    Args:
        model: the module holding the parameters (never modified; hooks live only inside
            :meth:`recording`).
        names: qualified names of weight matrices of ``model``.
        gram: also accumulate :math:`\sum_t x_t x_t^\top` and :math:`\sum_t x_t` (``nn.Linear``,
            ``Conv1D``, and convolutions without groups, whose rows are the flattened
            ``in·kh·kw`` patches).
        dtype: the accumulation dtype (float32 or float64), whatever the model's dtype.

    Raises:
        TypeError: a parameter that is not the weight of a supported linear map (or a Gram
            matrix asked for a convolution), before any hook is registered.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        gram: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"input statistics accumulate in float32 or float64, got {dtype}")
        self._uses: dict[str, list[tuple[nn.Module, _Rule]]] = {}
        self._sums: dict[str, Tensor] = {}
        self._grams: dict[str, Tensor] = {}
        self._firsts: dict[str, Tensor] = {}
        self._rows: dict[str, Tensor] = {}
        self._seen: set[str] = set()
        self._dtype = dtype
        # Fused MoE experts: one matrix per expert, fed by its routed tokens (.expert_inputs);
        # experts module -> its attributes, and per expert matrix the tokens each expert saw.
        self._experts: dict[nn.Module, tuple[str, list[str]]] = {}
        self._expert_rows: dict[str, Tensor] = {}
        for name in names:
            weight = model.get_parameter(name)
            if is_expert_matrix(model, name):
                if gram:
                    raise TypeError(
                        f"input statistics: no Gram matrix for the fused experts {name!r} "
                        "(each expert's inputs are its routed tokens); exclude them"
                    )
                module_name, _, attribute = name.rpartition(".")
                module = model.get_submodule(module_name)
                prefix = f"{module_name}." if module_name else ""
                self._experts.setdefault(module, (prefix, []))[1].append(attribute)
                device = weight.device if weight.device.type != "meta" else torch.device("cpu")
                experts = weight.shape[0]
                self._sums[name] = torch.zeros(0, dtype=dtype, device=device)  # set on first add
                self._expert_rows[name] = torch.zeros(experts, dtype=torch.float64, device=device)
                self._rows[name] = torch.zeros((), dtype=torch.float64, device=device)
                continue
            uses = []
            for module_name, module, attribute in _users(model, name):
                rule = _rule(module, attribute)
                if isinstance(rule, str):
                    used = f" (used as {module_name}.{attribute})" if module_name else ""
                    raise TypeError(
                        f"input statistics: none for {name!r}{used} ({type(module).__name__}): "
                        f"{rule}"
                    )
                if gram and rule is _conv and getattr(module, "groups", 1) > 1:
                    raise TypeError(
                        f"input statistics: no Gram matrix for {name!r} "
                        f"({type(module).__name__} with groups): only nn.Linear, Hugging "
                        "Face's Conv1D and convolutions without groups"
                    )
                uses.append((module, rule))
            shapes = {_sum_shape(module, weight) for module, _ in uses}
            if len(shapes) != 1:
                raise TypeError(
                    f"input statistics: {name!r} is shared by modules that read its input "
                    "dimension differently"
                )
            self._uses[name] = uses
            device = weight.device if weight.device.type != "meta" else torch.device("cpu")
            self._sums[name] = torch.zeros(shapes.pop(), dtype=dtype, device=device)
            self._rows[name] = torch.zeros((), dtype=torch.float64, device=device)
            if gram:
                size = weight[0].numel() if not is_hf_conv1d(uses[0][0]) else weight.shape[0]
                self._grams[name] = torch.zeros(size, size, dtype=dtype, device=device)
                self._firsts[name] = torch.zeros(size, dtype=dtype, device=device)

    @contextmanager
    def recording(self, counted: Tensor | None = None) -> Iterator[None]:
        """Accumulate the inputs of every forward pass run inside, at ``counted`` positions.

        Args:
            counted: ``bool`` ``(N, T)`` counted positions of the batch
                (:func:`~lossprune._common.batches.counted_positions`), or ``None``: every row.
        """
        handles = []
        for name, uses in self._uses.items():
            for module, rule in uses:

                def hook(
                    module: nn.Module,
                    args: tuple[Tensor, ...],
                    name: str = name,
                    rule: _Rule = rule,
                ) -> None:
                    self._add(name, module, rule, args[0], counted)

                handles.append(module.register_forward_pre_hook(hook))
        for module, (prefix, attributes) in self._experts.items():

            def experts_hook(
                module: nn.Module,
                args: tuple,
                kwargs: dict,
                prefix: str = prefix,
                attributes: list[str] = attributes,
            ) -> None:
                found = expert_input_sums(module, args, kwargs, attributes, self._dtype, counted)
                for attribute, value in found.items():
                    self._add_experts(prefix + attribute, value.sq_sums, value.rows)

            handles.append(module.register_forward_pre_hook(experts_hook, with_kwargs=True))
        try:
            with torch.no_grad():
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _add(
        self, name: str, module: nn.Module, rule: _Rule, x: Tensor, counted: Tensor | None
    ) -> None:
        x = x.detach()
        total = self._sums[name]
        if x.device != total.device:  # an accumulator made before the model moved (offload)
            self._move(name, x.device)
        contribution = rule(module, x.to(self._dtype), counted)
        self._sums[name].add_(contribution.sq_sum)
        self._rows[name].add_(contribution.rows_counted)
        rows = contribution.rows
        if name in self._grams and rows is not None:
            self._grams[name].addmm_(rows.T, rows)
            self._firsts[name].add_(rows.sum(0))
        self._seen.add(name)

    def _add_experts(self, name: str, sq_sums: Tensor, rows: Tensor) -> None:
        if self._sums[name].numel() == 0:  # the broadcast shape is known from the first call
            self._sums[name] = torch.zeros_like(sq_sums, dtype=self._dtype)
        self._sums[name] = self._sums[name].to(sq_sums.device).add_(sq_sums)
        self._expert_rows[name] = self._expert_rows[name].to(rows.device).add_(rows)
        self._rows[name] = self._rows[name].to(rows.device).add_(rows.sum())
        self._seen.add(name)

    def _move(self, name: str, device: torch.device) -> None:
        self._sums[name] = self._sums[name].to(device)
        self._rows[name] = self._rows[name].to(device)
        if name in self._grams:
            self._grams[name] = self._grams[name].to(device)
            self._firsts[name] = self._firsts[name].to(device)

    def means(self) -> dict[str, InputMoments]:
        """The moments over everything recorded, all-reduced over ranks (module docstring).

        Raises:
            TypeError: a module was never called through its ``forward`` (e.g. the
                ``out_proj`` of :class:`~torch.nn.MultiheadAttention`, applied functionally).
            ValueError: no recorded position counts (every position padding or ignored).
        """
        missing = [name for name in self._uses if name not in self._seen]
        if missing:
            raise TypeError(
                f"input statistics: the modules of {missing} were not called through their "
                "forward (e.g. nn.MultiheadAttention applies out_proj functionally), so their "
                "inputs are unknown"
            )
        all_reduce_sum(self._sums, self._rows, self._grams, self._firsts, self._expert_rows)
        result = {}
        for name, total in self._sums.items():
            rows = round(float(self._rows[name]))
            if rows == 0:
                raise ValueError(
                    f"input statistics: no input of {name!r} is at a counted position (every "
                    "position is padding or has the label -100)"
                )
            if name in self._expert_rows:  # a mean per expert (0 for an expert no token reached)
                per_expert = self._expert_rows[name].clamp(min=1).to(total.dtype)
                result[name] = InputMoments(total / per_expert.reshape(-1, 1, 1), None, rows)
                continue
            gram = self._grams[name] / rows if name in self._grams else None
            mean = self._firsts[name] / rows if name in self._firsts else None
            result[name] = InputMoments(total / rows, gram, rows, mean)
        return result
