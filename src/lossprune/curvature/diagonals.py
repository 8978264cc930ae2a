r"""Curvature diagonals on one batch: exact and Monte-Carlo Gauss-Newton/Fisher, Hutchinson.

With :math:`S_n S_n^\top = M_n` the output-space curvature of the batch loss (:mod:`.outputs`,
mean and weights included):

* the exact GGN/Fisher diagonal :math:`\operatorname{diag}G = \sum_n\sum_r (J_n^\top S_n
  e_r)^2`; for softmax cross-entropy on one unit per example this is the Fisher of Laurent et
  al. (2020, Sec. 3), :math:`\frac1N \sum_n \sum_c p_{nc} (\partial \log p_c(x_n) /
  \partial\theta)^2`;
* its Monte-Carlo estimate from :math:`z_n` with :math:`\mathbb E[z_n z_n^\top] = M_n`, labels
  sampled from the model (Martens 2014);
* Hutchinson's estimate of the Hessian diagonal :math:`\mathbb E_z[z \odot Hz]` with Rademacher
  probes :math:`z` (Bekas et al. 2007).

The fast path takes the layers of :mod:`.contractions`; the rest goes through the generic
per-example ``vmap`` path, which is also the slow twin of the tests (``fast=False``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from .._common.batches import Batch, ModelInputs
from .._common.checks import check_positive_int
from .._common.functional import FunctionalModel
from .contractions import covered_parameters, layer_ggn_diag
from .outputs import LossFn, flatten_example, output_curvature, rademacher
from .products import CurvatureProducts, hvp, prepare

__all__ = ["fisher_diag", "fisher_diag_mc", "hutchinson_diag", "warn_exact_fisher_cost"]

Params = dict[str, Tensor]

# Bound on the per-example tensors materialised at once: examples x columns x parameters.
_PER_EXAMPLE_ELEMENTS = 1 << 24
# Above this many entries (examples x outputs x columns), the exact square-root columns of a
# tensor-input model are built block by block, one example at a time, like a keyword-input
# model's: a language model's (N, T·V, T·V) matrix does not fit in memory.
_DENSE_COLUMN_ELEMENTS = 1 << 26


def _squared_pullbacks(
    output: Callable[[Params], Tensor], params: Params, blocks: Iterable[Tensor]
) -> Params:
    r""":math:`\sum_r (J^\top c_r)^2` over the columns of ``blocks`` ``(O, b)``, one vjp each.

    ``J`` is the Jacobian of ``output`` (flattened outputs of one example) at ``params``; the
    columns of a block are pulled back together (vmapped).
    """
    pullback = vjp(output, params)[1]
    sums: Params = {}
    for block in blocks:
        per_column = vmap(lambda c: pullback(c)[0], in_dims=1)(block)
        for k, g in per_column.items():
            # Out of place: under vmap over examples the squares are batched and the running
            # sum must become batched with them (an in-place add into an unbatched zero tensor
            # raises, and the caller would fall back to one example at a time).
            square = (g * g).sum(0)
            sums[k] = square if k not in sums else sums[k] + square
    return {k: sums.get(k, torch.zeros_like(p)) for k, p in params.items()}


def _column_chunks(columns: Tensor, width: int) -> Iterator[Tensor]:
    for start in range(0, columns.shape[1], width):
        yield columns[:, start : start + width]


def _columns_per_call(params: Params) -> int:
    """Columns pulled back at once: at most ``2**24`` per-column numbers exist together."""
    return max(1, _PER_EXAMPLE_ELEMENTS // max(1, sum(p.numel() for p in params.values())))


def _sum_squared_per_example_vjps(
    fmodel: FunctionalModel,
    params: Params,
    inputs: Tensor,
    cotangents: Tensor,
    chunk_size: int | None,
    fixed: Params | None = None,
) -> Params:
    r""":math:`\sum_n \sum_r (J_n^\top c_{nr})^2` for output cotangents ``(N, O, R)``.

    Each example's Jacobian is pulled back along its ``R`` columns (vmapped over at most
    ``2**24 / P`` columns at a time), squared and summed. Examples are vmapped ``chunk_size``
    at a time so that at most ``chunk_size * R * P`` per-example numbers exist at once.
    ``fixed`` tensors of ``fmodel``'s explicit parameters are held constant (the layers a fast
    path already covered).
    """
    n, _, columns = cotangents.shape
    size = sum(p.numel() for p in params.values())
    fixed = fixed or {}
    at_once = _columns_per_call(params)
    if chunk_size is None:
        chunk_size = max(1, _PER_EXAMPLE_ELEMENTS // max(1, columns * size))

    def one_example(x: Tensor, cots: Tensor) -> Params:
        def output(p: Params) -> Tensor:
            return flatten_example(fmodel({**fixed, **p}, x.unsqueeze(0)))

        return _squared_pullbacks(output, params, _column_chunks(cots, at_once))

    total = {k: torch.zeros_like(p) for k, p in params.items()}
    try:
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            chunk = vmap(one_example)(inputs[start:stop], cotangents[start:stop])
            for k in total:
                total[k] += chunk[k].sum(0)
    except RuntimeError:
        # A module that cannot run under vmap over examples (e.g. an LSTM builds its initial
        # state from the unbatched size): the same sums, one example at a time.
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        for x, cots in zip(inputs, cotangents, strict=True):
            for k, v in one_example(x, cots).items():
                total[k] += v
    return total


def _sum_squared_vjps_one_by_one(
    fmodel: FunctionalModel,
    params: Params,
    inputs: ModelInputs | Tensor,
    examples: int,
    blocks_of: Callable[[int, int], Iterable[Tensor]],
    fixed: Params,
) -> Params:
    r""":math:`\sum_n \sum_r (J_n^\top c_{nr})^2`, one example at a time, columns in blocks.

    Used for keyword inputs (a Hugging Face model is not vmapped over examples) and for an exact
    diagonal whose dense columns would not fit in memory: ``blocks_of(n, width)`` yields
    example ``n``'s columns ``width`` at a time, so that the columns of a language model's
    (T·V)-dimensional output space never exist all at once.
    """
    at_once = _columns_per_call(params)
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for n in range(examples):
        row = inputs[n : n + 1] if isinstance(inputs, Tensor) else inputs.rows(n, n + 1)
        output = partial(_example_outputs, fmodel, fixed, row)
        for k, v in _squared_pullbacks(output, params, blocks_of(n, at_once)).items():
            total[k] += v
    return total


def _example_outputs(
    fmodel: FunctionalModel, fixed: Params, row: ModelInputs | Tensor, p: Params
) -> Tensor:
    """The flattened outputs of one example ``row`` (a batch of one) at ``p``."""
    return fmodel({**fixed, **p}, row).reshape(-1)


# Exact diagonals costing more than this many gradients are announced (with the alternative).
_EXPENSIVE_GRADIENTS = 100
_WARNED_COST: set[tuple[str, int]] = set()


def warn_exact_fisher_cost(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Batch,
) -> None:
    r"""Warn before an exact Fisher that costs more than about 100 gradients per pass.

    The parameters no fast path covers need one backward pass per output entry of every
    example (:math:`R` columns of :math:`S_n`, :math:`R = T \cdot V` for a language model's
    logits): about :math:`R` gradients. ``fisher_mc`` costs one gradient per sample.
    """
    covered = covered_parameters(model, params, batch.inputs)
    if set(params) <= covered:
        return
    with torch.no_grad():
        outputs = FunctionalModel(model, params)(params, batch.inputs)
    if not isinstance(outputs, Tensor) or outputs.dim() == 0:
        return
    columns = outputs[0].numel()
    key = (type(model).__name__, columns)
    if columns > _EXPENSIVE_GRADIENTS and key not in _WARNED_COST:
        _WARNED_COST.add(key)  # once per model class and output size: not at every stage
        warnings.warn(
            f"the exact Fisher/GGN diagonal costs about {columns} gradients per pass here (one "
            f"backward pass per output entry of each example, {columns} entries: every token "
            "times every class); Statistic('fisher_mc', samples=k) estimates the same diagonal "
            "without bias at about k gradients (e.g. OBD(curvature='fisher_mc'))",
            RuntimeWarning,
            stacklevel=3,
        )


def fisher_diag(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    loss_fn: LossFn | None,
    *,
    chunk_size: int | None = None,
    fast: bool = True,
) -> Params:
    r"""Exact diagonal of the GGN (= Fisher for softmax cross-entropy) of the batch loss.

    .. math:: D = \sum_n \sum_r (J_n^\top S_n e_r)^2, \qquad S_n S_n^\top = M_n

    Args:
        model: the network, called functionally (never modified); returns one tensor.
        params: tensors to differentiate with respect to, by qualified parameter name.
        batch: ``(inputs, targets)``, a nested tuple or a mapping
            (:mod:`lossprune._common.batches`).
        loss_fn: the batch loss ``loss_fn(outputs, targets)``, a mean (:mod:`.outputs`);
            ``None``: a Hugging Face model's own loss.
        chunk_size: examples processed at once (default: bounded by ``2**24`` per-example numbers).
        fast: use the per-layer squared contractions where they are proven exact (``False``:
            always the generic per-example path, the slow twin used in tests).
    """
    loss_fn, batch = prepare(model, loss_fn, batch)
    return _diag_from_cotangents(model, dict(params), batch, loss_fn, None, 0, chunk_size, fast)


def fisher_diag_mc(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    loss_fn: LossFn | None,
    *,
    samples: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    fast: bool = True,
) -> Params:
    r"""Monte-Carlo estimate of :func:`fisher_diag` from ``samples`` sampled outputs per example.

    .. math:: \hat D = \sum_n \sum_{j=1}^k (J_n^\top z_{nj})^2,
       \quad \mathbb E\Big[\sum_j z_{nj} z_{nj}^\top\Big] = M_n

    Unbiased; for cross-entropy :math:`z = \sqrt{c/k}\,(e_y - p)`, :math:`y\sim p` (Laurent et
    al. 2020 use k = 10 on ImageNet).

    Raises:
        NonFiniteError: the model outputs are NaN or infinite (no label can be sampled).
    """
    loss_fn, batch = prepare(model, loss_fn, batch)
    check_positive_int("samples", samples)
    return _diag_from_cotangents(
        model, dict(params), batch, loss_fn, generator, samples, chunk_size, fast
    )


def _diag_from_cotangents(
    model: nn.Module,
    params: Params,
    batch: tuple[Any, Tensor],
    loss_fn: LossFn,
    generator: torch.Generator | None,
    samples: int,
    chunk_size: int | None,
    fast: bool,
) -> Params:
    """Exact (``samples == 0``) or Monte-Carlo GGN diagonal of the batch loss.

    With ``fast``, covered layers get their diagonal from squared contractions of one batched
    backward pass (:func:`~.contractions.layer_ggn_diag`); whatever it does not cover goes
    through the generic per-example ``vmap`` path, its slow twin, with the SAME cotangents.
    """
    inputs, targets = batch
    fmodel = FunctionalModel(model, params)

    def cotangents_of(outputs: Any) -> Tensor:
        space = output_curvature(loss_fn, outputs, targets)
        if samples == 0:
            return space.sqrt_columns()
        return space.sample_columns(samples, generator)

    total: Params = {}
    cotangents = None
    if fast and isinstance(inputs, Tensor):  # keyword inputs have no layout proof
        drawn: list[Tensor] = []  # the one draw of cotangents, reused by the generic remainder

        def remember(outputs: Tensor) -> Tensor:
            drawn.append(cotangents_of(outputs))
            return drawn[0]

        total = layer_ggn_diag(model, params, inputs, remember).sums
        cotangents = drawn[0] if drawn else None
    rest = {k: v for k, v in params.items() if k not in total}
    # Keyword inputs are not vmapped over examples, and an exact diagonal whose dense columns
    # would not fit in memory (a language model's (N, T·V, T·V)) is built block by block: both
    # go one example at a time.
    outputs = None
    if rest and cotangents is None and samples == 0 and isinstance(inputs, Tensor):
        with torch.no_grad():
            outputs = fmodel(params, inputs)
        if _dense_columns_fit(outputs):
            cotangents = cotangents_of(outputs)
    blockwise = isinstance(inputs, ModelInputs) or (outputs is not None and cotangents is None)
    if rest and blockwise:
        with torch.no_grad():
            if outputs is None:
                outputs = fmodel(params, inputs)
            space = output_curvature(loss_fn, outputs, targets)
        fixed = {k: v for k, v in params.items() if k in total}
        blocks_of: Callable[[int, int], Iterable[Tensor]]
        if samples == 0:
            blocks_of = space.column_blocks
        else:
            drawn_columns = space.sample_columns(samples, generator)

            def blocks_of(n: int, width: int) -> Iterable[Tensor]:
                return _column_chunks(drawn_columns[n], width)

        total.update(
            _sum_squared_vjps_one_by_one(fmodel, rest, inputs, len(targets), blocks_of, fixed)
        )
    elif rest:
        if cotangents is None:
            with torch.no_grad():
                cotangents = cotangents_of(fmodel(params, inputs))
        fixed = {k: v for k, v in params.items() if k in total}
        total.update(
            _sum_squared_per_example_vjps(fmodel, rest, inputs, cotangents, chunk_size, fixed)
        )
    return {k: total[k] for k in params}


def hutchinson_diag(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    loss_fn: LossFn | None,
    *,
    probes: int = 100,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> Params:
    r"""Hutchinson's unbiased estimate of the Hessian diagonal (Bekas et al. 2007).

    .. math:: \widehat{\operatorname{diag} H} = \frac1k \sum_{j=1}^k z_j \odot H z_j,
       \quad z_j \in \{-1, 1\}^P \text{ uniform}

    The ``k`` products share one primal pass (:func:`~.products.hvp`).
    """
    loss_fn, batch = prepare(model, loss_fn, batch)
    check_positive_int("probes", probes)
    return hutchinson(model, dict(params), batch, loss_fn, probes, generator, chunk_size).products


def hutchinson(
    model: nn.Module,
    params: Params,
    batch: tuple[Any, Tensor],
    loss_fn: LossFn,
    probes: int,
    generator: torch.Generator | None,
    chunk_size: int | None,
) -> CurvatureProducts:
    """Loss, gradient and Hutchinson's estimate (in ``products``) from one fused pass."""
    z = {k: rademacher((probes, *p.shape), p, generator) for k, p in params.items()}
    loss, grads, hz = hvp(model, params, batch, loss_fn, z, chunk_size=chunk_size)
    return CurvatureProducts(loss, grads, {k: (z[k] * hz[k]).mean(0) for k in params})


def _dense_columns_fit(outputs: Any) -> bool:
    """Whether the ``(N, O, O)`` square-root columns of tensor outputs stay under the bound."""
    if not isinstance(outputs, Tensor) or outputs.dim() == 0:
        return True
    per_example = outputs[0].numel()
    return len(outputs) * per_example * per_example <= _DENSE_COLUMN_ELEMENTS
