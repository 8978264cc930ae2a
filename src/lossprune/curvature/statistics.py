r"""Statistics over a whole dataset in one pass, and the ONE dataset-mean loop behind them.

Every quantity the library sums over data — the statistics of :func:`compute_statistics`, the
products behind the stage report (:mod:`lossprune.pruning._diagnostics`) and the compensation
solver — is the mean of the loss over ALL the units of the data, computed by :func:`dataset_mean`:
iterate over the batches, weight the per-batch means by the loss's normaliser :math:`Z_b`
(:func:`~.outputs.loss_normaliser`: the non-ignored targets, or their class weights),
accumulate in the statistics dtype (at least float32), all-reduce over the ranks of an
initialised :mod:`torch.distributed` group, and divide:

.. math:: \bar s = \frac{\sum_b Z_b\, s_b}{\sum_b Z_b},

which for the loss, its gradient and every curvature statistic (all linear in the loss) is
exactly the statistic of the full-data mean loss.

Memory: ONE option, ``chunk_size``, bounds every statistic the same way: at most ``chunk_size``
parameter-sized intermediate copies exist at once beyond one forward and backward pass —
per-example (and per output column) pull-backs of the Fisher diagonals, tangent vectors of
curvature-vector products (Hutchinson's probes, :math:`Hg`, the compensation's products), and,
on the per-layer fast path, ``chunk_size`` times the parameters' count of back-propagated
columns and per-example weight gradients. Peak memory grows linearly in it and the numbers do
not change. Default (``None``): per-example copies as many as fit in ``2**24`` numbers, every
vector of a product at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._common.batches import Batch, ModelInputs, counted_positions
from .._common.checks import check_positive_int
from .._common.data import is_single_batch, iter_batches
from .._common.distributed import all_reduce_floats, all_reduce_sum
from .._common.functional import FunctionalModel, statistics_dtype
from .._common.model_loss import CROSS_ENTROPY_TASKS, model_loss_in, resolve_loss
from .._common.probe import probe_first_batch
from .diagonals import (
    EXACT_FISHER_BUDGET,
    diagonal_pass,
    exact_fisher_columns,
    hutchinson,
    warn_exact_fisher_cost,
)
from .errors import check_finite
from .inputs import InputStatistics
from .outputs import (
    LossFn,
    check_mean_over_examples,
    check_scalar_loss,
    check_tensor_outputs,
    loss_normaliser,
)
from .products import check_inputs, hvp, loss_and_grad

__all__ = ["DatasetMean", "Statistic", "Statistics", "compute_statistics", "dataset_mean"]

Params = dict[str, Tensor]
Values = dict[Hashable, Tensor | Mapping[str, Tensor]]


class DatasetMean(NamedTuple):
    r"""Weighted means over a dataset (all ranks together).

    Attributes:
        means: every accumulated value, divided by the total weight.
        weight: :math:`\\sum_b Z_b`, the number (or class weight) of the loss's units.
        examples: number of examples.
    """

    means: Values
    weight: float
    examples: int


def dataset_mean(
    data: Any,
    loss_fn: LossFn,
    batch_values: Callable[[tuple[Any, Tensor]], Values],
    *,
    device: torch.device,
    dtype: torch.dtype,
    progress: str | None = None,
    every_batch: Callable[[tuple[Any, Tensor]], None] | None = None,
) -> DatasetMean:
    """The ONE dataset-mean loop (module docstring).

    ``batch_values(batch)`` returns per-batch means (tensors or dicts of tensors); batches whose
    loss has no unit (every target ignored) are skipped. ``every_batch(batch)``, when given,
    runs on EVERY batch first, those included (the input statistics of
    :class:`~.inputs.InputStatistics` count positions, not loss units). ``progress``: the
    description of a per-batch tqdm progress bar (``None``: no bar).

    Raises:
        ValueError: no batch has a unit.
    """
    sums: dict[Hashable, Any] = {}
    weight = 0.0
    examples = 0
    total = 1 if is_single_batch(data) else _length(data)
    batches = tqdm(
        iter_batches(data, device, loss_fn),
        desc=progress,
        total=total,
        unit="batch",
        disable=progress is None,
        leave=False,
    )
    for batch in batches:
        if every_batch is not None:
            every_batch(batch)
        z = float(loss_normaliser(loss_fn, batch[1]))
        examples += len(batch[1])
        if z == 0.0:
            continue
        for key, value in batch_values(batch).items():
            if isinstance(value, Mapping):
                total = sums.setdefault(key, {k: _zeros(v, dtype) for k, v in value.items()})
                for k, v in value.items():
                    total[k].add_(v.to(dtype), alpha=z)
            else:
                sums.setdefault(key, _zeros(value, dtype)).add_(value.to(dtype), alpha=z)
        weight += z
    all_reduce_sum(*sums.values())
    weight, total_examples = all_reduce_floats([weight, float(examples)], device)
    if weight == 0.0:
        raise ValueError("data has no unit the loss averages over: every target is ignored")
    means: Values = {
        key: {k: v / weight for k, v in s.items()} if isinstance(s, Mapping) else s / weight
        for key, s in sums.items()
    }
    return DatasetMean(means, weight, round(total_examples))


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:  # an iterable without a length (an IterableDataset loader)
        return None


def _zeros(like: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(like.shape, dtype=dtype, device=like.device)


@dataclass(frozen=True)
class Statistic:
    r"""One statistic a criterion needs, with its options (hashable, so requests merge).

    ``kind`` is one of:

    * ``"grad"`` — :math:`g`;
    * ``"fisher"`` — exact GGN/Fisher diagonal;
    * ``"fisher_mc"`` — Monte-Carlo Fisher diagonal with ``samples`` labels per example (per
      token for a language model's logits, each token's label drawn independently);
    * ``"fisher_auto"`` — ``"fisher"`` where the exact diagonal costs at most
      :data:`~.diagonals.EXACT_FISHER_BUDGET` (100) gradients per pass (one per output entry of
      an example: a classifier with up to 100 classes), else ``"fisher_mc"`` with ``samples``
      labels per unit (a language model: the exact one costs T·V gradients per sequence).
      Decided on the first batch, announced once, recorded in :attr:`Statistics.resolved`;
    * ``"hutchinson"`` — Hutchinson Hessian diagonal with ``samples`` probes per batch;
    * ``"hessian_grad"`` — :math:`Hg` with :math:`g` the gradient over all the data (GraSP);
    * ``"input_sq_norms"`` — :math:`\|X_j\|_2^2 / n`, the MEAN over the :math:`n` counted rows
      of each weight matrix's inputs (every example and counted position, every module that
      uses the weight; :mod:`.inputs`) of input feature :math:`j` squared (Wanda), shaped to
      broadcast against the parameter. One extra forward pass per batch in the same loop.
    """

    kind: str
    samples: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown statistic {self.kind!r}; expected one of {sorted(_KINDS)}")
        if self.kind in ("fisher_mc", "fisher_auto", "hutchinson"):
            check_positive_int("samples", self.samples)

    def __str__(self) -> str:
        return self.kind if self.kind in _NO_SAMPLES else f"{self.kind}(samples={self.samples})"


_NO_SAMPLES = frozenset({"grad", "fisher", "hessian_grad", "input_sq_norms"})
_KINDS = _NO_SAMPLES | {"fisher_mc", "fisher_auto", "hutchinson"}


@dataclass
class Statistics:
    r"""Means over the scoring data (over the units the loss averages, module docstring).

    Attributes:
        loss: mean loss.
        grad: mean gradient :math:`g`.
        examples: number of examples (all ranks together).
        values: every requested :class:`Statistic`, keyed by it.
        units: :math:`\\sum_b Z_b`, the units (or their class weights) the means are over.
        resolved: the statistic each request was computed as: itself, or for ``"fisher_auto"``
            the exact ``"fisher"`` or ``"fisher_mc"`` it chose.
    """

    loss: float
    grad: Params
    examples: int
    values: dict[Statistic, Params] = field(default_factory=dict)
    units: float = 0.0
    resolved: dict[Statistic, Statistic] = field(default_factory=dict)

    def __getitem__(self, request: Statistic) -> Params:
        """The value of ``request``.

        Raises:
            ValueError: ``request`` was not among the requests these statistics computed.
        """
        if request.kind == "grad":
            return self.grad
        if request not in self.values:
            raise ValueError(
                f"statistic {request} was not requested; these statistics hold "
                f"{sorted(map(str, self.values)) or 'only the loss and the gradient'}"
            )
        return self.values[request]


def _ordered(requests: Iterable[Statistic]) -> list[Statistic]:
    """Requests without duplicates, in a fixed order.

    A seeded generator is then consumed the same way in every process (the order of a set of
    requests depends on PYTHONHASHSEED).
    """
    return sorted(set(requests), key=lambda r: (r.kind, r.samples))


def compute_statistics(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Any,
    loss_fn: LossFn | None,
    requests: Iterable[Statistic] = (),
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    fisher_alternative: str | None = None,
) -> Statistics:
    """Loss, gradient and every requested statistic over all of ``data`` (:func:`dataset_mean`).

    One pass over the data computes the loss, the gradient and all diagonals of each batch
    together. :math:`Hg` (``"hessian_grad"``) needs the gradient of the WHOLE data first, so it
    adds a second pass. Under an initialised :mod:`torch.distributed` process group, sums and
    weights are all-reduced so that every rank gets identical statistics.

    Args:
        model: the module (never modified).
        params: tensors to differentiate with respect to, by qualified name.
        data: a batch or a re-iterable of batches (a DataLoader); a batch is ``(inputs,
            targets)``, ``((input, ...), targets)`` or a mapping of keyword inputs with
            ``labels`` (:mod:`lossprune._common.batches`).
        loss_fn: the batch loss, a mean (:mod:`.outputs`); ``None`` for a Hugging Face model
            (the model's own loss: logits, causal-LM shift, cross-entropy, ``-100`` ignored).
        requests: statistics to compute besides loss and gradient.
        generator: random source for Monte-Carlo labels and Hutchinson probes.
        chunk_size: the memory bound of every statistic (module docstring): at most this many
            parameter-sized per-example pull-backs or tangent vectors exist at once.
        progress: show a per-batch progress bar (tqdm) for each pass over the data.
        fisher_alternative: what the warning before an expensive exact Fisher suggests instead
            (the caller's criterion with the Monte-Carlo Fisher).

    Raises:
        NonFiniteError: a batch loss, gradient or a statistic is NaN or infinite.
    """
    loss_fn = resolve_loss(model, loss_fn)
    check_inputs(model, loss_fn)
    params = {k: v.detach() for k, v in params.items()}
    ordered = _ordered(requests)
    first_pass = [r for r in ordered if r.kind not in ("grad", "hessian_grad")]
    device = next(iter(params.values())).device
    dtype = statistics_dtype(params)

    own = model_loss_in(loss_fn)
    resolved = {request: request for request in ordered}

    def batch_values(batch: tuple[Any, Tensor]) -> Values:
        if own is not None and own.task in CROSS_ENTROPY_TASKS:  # every batch's labels, too
            own.check_label_range(batch[1], first_outputs.shape[1])
        values: Values = {}
        loss = grads = None
        for key in first_pass:
            request = resolved[key]
            if request.kind == "hutchinson":
                loss, grads, values[key] = hutchinson(
                    model, params, batch, loss_fn, request.samples, generator, chunk_size
                )
            elif request.kind in ("fisher", "fisher_mc"):
                diagonal = diagonal_pass(
                    model, params, batch, loss_fn, generator, request.samples, chunk_size,
                    with_gradient=loss is None,
                )  # fmt: skip
                values[key] = diagonal.diagonal
                if loss is None and diagonal.grad is not None:  # the same graphs gave them
                    loss, grads = diagonal.loss, diagonal.grad
            elif request.kind == "input_sq_norms":
                continue  # every batch, in every_batch below
        if loss is None or grads is None:
            loss, grads = loss_and_grad(model, params, batch, loss_fn)
        check_finite("loss", loss)
        check_finite("gradient", grads)
        values["loss"], values["grad"] = loss, grads
        return values

    # One forward pass of the first batch: no random draw, the model's own loss checked.
    first, first_outputs, probed_targets = probe_first_batch(model, loss_fn, data, device)
    if not isinstance(first.inputs, Tensor):  # keyword inputs: a model that may return a pytree
        check_tensor_outputs(loss_fn, lambda: first_outputs)
    check_scalar_loss(loss_fn, first_outputs, probed_targets)
    check_mean_over_examples(loss_fn, lambda: (first_outputs, probed_targets))
    for request in first_pass:
        if request.kind == "fisher_auto":
            resolved[request] = _resolve_auto(model, params, first, request)
    if any(resolved[r].kind == "fisher" for r in first_pass):
        warn_exact_fisher_cost(model, params, first, fisher_alternative)
    inputs = None
    if any(r.kind == "input_sq_norms" for r in first_pass):
        # Positions, not loss units: every batch counts its counted rows, and a weight shared by
        # several modules sees the inputs of all of them (:mod:`.inputs`).
        inputs = InputStatistics(model, params, dtype=dtype)
    forward = FunctionalModel(model, params)

    def record_inputs(batch: tuple[Any, Tensor]) -> None:
        assert inputs is not None
        model_inputs = batch[0]
        counted = None
        if isinstance(model_inputs, ModelInputs):
            counted = counted_positions(model_inputs.kwargs, model_inputs.labels)
        with inputs.recording(counted):
            forward(params, model_inputs)

    bar = "statistics" if progress else None
    result = dataset_mean(
        data, loss_fn, batch_values, device=device, dtype=dtype, progress=bar,
        every_batch=None if inputs is None else record_inputs,
    )  # fmt: skip
    means = result.means
    grad = _params(means["grad"])
    values = {r: _params(means[r]) for r in first_pass if r.kind != "input_sq_norms"}
    if inputs is not None:
        moments = inputs.means()
        values[Statistic("input_sq_norms")] = {k: m.sq_norms for k, m in moments.items()}
    if any(r.kind == "hessian_grad" for r in ordered):
        values[Statistic("hessian_grad")] = _hessian_grad(
            model, params, data, loss_fn, grad, device, dtype, chunk_size, progress
        )
    for request, value in values.items():
        check_finite(f"{request.kind} statistic", value)
    loss = means["loss"]
    assert isinstance(loss, Tensor)
    return Statistics(
        loss=float(loss),
        grad=grad,
        examples=result.examples,
        values=values,
        units=result.weight,
        resolved=resolved,
    )


_ANNOUNCED: set[tuple[str, int, int]] = set()


def _resolve_auto(model: nn.Module, params: Params, first: Batch, request: Statistic) -> Statistic:
    """The exact Fisher within :data:`~.diagonals.EXACT_FISHER_BUDGET`, else ``fisher_mc``.

    The Monte-Carlo choice is announced once per model class and output size.
    """
    columns = exact_fisher_columns(model, params, first)
    if columns <= EXACT_FISHER_BUDGET:
        return Statistic("fisher")
    key = (type(model).__name__, columns, request.samples)
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        warnings.warn(
            f"curvature 'auto': the exact Fisher would cost about {columns} gradients per pass "
            f"here (one per output entry of an example), above the budget of "
            f"{EXACT_FISHER_BUDGET}, so it is estimated by Monte Carlo with {request.samples} "
            "sampled label(s) per unit ('fisher_mc'); pass curvature='fisher' for the exact one",
            UserWarning,
            stacklevel=4,
        )
    return Statistic("fisher_mc", request.samples)


def _params(value: Tensor | Mapping[str, Tensor]) -> Params:
    assert isinstance(value, Mapping)
    return dict(value)


def _hessian_grad(
    model: nn.Module,
    params: Params,
    data: Any,
    loss_fn: LossFn,
    grad: Params,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int | None,
    progress: bool,
) -> Params:
    vectors = {k: g.to(params[k].dtype).unsqueeze(0) for k, g in grad.items()}

    def batch_values(batch: tuple[Any, Tensor]) -> Values:
        products = hvp(model, params, batch, loss_fn, vectors, chunk_size=chunk_size).products
        return {"hg": {k: v[0] for k, v in products.items()}}

    bar = "Hessian-gradient product" if progress else None
    return _params(
        dataset_mean(data, loss_fn, batch_values, device=device, dtype=dtype, progress=bar).means[
            "hg"
        ]
    )
