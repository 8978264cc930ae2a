r"""Pruned linear layers as sparse layers: CSR/BSR (:func:`to_sparse`) or 2:4 semi-structured.

Both converters return a converted copy and leave the model they are given untouched. They read
the pattern from the weights' exact zeros, which is where :class:`~lossprune.Pruner` puts its
masks. The converted layers are for inference: their weights do not train.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from torch import Tensor, nn

from .._common.checks import check_fraction
from ._linear import (
    SparseLinear,
    check_blocksize,
    check_convertible,
    check_dense_weight,
    check_model,
    check_sparse_support,
    is_linear,
    linear_weights,
)
from ._semi_structured import check_semi_structured_support, semi_structured_linear

__all__ = ["to_sparse", "to_semi_structured"]

LAYOUTS = ("csr", "bsr")


def to_sparse(
    model: nn.Module,
    layout: str = "csr",
    *,
    blocksize: tuple[int, int] | None = None,
    min_sparsity: float = 0.5,
    layers: Iterable[str] | str | None = None,
) -> nn.Module:
    r"""A copy of ``model`` whose pruned linear layers hold sparse CSR or BSR weights.

    Each converted layer becomes a :class:`~lossprune.sparse.SparseLinear` computing the same
    :math:`y = x W^\top + b` from a ``torch.sparse_csr`` (``layout="csr"``: the non-zero
    entries) or ``torch.sparse_bsr`` (``layout="bsr"``: every ``blocksize`` tile that holds a
    non-zero) copy of :math:`W`. Only the order of summation changes, so outputs agree with the
    dense model to rounding (``1e-12`` relative in float64, tested). ``model`` itself is not
    modified; the copy keeps its module names, so ``state_dict()`` keys stay ``"<layer>.weight"``
    and ``"<layer>.bias"`` (the weight now sparse, always ``out × in``).

    Which layers: by default every :class:`torch.nn.Linear` and Hugging Face ``Conv1D`` (exact
    types: subclasses such as :class:`~torch.nn.MultiheadAttention`'s ``out_proj`` stay dense)
    whose weight has at least ``min_sparsity`` exact zeros; or exactly the modules named in
    ``layers``. Whether the result is faster depends on sparsity, shapes, batch and machine:
    measure it with :func:`~lossprune.sparse.speed_report`.

    Saving: safetensors (``save_pretrained``) stores no sparse tensor. Save the pruned dense
    model and call ``to_sparse`` again after loading it (the zeros are the pattern, so the
    export is identical), or ``torch.save`` the exported module itself (load it with
    ``weights_only=False``).

    Args:
        model: The network (a single :class:`~torch.nn.Linear` works too).
        layout: ``"csr"`` or ``"bsr"``.
        blocksize: ``(rows, columns)`` of a BSR tile, dividing the weight's ``(out, in)``;
            required for ``"bsr"``, refused for ``"csr"``.
        min_sparsity: Fraction of zero weights, in ``[0, 1)``, from which a layer is converted
            when ``layers`` is ``None``.
        layers: Qualified module names (``"encoder.0.fc1"``) to convert, whatever their
            sparsity; ``None`` chooses by ``min_sparsity``.

    Returns:
        The converted copy.

    Raises:
        TypeError: ``model`` is not a module, a wrong argument type, or a weight dtype the
            sparse kernels lack or would compute less accurately (float32 and float64 only).
        ValueError: An unknown layout, a bad ``blocksize``, a name in ``layers`` that is not a
            Linear or Conv1D of the model (a parametrized Linear is not), a layer with hooks (a
            new module would drop them), a blocksize not dividing a weight, or nothing to
            convert. Raised before anything is copied.
    """
    check_model(model)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    blocksize = check_blocksize(layout, blocksize)
    min_sparsity = check_fraction("min_sparsity", min_sparsity)
    chosen = _chosen_layers(
        model,
        layers,
        lambda weight: _sparsity(weight) >= min_sparsity,
        f"sparsity >= {min_sparsity}",
    )
    for name, module in chosen.items():
        check_convertible(name, module)
        check_sparse_support(name, linear_weights(module).weight, layout, blocksize)
    return _converted_copy(
        model, chosen, lambda weights: SparseLinear.from_dense(weights, layout, blocksize)
    )


def to_semi_structured(model: nn.Module, *, layers: Iterable[str] | str | None = None) -> nn.Module:
    r"""A copy of ``model`` whose 2:4-sparse linear layers use sparse tensor cores.

    Each converted layer becomes a :class:`torch.nn.Linear` whose weight is
    :func:`torch.sparse.to_sparse_semi_structured` of the original :math:`W` (``out × in``;
    a Hugging Face ``Conv1D`` is converted through its :math:`W^\top`). The product
    :math:`x W^\top + b` then runs on cuSPARSELt (or CUTLASS) 2:4 kernels: in every group of 4
    consecutive weights along the input dimension at most 2 are non-zero, and only those are
    stored and multiplied, so the outputs equal the dense ones up to rounding. The weights are
    frozen (``requires_grad=False``): this is an inference export. ``model`` is not modified.

    Which layers: by default every :class:`torch.nn.Linear` and ``Conv1D`` (exact types) with at
    least one zero weight (a pruned layer: trained weights are not exactly zero otherwise), so
    that a pruned layer that lost its 2:4 pattern is refused rather than left dense; or exactly
    ``layers``. Each of them must be 2:4, float16 or bfloat16, of a shape the kernels accept,
    and on a CUDA device of compute capability 8.0 or newer. Every check runs before anything is
    copied, the device check last, so the other refusals are the same on a CPU.

    Args:
        model: The network.
        layers: Qualified module names to convert; ``None`` chooses as above.

    Returns:
        The converted copy.

    Raises:
        TypeError: ``model`` is not a module, or a weight is not float16/bfloat16.
        ValueError: A name in ``layers`` that is not a Linear or Conv1D of the model, hooks on a
            layer, an input dimension not divisible by 4, a weight that is not 2:4 along the
            input dimension, a shape the kernels refuse, a weight not on a CUDA device of
            compute capability >= 8.0, or nothing to convert.
    """
    check_model(model)
    chosen = _chosen_layers(model, layers, lambda weight: _sparsity(weight) > 0, "a zero weight")
    for name, module in chosen.items():
        check_convertible(name, module)
        check_semi_structured_support(name, linear_weights(module).weight)
    return _converted_copy(model, chosen, semi_structured_linear)


# --------------------------------------------------------------------------------------------
# Arguments, choosing and replacing layers
# --------------------------------------------------------------------------------------------


def _chosen_layers(
    model: nn.Module,
    layers: Iterable[str] | str | None,
    qualifies: Callable[[Tensor], bool],
    requirement: str,
) -> dict[str, nn.Module]:
    """Name to module of the layers to convert: ``layers``, or the linear ones that qualify."""
    if layers is None:
        linear = {name: module for name, module in model.named_modules() if is_linear(module)}
        for name, module in linear.items():
            check_dense_weight(name, module)  # before its zeros are counted
        found = {name: module for name, module in linear.items() if qualifies(module.weight)}
        if not found:
            raise ValueError(
                f"nothing to convert: no nn.Linear or Conv1D weight of the model has "
                f"{requirement} (pass layers=[...] to name layers explicitly)"
            )
        return found
    names: list = []
    if isinstance(layers, str):
        names = [layers]
    elif isinstance(layers, Iterable):
        names = list(layers)
    if not names or not all(isinstance(name, str) for name in names):
        raise TypeError("layers must be None, a module name or a non-empty list of module names")
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in names:
        if name not in modules:
            raise ValueError(f"layers: {name!r} is not a module of the model")
        if not is_linear(modules[name]):
            raise ValueError(
                f"layers: {name!r} is a {type(modules[name]).__name__}, not an nn.Linear (or "
                "a transformers subclass computing F.linear) or a Hugging Face Conv1D"
            )
    return {name: modules[name] for name in names}


def _sparsity(weight: Tensor) -> float:
    return 1.0 - int(weight.count_nonzero()) / max(1, weight.numel())


def _converted_copy(model: nn.Module, chosen: dict[str, nn.Module], convert) -> nn.Module:
    """A deep copy of ``model`` in which each chosen layer is replaced by ``convert(weights)``."""
    duplicate = copy.deepcopy(model)
    converted: set[int] = set()
    for name in chosen:
        old = duplicate.get_submodule(name)
        if id(old) in converted:  # a shared layer, named twice in `layers`: replaced already
            continue
        new = convert(linear_weights(old))
        converted.add(id(new))
        if name == "":  # the model is itself the layer
            return new
        # Every parent that holds this module object (a shared layer has several) gets the new one.
        for parent in duplicate.modules():
            for key, child in parent._modules.items():
                if child is old:
                    parent._modules[key] = new
    return duplicate
