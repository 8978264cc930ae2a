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

For one tensor of inputs, the fast path takes the layers of :mod:`.contractions`; the rest goes
through the generic per-example ``vmap`` path, which is also the slow twin of the tests
(``fast=False``). A model called with keyword inputs (a Hugging Face model: ``vmap`` cannot run
it over its examples) takes the same layer contractions from ONE batched pass that also gives
the loss and the gradient, once the batch shows its examples uncoupled (:mod:`.contractions`,
with :mod:`.module_grads` for norms and embeddings); the parameters neither covers, and every
parameter of a batch that fails that check, go one example at a time with the loss and gradient
fused into the same pass (:mod:`.per_example`, the slow twin).
Memory: ``chunk_size`` (:mod:`.statistics`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten

from .._common.batches import Batch, ModelInputs
from .._common.checks import check_positive_int
from .._common.functional import FunctionalModel
from .contractions import covered_parameters, layer_ggn_diag
from .outputs import LossFn, flatten_example, output_curvature, rademacher
from .per_example import column_chunks, copies_at_once, per_example_pass
from .products import CurvatureProducts, hvp, prepare

__all__ = [
    "DiagonalPass",
    "diagonal_pass",
    "exact_fisher_columns",
    "fisher_diag",
    "fisher_diag_mc",
    "hutchinson_diag",
    "warn_exact_fisher_cost",
]

Params = dict[str, Tensor]

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


def _sum_squared_per_example_vjps(
    fmodel: FunctionalModel,
    params: Params,
    inputs: Tensor,
    cotangents: Tensor,
    chunk_size: int | None,
    fixed: Params | None = None,
) -> Params:
    r""":math:`\sum_n \sum_r (J_n^\top c_{nr})^2` for output cotangents ``(N, O, R)``.

    Each example's Jacobian is pulled back along its ``R`` columns, squared and summed, with
    examples and columns vmapped together: at most :func:`~.per_example.copies_at_once`
    (example, column) pairs, i.e. that many parameter-sized pull-backs, exist at once.
    ``fixed`` tensors of ``fmodel``'s explicit parameters are held constant (the layers a fast
    path already covered).
    """
    n, _, columns = cotangents.shape
    fixed = fixed or {}
    copies = copies_at_once(params, chunk_size)
    at_once = min(columns, copies)
    examples_at_once = max(1, copies // at_once)

    def one_example(x: Tensor, cots: Tensor) -> Params:
        def output(p: Params) -> Tensor:
            return flatten_example(fmodel({**fixed, **p}, x.unsqueeze(0)))

        return _squared_pullbacks(output, params, column_chunks(cots, at_once))

    total = {k: torch.zeros_like(p) for k, p in params.items()}
    try:
        for start in range(0, n, examples_at_once):
            stop = min(n, start + examples_at_once)
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


#: Gradients per pass an exact Fisher/GGN diagonal may cost: above it, the exact diagonal is
#: announced with its alternative, and ``Statistic("fisher_auto")`` is estimated by Monte Carlo.
EXACT_FISHER_BUDGET = 100
_WARNED_COST: set[tuple[str, int]] = set()
_DEFAULT_ALTERNATIVE = "Statistic('fisher_mc', samples=1)"


def exact_fisher_columns(model: nn.Module, params: Mapping[str, Tensor], batch: Batch) -> int:
    r""":math:`R`, the output entries of one example: the exact diagonal's cost in gradients.

    The exact diagonal pulls back every column of :math:`S_n`, one per output entry of the
    example (:math:`R = T \cdot V` for a language model's logits), so it costs about
    :math:`R` gradients per pass; ``fisher_mc`` costs one per sample. One forward pass of the
    batch's first example, without a graph.
    """
    first = batch.inputs[:1] if isinstance(batch.inputs, Tensor) else batch.inputs.rows(0, 1)
    with torch.no_grad():
        outputs = FunctionalModel(model, params)(params, first)
    leaves = [leaf for leaf in tree_flatten(outputs)[0] if isinstance(leaf, Tensor)]
    return sum(leaf.numel() for leaf in leaves)


def warn_exact_fisher_cost(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Batch,
    alternative: str | None = None,
) -> None:
    r"""Warn before an exact Fisher that costs more than ``EXACT_FISHER_BUDGET`` gradients.

    The parameters no fast path covers need one backward pass per output entry of every
    example (:func:`exact_fisher_columns`). ``alternative`` names what to use instead (the
    caller's criterion with the Monte-Carlo Fisher; default: the statistic itself).
    """
    covered = covered_parameters(model, params, batch.inputs)
    if set(params) <= covered:
        return
    columns = exact_fisher_columns(model, params, batch)
    key = (type(model).__name__, columns)
    if columns > EXACT_FISHER_BUDGET and key not in _WARNED_COST:
        _WARNED_COST.add(key)  # once per model class and output size: not at every stage
        warnings.warn(
            f"the exact Fisher/GGN diagonal costs about {columns} gradients per pass here (one "
            f"backward pass per output entry of each example, {columns} entries: every token "
            f"times every class); {alternative or _DEFAULT_ALTERNATIVE} estimates the same "
            "diagonal without bias at about one gradient per sampled label",
            RuntimeWarning,
            stacklevel=3,
        )


class DiagonalPass(NamedTuple):
    """A Fisher/GGN diagonal, with the batch loss and gradient when the same pass gave them.

    ``loss`` and ``grad`` are ``None`` unless one forward pass per example computed them with
    the diagonal (keyword inputs, :mod:`.per_example`), sparing the statistics pass a separate
    gradient pass.
    """

    loss: Tensor | None
    grad: Params | None
    diagonal: Params


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
        chunk_size: the memory bound of every statistic: at most this many parameter-sized
            per-example (per output column) pull-backs exist at once (default: as many as fit
            in ``2**24`` numbers).
        fast: use the per-layer squared contractions where they are proven exact (``False``:
            always the generic per-example path, the slow twin used in tests).
    """
    loss_fn, batch = prepare(model, loss_fn, batch)
    return diagonal_pass(model, dict(params), batch, loss_fn, None, 0, chunk_size, fast).diagonal


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
    r"""Monte-Carlo estimate of :func:`fisher_diag` from ``samples`` sampled outputs per unit.

    .. math:: \hat D = \sum_n \sum_{j=1}^k (J_n^\top z_{nj})^2,
       \quad \mathbb E\Big[\sum_j z_{nj} z_{nj}^\top\Big] = M_n

    Unbiased; for cross-entropy :math:`z = \sqrt{c/k}\,(e_y - p)`, :math:`y\sim p`, one label
    per unit (per token for a language model; Laurent et al. 2020 use k = 10 on ImageNet).

    Raises:
        NonFiniteError: the model outputs are NaN or infinite (no label can be sampled).
    """
    loss_fn, batch = prepare(model, loss_fn, batch)
    check_positive_int("samples", samples)
    return diagonal_pass(
        model, dict(params), batch, loss_fn, generator, samples, chunk_size, fast
    ).diagonal


def diagonal_pass(
    model: nn.Module,
    params: Params,
    batch: tuple[Any, Tensor],
    loss_fn: LossFn,
    generator: torch.Generator | None,
    samples: int,
    chunk_size: int | None,
    fast: bool = True,
    *,
    with_gradient: bool = False,
) -> DiagonalPass:
    """Exact (``samples == 0``) or Monte-Carlo GGN diagonal of the batch loss.

    ``with_gradient``: also the batch loss and gradient where the pass has the graph for them
    (a statistics pass then needs no separate gradient pass); they may be given without it.

    Keyword inputs (and nested tuples), with ``fast``: the covered layers from one batched pass
    with the loss and gradient (:func:`_keyword_layers_pass`); otherwise, and for the other
    parameters, one example at a time, each a batch of one, with the loss and gradient from the
    same graphs (:mod:`.per_example`). For one tensor of inputs, with
    ``fast``, covered layers get their diagonal from squared contractions of one batched
    backward pass (:func:`~.contractions.layer_ggn_diag`); whatever it does not cover goes
    through the generic per-example ``vmap`` path, its slow twin, with the SAME cotangents.
    """
    inputs, targets = batch
    fmodel = FunctionalModel(model, params)
    width = copies_at_once(params, chunk_size)
    if isinstance(inputs, ModelInputs):
        if fast:
            batched = _keyword_layers_pass(
                model, params, batch, loss_fn, generator, samples, chunk_size, with_gradient
            )
            if batched is not None:
                return batched
        fused = per_example_pass(
            fmodel, params, {}, inputs, targets, loss_fn,
            samples=samples, generator=generator, width=width,
        )  # fmt: skip
        return DiagonalPass(fused.loss, fused.grad, fused.squares)

    def cotangents_of(outputs: Any) -> Tensor:
        return _columns(loss_fn, outputs, targets, samples, generator)

    total: Params = {}
    cotangents = loss = grad = None
    if fast:
        drawn: list[Tensor] = []  # the one draw of cotangents, reused by the generic remainder

        def remember(outputs: Tensor) -> Tensor:
            drawn.append(cotangents_of(outputs))
            return drawn[0]

        layers = layer_ggn_diag(
            model, params, inputs, remember, _elements(params, chunk_size),
            loss_of=(lambda outputs: loss_fn(outputs, targets)) if with_gradient else None,
        )  # fmt: skip
        total, loss, grad = dict(layers.sums), layers.loss, layers.grad
        cotangents = drawn[0] if drawn else None
    rest = {k: v for k, v in params.items() if k not in total}
    fixed = {k: v for k, v in params.items() if k in total}
    if rest and cotangents is None:
        with torch.no_grad():
            outputs = fmodel(params, inputs)
        if samples == 0 and not _dense_columns_fit(outputs):
            # A language model's (N, T·V, T·V) square roots do not fit in memory: one example
            # at a time, its columns block by block.
            blockwise = per_example_pass(
                fmodel, rest, fixed, inputs, targets, loss_fn,
                samples=0, generator=None, width=width,
            )  # fmt: skip
            total.update(blockwise.squares)
            return DiagonalPass(loss, grad, {k: total[k] for k in params})
        cotangents = cotangents_of(outputs)
    if rest:
        assert cotangents is not None
        total.update(
            _sum_squared_per_example_vjps(fmodel, rest, inputs, cotangents, chunk_size, fixed)
        )
    return DiagonalPass(loss, grad, {k: total[k] for k in params})


def _keyword_layers_pass(
    model: nn.Module,
    params: Params,
    batch: tuple[Any, Tensor],
    loss_fn: LossFn,
    generator: torch.Generator | None,
    samples: int,
    chunk_size: int | None,
    with_gradient: bool,
) -> DiagonalPass | None:
    """Keyword inputs: covered layers from ONE batched pass (with the loss and gradient).

    The layers :func:`~.contractions.layer_ggn_diag` covers (checked on the batch: an example
    run alone matches its rows) get their squared sums from one batched forward pass, the
    gradient's backward pass and one batched backward pass of the cotangent columns; the
    parameters it leaves go one example at a time (:mod:`.per_example`) with the SAME columns.
    ``None`` when no layer is covered, or when the exact columns would not fit in memory (a
    language model's ``(N, T·V, T·V)``): the caller's one-example-at-a-time path computes
    everything.
    """
    inputs, targets = batch
    drawn: list[Tensor] = []

    def remember(outputs: Tensor) -> Tensor | None:
        if samples == 0 and not _dense_columns_fit(outputs):
            return None  # never formed: the slow path builds them block by block
        drawn.append(_columns(loss_fn, outputs, targets, samples, generator))
        return drawn[0]

    layers = layer_ggn_diag(
        model, params, inputs, remember, _elements(params, chunk_size), examples=len(targets),
        loss_of=(lambda outputs: loss_fn(outputs, targets)) if with_gradient else None,
    )  # fmt: skip
    if not layers.sums:
        return None
    total = dict(layers.sums)
    rest = {k: v for k, v in params.items() if k not in total}
    if rest:
        fixed = {k: v for k, v in params.items() if k in total}
        remainder = per_example_pass(
            FunctionalModel(model, params), rest, fixed, inputs, targets, loss_fn,
            samples=samples, generator=None, width=copies_at_once(params, chunk_size),
            columns=drawn[0] if samples else None,
        )  # fmt: skip
        total.update(remainder.squares)
    return DiagonalPass(layers.loss, layers.grad, {k: total[k] for k in params})


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


def _columns(
    loss_fn: LossFn, outputs: Any, targets: Tensor, samples: int, generator: torch.Generator | None
) -> Tensor:
    """The exact square-root (``samples == 0``) or sampled output columns ``(N, O, R)``."""
    space = output_curvature(loss_fn, outputs, targets)
    return space.sqrt_columns() if samples == 0 else space.sample_columns(samples, generator)


def _elements(params: Mapping[str, Tensor], chunk_size: int | None) -> int | None:
    """The layer contractions' memory bound: ``chunk_size`` parameter-sized copies."""
    return None if chunk_size is None else chunk_size * sum(p.numel() for p in params.values())


def _dense_columns_fit(outputs: Any) -> bool:
    """Whether the ``(N, O, O)`` square-root columns of tensor outputs stay under the bound."""
    if not isinstance(outputs, Tensor) or outputs.dim() == 0:
        return True
    per_example = outputs[0].numel()
    return len(outputs) * per_example * per_example <= _DENSE_COLUMN_ELEMENTS
