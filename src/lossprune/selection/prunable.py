r"""Which parameters pruning may touch, and why each of the others stays dense.

By default the weight matrices of linear maps (:mod:`lossprune._common.linear_maps` knows which
modules are linear maps, Hugging Face's fused MoE experts included), never biases or normalisation
parameters, as in Laurent et al., "Revisiting Loss Modelling for Unstructured Pruning",
arXiv:2006.12279; embeddings, heads, input front-ends, poolers and MoE routers stay dense
(:mod:`lossprune.selection._dense` says why). Masks, scores and parameters are keyed by the
parameter's qualified name (``"features.0.weight"``), a tied parameter by the first name
``named_parameters()`` gives it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn
from torch.nn.utils import prune

from .._common.linear_maps import computed_matrices, weight_matrices
from ._dense import dense_by_default

__all__ = ["prunable_parameters", "describe_prunable", "PrunableSummary", "ParameterDecision"]


def prunable_parameters(model: nn.Module, include=None, exclude=None) -> dict[str, nn.Parameter]:
    r"""The parameters of ``model`` that pruning may touch, keyed by qualified name.

    By default these are the weight matrices of linear maps: the ``.weight`` of every
    :class:`~torch.nn.Linear` and every convolution (``Conv1d/2d/3d`` and their transposed
    forms), of Hugging Face's ``Conv1D`` (GPT-2), the input projections of
    :class:`~torch.nn.MultiheadAttention` (``in_proj_weight`` or ``q/k/v_proj_weight``) and
    Hugging Face's fused mixture-of-experts matrices (``experts.gate_up_proj``,
    ``experts.down_proj``: one matrix per expert), as in the paper: no biases, no normalisation
    parameters. Embedding tables and weights tied to them (GPT-2's ``lm_head``), a language
    model's output head, input front-ends (ViT's patch embedding, Whisper's convolutions), MoE
    routers and gates, poolers and task heads (a classifier) stay dense unless ``include``
    names them (the rules: :mod:`lossprune.selection._dense`). They come in
    ``model.named_parameters()`` order, which follows ``model.named_modules()``;
    :func:`describe_prunable` says why each parameter is in or out.

    A parameter shared by several modules (tied weights) is counted once, under the first name
    ``named_parameters()`` gives it. Frozen parameters (``requires_grad=False``) are skipped;
    an ``include`` pattern that names only frozen ones is refused. A weight matrix that a
    parametrization or a norm hook recomputes (``weight_norm``, ``spectral_norm``) cannot be
    zeroed in place: the model is refused unless ``include``/``exclude`` says what to do with
    it.

    Args:
        model: The network.
        include: ``None``, a string or an iterable of strings. Each string selects the parameters
            whose qualified name equals it or matches it as a regular expression
            (:func:`re.fullmatch`). When given, the candidates are *all* parameters of the model
            that match any pattern, not only the default weights. A tied parameter matches if any
            of its names does.
        exclude: Same form as ``include``; matching parameters are removed from the candidates.

    Returns:
        Qualified name to parameter, e.g. ``{"features.0.weight": Parameter, ...}``.

    Raises:
        TypeError: ``model`` is not a module, or a pattern is not a string.
        ValueError: A pattern matches no parameter of the model, or only frozen ones; a
            parametrized weight matrix that ``include``/``exclude`` leaves undecided; nothing
            is left to prune.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> list(prunable_parameters(net))
        ['0.weight', '2.weight']
        >>> list(prunable_parameters(net, include=r".*\.bias", exclude="2.bias"))
        ['0.bias']
    """
    summary = describe_prunable(model, include, exclude)
    if include is None:
        _refuse_computed_matrices(model, _patterns(exclude, "exclude"))
    params = dict(model.named_parameters())
    selected = {row.name: params[row.name] for row in summary.rows if row.pruned}
    if not selected:
        raise ValueError(
            "no prunable parameters: the model has no trainable weight matrix of a linear map "
            "left after include/exclude (embeddings and language-model heads are only pruned "
            "when include= names them)"
        )
    return selected


class ParameterDecision(NamedTuple):
    """One row of :class:`PrunableSummary`.

    Attributes:
        name: canonical qualified name (the first one ``named_parameters()`` gives).
        aliases: the other names of a tied parameter.
        shape: the parameter's shape.
        pruned: whether pruning may touch it.
        reason: why it is in or out.
    """

    name: str
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    pruned: bool
    reason: str


@dataclass(frozen=True)
class PrunableSummary:
    """What pruning touches in a model and what it leaves, with the reason for each parameter.

    ``str(summary)`` is a table a user can print; :attr:`rows` holds the decisions.
    """

    rows: tuple[ParameterDecision, ...]

    @property
    def pruned(self) -> tuple[str, ...]:
        """Names of the parameters pruning may touch."""
        return tuple(row.name for row in self.rows if row.pruned)

    def __str__(self) -> str:
        pruned = [row for row in self.rows if row.pruned]
        weights = sum(math.prod(row.shape) for row in pruned)
        total = sum(math.prod(row.shape) for row in self.rows)
        lines = [
            f"prunable: {len(pruned)} of {len(self.rows)} parameters, "
            f"{weights:,} of {total:,} weights"
        ]
        width = max(len(row.name) for row in self.rows)
        for row in self.rows:
            mark = "prune" if row.pruned else "keep "
            alias = f" (= {', '.join(row.aliases)})" if row.aliases else ""
            shape = "x".join(map(str, row.shape)) or "scalar"
            lines.append(f"  {mark}  {row.name:<{width}}  {shape:>12}  {row.reason}{alias}")
        return "\n".join(lines)


def describe_prunable(model: nn.Module, include=None, exclude=None) -> PrunableSummary:
    """Every parameter of ``model``, whether :func:`prunable_parameters` selects it, and why.

    Arguments and errors as :func:`prunable_parameters` (except that an empty selection is not
    an error here).

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
        >>> net[1].weight = net[0].weight  # a head tied to the embedding
        >>> print(describe_prunable(net))  # doctest: +NORMALIZE_WHITESPACE
        prunable: 0 of 2 parameters, 0 of 50 weights
          keep   0.weight  10x4  weight of embedding '0' (dense by default) (= 1.weight)
          keep   1.bias      10  not the weight matrix of a linear map
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include = _patterns(include, "include")
    exclude = _patterns(exclude, "exclude")
    _refuse_torch_pruned(model)

    # Every name of every parameter, grouped by parameter: the first name is the canonical one
    # (the one named_parameters() and functional_call use), the others are aliases of tied weights.
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        params.setdefault(id(param), param)
    all_names = [name for group in names.values() for name in group]
    for option, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(_matches(pattern, name) for name in all_names):
                raise ValueError(f"{option} pattern {pattern!r} matches no parameter of the model")
    for pattern in include or ():
        matched = [key for key, group in names.items() if _any_match([pattern], group)]
        if not any(params[key].requires_grad for key in matched):
            frozen = [names[key][0] for key in matched]
            raise ValueError(
                f"include pattern {pattern!r} names only frozen parameters (requires_grad=False): "
                f"{frozen}; unfreeze them with requires_grad_(True) to prune them, or leave them "
                "out of include="
            )

    matrices = {
        id(module._parameters[local]): matrix.kind
        for module in model.modules()
        for local, matrix in weight_matrices(module).items()
    }
    dense = dense_by_default(model)
    params_by_name = dict(model.named_parameters(remove_duplicate=False))
    for computed in _computed_matrices(model):
        for source in computed.sources:
            dense.setdefault(
                id(params_by_name[source]),
                f"parameter of {computed.weight!r}, which {computed.what} computes (not a weight "
                "matrix itself; prunable_parameters refuses the model unless include= or "
                "exclude= names it)",
            )
    rows = []
    for key, group in names.items():
        if include is not None:
            pruned = _any_match(include, group)
            reason = "matches include=" if pruned else "not matched by include="
        elif key in dense:
            pruned, reason = False, dense[key]
        elif key in matrices:
            pruned, reason = True, f"weight matrix of {matrices[key]}"
        else:
            pruned, reason = False, "not the weight matrix of a linear map"
        if pruned and exclude is not None and _any_match(exclude, group):
            pruned, reason = False, "matches exclude="
        if pruned and not params[key].requires_grad:
            pruned, reason = False, "frozen (requires_grad=False)"
        rows.append(
            ParameterDecision(group[0], tuple(group[1:]), tuple(params[key].shape), pruned, reason)
        )
    return PrunableSummary(tuple(rows))


class _Computed(NamedTuple):
    """A weight matrix that something recomputes from other parameters."""

    weight: str  # its qualified name
    what: str  # what computes it
    sources: tuple[str, ...]  # the qualified names of the parameters it is computed from


def _computed_matrices(model: nn.Module) -> list[_Computed]:
    found = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for local, what in computed_matrices(module).items():
            sources = tuple(
                prefix + name
                for name, _ in module.named_parameters()
                if name.startswith((f"parametrizations.{local}.", f"{local}_"))
            )
            found.append(_Computed(prefix + local, what, sources))
    return found


def _refuse_computed_matrices(model: nn.Module, exclude: list[str] | None) -> None:
    """A weight matrix recomputed from other parameters is neither pruned nor silently skipped.

    Zeroing ``weight_norm``'s ``weight`` does not stay (the next forward recomputes it from
    ``g`` and ``v``); leaving the layer out would report a sparsity over fewer layers than the
    user expects. Unless ``exclude=`` names one of its parameters (then it stays dense by
    choice), the model is refused with the ways out.
    """
    for computed in _computed_matrices(model):
        if not computed.sources or (exclude and _any_match(exclude, list(computed.sources))):
            continue
        raise ValueError(
            f"{computed.weight!r} is computed by {computed.what} from {list(computed.sources)}, "
            "so a zero written into it would not stay; remove the parametrization or hook first "
            "(e.g. torch.nn.utils.parametrize.remove_parametrizations), or pass "
            f"exclude={computed.sources[-1]!r} to leave the layer dense (include= may name its "
            "parameters to prune those instead)"
        )


def _refuse_torch_pruned(model: nn.Module) -> None:
    """A ``torch.nn.utils.prune`` reparametrisation hides the weight behind ``weight_orig``.

    Pruning ``weight_orig`` would count sparsity without the torch mask, and skipping the layer
    would report a sparsity the model does not have: refuse instead.
    """
    for module_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                name = f"{module_name}.{hook._tensor_name}" if module_name else hook._tensor_name
                raise ValueError(
                    f"{name!r} is pruned by torch.nn.utils.prune ({hook._tensor_name}_orig / "
                    f"{hook._tensor_name}_mask); make it permanent first with "
                    "lossprune.selection.from_torch_prune(model, remove=True), which returns its "
                    "masks"
                )


def _patterns(patterns, option: str) -> list[str] | None:
    """Normalise an include/exclude argument to ``None`` or a list of strings."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    if not isinstance(patterns, Iterable):
        raise TypeError(
            f"{option} must be None, a string or an iterable of strings, "
            f"got {type(patterns).__name__}"
        )
    patterns = list(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{option} patterns must be strings, got {type(pattern).__name__}")
    return patterns


def _matches(pattern: str, name: str) -> bool:
    """Exact name, or a regular expression matching the whole name."""
    if pattern == name:
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        # Not a valid regular expression: then it can only have been meant as an exact name.
        return False


def _any_match(patterns: list[str], names: list[str]) -> bool:
    return any(_matches(pattern, name) for pattern in patterns for name in names)
