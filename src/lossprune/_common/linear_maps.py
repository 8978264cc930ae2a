r"""Which parameters are the weight matrices of linear maps, and along which axes.

Pruning removes entries of the matrices :math:`W` of linear maps :math:`y = W x (+ b)`: the
weights of :class:`~torch.nn.Linear` (and its subclasses, e.g. the ``out_proj`` of
:class:`~torch.nn.MultiheadAttention`), of every convolution, of Hugging Face's
``transformers.pytorch_utils.Conv1D`` (GPT-2's projections, stored transposed as
``(in, out)``) and the input projections of :class:`~torch.nn.MultiheadAttention`
(``in_proj_weight``, or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` when the key
and value sizes differ). Biases and normalisation parameters are never in the default set
(Laurent et al. 2020, Sec. 5).

Hugging Face's fused mixture-of-experts parameters are linear maps too, one per expert: transformers
5 stores the experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, GPT-OSS and most other MoE families
as 3-D parameters ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` of shape
``(experts, out, in)`` (``(experts, in, out)`` when the class is declared ``is_transposed``), in a
module the ``transformers.integrations.moe.use_experts_implementation`` decorator marks with its
layout attributes. Each ``[e]`` slice is expert ``e``'s own matrix; :class:`WeightMatrix` records
the expert axis so that selections treat every expert matrix as a layer of its own.

Which of these matrices stay dense by default (embeddings, heads, routers...) is decided one layer
up, by :mod:`lossprune.selection._dense`. :class:`WeightMatrix` also records where the INPUT
dimension of each matrix lies (the axis whose entries one output sums over), which structured
N:M selection needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "WeightMatrix",
    "computed_matrices",
    "is_hf_conv1d",
    "is_hf_experts",
    "weight_matrices",
]


@dataclass(frozen=True)
class WeightMatrix:
    """One prunable weight matrix of a module.

    Attributes:
        kind: what the module is, e.g. ``"Linear"``, ``"Conv2d"``, ``"Conv1D (Hugging Face)"``.
        input_axes: the axes of the parameter that index the map's input (flattened in this
            order): ``(1,)`` for ``nn.Linear`` ``(out, in)``, ``(0,)`` for Hugging Face ``Conv1D``
            ``(in, out)``, ``(1, 2, ...)`` for a convolution ``(out, in/groups, *kernel)`` and
            ``(0, 2, ...)`` for a transposed convolution ``(in, out/groups, *kernel)`` (each
            output channel sums over ``in`` and the kernel), ``(2,)`` for fused experts
            ``(experts, out, in)`` and ``(1,)`` for transposed ones ``(experts, in, out)``.
        expert_axis: the axis that indexes the experts of a fused mixture-of-experts parameter
            (each slice along it is one expert's matrix), ``None`` for a single matrix.
    """

    kind: str
    input_axes: tuple[int, ...]
    expert_axis: int | None = None


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``transformers.pytorch_utils.Conv1D``."""
    # Matched by name, so that lossprune never imports transformers just to look at a model.
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


#: The fused expert matrices of transformers' experts modules (gated experts hold
#: ``gate_up_proj``, the others ``up_proj``; every one holds ``down_proj``).
EXPERT_MATRICES = ("gate_up_proj", "up_proj", "down_proj")


def is_hf_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds transformers' fused experts (``use_experts_implementation``).

    The decorator sets ``is_transposed`` and ``has_gate`` on every instance; they say how the
    3-D parameters are laid out and how the experts compute (the contract of transformers'
    experts kernels, ``transformers.integrations.moe``).
    """
    cls = type(module)
    return (
        cls.__module__.startswith("transformers.")
        and isinstance(getattr(module, "is_transposed", None), bool)
        and isinstance(getattr(module, "has_gate", None), bool)
    )


def weight_matrices(module: nn.Module) -> dict[str, WeightMatrix]:
    """The module's OWN parameters that are weight matrices of linear maps, by local name.

    Only parameters registered as :class:`~torch.nn.Parameter` count: a matrix that a
    parametrization or a norm hook computes from other parameters is in
    :func:`computed_matrices` instead.
    """
    own = module._parameters
    return {k: v for k, v in _declared(module).items() if isinstance(own.get(k), nn.Parameter)}


def computed_matrices(module: nn.Module) -> dict[str, str]:
    """The module's weight matrices that something recomputes from other parameters.

    :mod:`torch.nn.utils.parametrize` (``weight_norm``, ``spectral_norm``, ``orthogonal``...)
    replaces the parameter by a property over ``parametrizations.<name>.original*``; the older
    ``torch.nn.utils.weight_norm``/``spectral_norm`` hooks rewrite it before every forward from
    ``<name>_g``/``<name>_v`` or ``<name>_orig``. A zero written into such a weight does not
    stay. Returns local name to what computes it.
    """
    found = {}
    parametrizations = getattr(module, "parametrizations", {})
    hooks = {
        getattr(hook, "name", None): type(hook).__name__
        for hook in module._forward_pre_hooks.values()
        if type(hook).__module__ in ("torch.nn.utils.weight_norm", "torch.nn.utils.spectral_norm")
    }
    for name in _declared(module):
        if name in parametrizations:
            kinds = ", ".join(type(p).__name__ for p in parametrizations[name])
            found[name] = f"a torch parametrization ({kinds})"
        elif name in hooks:
            found[name] = f"a {hooks[name]} hook"
    return found


def _declared(module: nn.Module) -> dict[str, WeightMatrix]:
    """The weight matrices a module of this type computes with, whether registered or not."""
    own = module._parameters
    if isinstance(module, nn.Linear):
        return {"weight": WeightMatrix("Linear", (1,))}
    if isinstance(module, _ConvNd):
        kind = type(module).__name__
        ndim = len(module.kernel_size) + 2
        axes = (0, *range(2, ndim)) if module.transposed else tuple(range(1, ndim))
        return {"weight": WeightMatrix(kind, axes)}
    if is_hf_conv1d(module):
        return {"weight": WeightMatrix("Conv1D (Hugging Face)", (0,))}
    if isinstance(module, nn.MultiheadAttention):
        return {
            name: WeightMatrix("MultiheadAttention", (1,))
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        }
    if is_hf_experts(module):
        # (experts, out, in), or (experts, in, out) for transposed classes (GPT-OSS).
        kind = f"experts ({type(module).__name__}), one matrix per expert"
        axis = 1 if module.is_transposed else 2
        return {
            name: WeightMatrix(kind, (axis,), expert_axis=0)
            for name in EXPERT_MATRICES
            if getattr(own.get(name), "ndim", 0) == 3
        }
    return {}
