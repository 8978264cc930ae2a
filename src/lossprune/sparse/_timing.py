r"""Dense against sparse, layer by layer: same numbers first, then time.

For every :class:`~torch.nn.Linear` (and Hugging Face ``Conv1D``) that runs when the model is
called on the example inputs, the layer's own input is captured, each sparse form of the layer
is built from the same weights, its output is compared with the dense layer's, and then dense
and sparse calls are timed in interleaved rounds (so that a change of machine load hits all of
them alike). Speed-ups are ratios of medians, and of minima (what to read on a busy machine).

Agreement is judged against the rounding error of a dot product (see :func:`speed_report`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._common.checks import check_positive_int
from ._linear import (
    TOLERANCE,
    LinearWeights,
    SparseLinear,
    check_blocksize,
    check_convertible,
    check_dense_weight,
    check_model,
    check_sparse_support,
    error_bound,
    is_linear,
    linear_weights,
)
from ._semi_structured import check_semi_structured_support, semi_structured_linear

__all__ = ["FormTiming", "LayerTiming", "SpeedReport", "speed_report", "TOLERANCE"]

FORMS = ("csr", "bsr", "semi_structured")


@dataclass(frozen=True)
class FormTiming:
    """One sparse form of one layer: its agreement with dense and its time, or why it was not run.

    Attributes:
        layout: ``"csr"``, ``"bsr"`` or ``"semi_structured"``.
        seconds: Median time of one call (``None`` when skipped).
        min_seconds: Fastest call.
        speedup: Dense median over this median; above 1 the sparse form is faster.
        speedup_of_minima: Dense minimum over this minimum.
        max_abs_error: Largest absolute difference from the dense output.
        agrees: Whether every output entry is within the tolerance of :func:`speed_report`.
        skipped: Why this form was not built for this layer (the converter's refusal), or None.
    """

    layout: str
    seconds: float | None = None
    min_seconds: float | None = None
    speedup: float | None = None
    speedup_of_minima: float | None = None
    max_abs_error: float | None = None
    agrees: bool | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class LayerTiming:
    """The dense time of one layer and its sparse forms.

    Attributes:
        name: Qualified module name.
        shape: ``(out, in)`` of the weight.
        rows: Input rows per call (the product of the input's leading dimensions).
        sparsity: Fraction of exact zeros in the weight.
        dtype: The weight's dtype.
        dense_seconds: Median time of one dense call (the module as the model runs it).
        dense_min_seconds: Fastest dense call.
        forms: One :class:`FormTiming` per requested layout, in the order requested.
    """

    name: str
    shape: tuple[int, int]
    rows: int
    sparsity: float
    dtype: torch.dtype
    dense_seconds: float
    dense_min_seconds: float
    forms: tuple[FormTiming, ...]


@dataclass(frozen=True)
class SpeedReport:
    """Per-layer timings of dense against sparse forms; ``print(report)`` shows a table.

    Attributes:
        device: Where the timings ran (``"cpu"``, ``"cuda:0"``).
        repeats: Timed calls per form and layer.
        layouts: The layouts compared with dense.
        layers: One :class:`LayerTiming` per linear layer, in the order the model ran them.
    """

    device: str
    repeats: int
    layouts: tuple[str, ...]
    layers: tuple[LayerTiming, ...]

    @property
    def all_agree(self) -> bool:
        """Whether every measured sparse form matched its dense layer within tolerance."""
        return all(form.agrees for layer in self.layers for form in _measured(layer))

    def faster(self, layout: str) -> tuple[str, ...]:
        """Names of the layers whose ``layout`` form had a median speed-up above 1."""
        return self._split(layout)[0]

    def slower(self, layout: str) -> tuple[str, ...]:
        """Names of the layers whose ``layout`` form was measured and was not faster."""
        return self._split(layout)[1]

    def linear_seconds(self, layout: str) -> tuple[float, float]:
        """Median seconds of all linear layers together: dense, and with ``layout`` where faster.

        The second number is what converting exactly :meth:`faster` layers (e.g.
        ``to_sparse(model, layers=report.faster("csr"))``) would cost, call for call.
        """
        faster = set(self.faster(layout))
        dense = sum(layer.dense_seconds for layer in self.layers)
        best = 0.0
        for layer in self.layers:
            form = next(form for form in layer.forms if form.layout == layout)
            seconds = form.seconds if layer.name in faster else None
            best += layer.dense_seconds if seconds is None else seconds
        return dense, best

    def _split(self, layout: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if layout not in self.layouts:
            raise ValueError(f"layout {layout!r} is not in this report's layouts {self.layouts}")
        faster: list[str] = []
        slower: list[str] = []
        for layer in self.layers:
            for form in _measured(layer):
                if form.layout == layout:
                    (faster if (form.speedup or 0.0) > 1 else slower).append(layer.name)
        return tuple(faster), tuple(slower)

    def __str__(self) -> str:
        header = ["layer", "out x in", "rows", "sparsity", "dense ms"] + [
            f"{layout} ms (speed-up)" for layout in self.layouts
        ]
        rows = [header]
        skipped: dict[tuple[str, str], list[str]] = {}  # (layout, reason) -> layers
        for layer in self.layers:
            row = [
                layer.name or "(model)",
                f"{layer.shape[0]}x{layer.shape[1]}",
                str(layer.rows),
                f"{layer.sparsity:.3f}",
                f"{1e3 * layer.dense_seconds:.3f}",
            ]
            for form in layer.forms:
                row.append(_cell(form))
                if form.skipped:
                    name = layer.name or "(model)"
                    reason = form.skipped.removeprefix(f"layer {layer.name!r}: ")
                    skipped.setdefault((form.layout, reason), []).append(name)
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            f"speed report on {self.device}: median of {self.repeats} interleaved calls; "
            "speed-up = dense time / sparse time (> 1: sparsity pays off)"
        ]
        lines += [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows
        ]
        for layout in self.layouts:
            faster, slower = self._split(layout)
            measured = len(faster) + len(slower)
            line = f"{layout}: pays off on {len(faster)} of {measured} measured layers"
            if faster:
                dense, best = self.linear_seconds(layout)
                line += (
                    f" ({', '.join(name or '(model)' for name in faster)}); converting only "
                    f"those takes the linear layers from {1e3 * dense:.3f} to {1e3 * best:.3f} ms"
                )
            lines.append(line)
        if not self.all_agree:
            lines.append("MISMATCH: a sparse form disagrees with dense beyond rounding")
        if skipped:  # one line per reason, with the layers it holds for
            lines.append("not measured:")
            for (layout, reason), names in skipped.items():
                lines.append(f"  {layout}: {reason} ({', '.join(names)})")
        return "\n".join(lines)


def speed_report(
    model: nn.Module,
    example_inputs: Tensor | tuple | list | Mapping,
    *,
    layouts: Iterable[str] = ("csr",),
    blocksize: tuple[int, int] | None = None,
    repeats: int = 10,
) -> SpeedReport:
    r"""Time every linear layer of ``model`` dense and in each sparse ``layouts``, per layer.

    ``model`` is called once on ``example_inputs`` (under :func:`torch.no_grad`) to capture the
    input of every :class:`~torch.nn.Linear` and Hugging Face ``Conv1D`` that runs; then for
    each such layer and layout the sparse form is built from the layer's weights (as
    :func:`~lossprune.sparse.to_sparse` or :func:`~lossprune.sparse.to_semi_structured` would),
    its output is checked against the dense layer's, and dense and sparse calls are timed in
    ``repeats`` interleaved rounds after one warm-up call each. On CUDA each call is timed with
    CUDA events and a synchronisation, on CPU with :func:`time.perf_counter`. A layout that
    cannot be built for a layer (dense layer with 2:4, a dtype the kernel lacks, a blocksize not
    dividing the weight, ...) is reported with the reason instead of a time. ``model`` is not
    modified: it runs on clones of its buffers (a batch-norm layer in training mode updates
    the clones). Layers with no weight (a zero-size dimension) have nothing to time and are left
    out.

    Agreement is judged against the rounding error a dot product may carry: a sparse output
    :math:`\tilde y_{ij}` agrees with the dense :math:`y_{ij}` when
    :math:`|\tilde y_{ij} - y_{ij}| \le \tau (\sum_k |x_{ik}| |W_{jk}| + |b_j|)`, with
    :math:`\tau` = 1e-12 (float64), 1e-5 (float32), 5e-3 (float16), 2e-2 (bfloat16): a few
    hundred units in the last place of the sum of absolute terms, the scale of the summation
    error bound (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.1), so
    that a cancelling sum is not mistaken for a wrong one.

    The speed-ups depend on sparsity, shape, batch, dtype and machine: on a CPU unstructured
    CSR needs roughly 90 % sparsity to break even; 2:4 needs large float16/bfloat16 layers on a
    GPU. Times of small layers are dominated by call overhead.

    Args:
        model: The network, on the device (and in the dtype) to measure.
        example_inputs: What ``model`` is called with: a tensor, a tuple/list of positional
            arguments, or a mapping of keyword arguments.
        layouts: Any of ``"csr"``, ``"bsr"``, ``"semi_structured"``, each at most once.
        blocksize: The BSR tile, required when ``"bsr"`` is in ``layouts``.
        repeats: Timed calls per form and layer (>= 1).

    Returns:
        A :class:`SpeedReport`; ``print(report)`` shows the table.

    Raises:
        TypeError: ``model`` is not a module, ``example_inputs`` of another kind, or a wrong
            type for ``layouts``, ``blocksize`` or ``repeats``.
        ValueError: An unknown or repeated layout, a bad ``blocksize``, or no linear layer ran.
    """
    check_model(model)
    forms = _check_layouts(layouts)
    blocksize = check_blocksize("bsr" if "bsr" in forms else "csr", blocksize)
    repeats = check_positive_int("repeats", repeats)
    calls = _captured_inputs(model, example_inputs)
    if not calls:
        raise ValueError("no nn.Linear or Conv1D layer of the model ran on example_inputs")
    for name, (module, _) in calls.items():
        check_dense_weight(name, module)
    layers = tuple(
        _time_layer(name, module, x, forms, blocksize, repeats)
        for name, (module, x) in calls.items()
    )
    device = str(next(iter(calls.values()))[1].device)
    return SpeedReport(device, repeats, forms, layers)


def _check_layouts(layouts: object) -> tuple[str, ...]:
    if isinstance(layouts, str) or not isinstance(layouts, Iterable):
        raise TypeError(f"layouts must be a tuple of layout names, got {type(layouts).__name__}")
    forms = tuple(layouts)
    if not forms or any(form not in FORMS for form in forms) or len(set(forms)) != len(forms):
        raise ValueError(f"layouts must be distinct names among {FORMS}, got {forms}")
    return forms


def _captured_inputs(
    model: nn.Module, example_inputs: object
) -> dict[str, tuple[nn.Module, Tensor]]:
    """Name to (module, its first input) of every linear layer that runs on ``example_inputs``."""
    args: tuple[object, ...]
    kwargs: dict[str, object]
    if isinstance(example_inputs, Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        raise TypeError(
            "example_inputs must be a tensor, a tuple/list of positional arguments or a mapping "
            f"of keyword arguments, got {type(example_inputs).__name__}"
        )
    calls: dict[str, tuple[nn.Module, Tensor]] = {}

    def capture(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, keywords: dict) -> None:
            # A layer may be called by keyword (``self.proj(input=x)``): its one input either way.
            x = inputs[0] if inputs else next(iter(keywords.values()))
            calls.setdefault(name, (module, x.detach()))

        return hook

    handles = [
        module.register_forward_pre_hook(capture(name), with_kwargs=True)
        for name, module in model.named_modules()
        if is_linear(module) and linear_weights(module).weight.numel()  # zero-size: no weights
    ]
    # Cloned buffers: a model in training mode updates its batch-norm statistics in the clones.
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    try:
        with torch.no_grad():
            functional_call(model, buffers, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _time_layer(
    name: str,
    module: nn.Module,
    x: Tensor,
    forms: tuple[str, ...],
    blocksize: tuple[int, int] | None,
    repeats: int,
) -> LayerTiming:
    """Check every buildable form of one layer against dense, then time them all together."""
    weights = linear_weights(module)
    with torch.no_grad():
        dense_out = module(x)
        bound = error_bound(weights, x)
        built: dict[str, nn.Module] = {}
        skipped: dict[str, str] = {}
        errors: dict[str, tuple[float, bool]] = {}
        for layout in forms:
            try:
                built[layout] = _build(name, module, weights, layout, blocksize)
            except (TypeError, ValueError) as refusal:
                skipped[layout] = str(refusal)
                continue
            difference = (built[layout](x).double() - dense_out.double()).abs()
            errors[layout] = (float(difference.max()), bool((difference <= bound).all()))
        times = _interleaved_times({"dense": module, **built}, x, repeats)

    dense = times["dense"]
    timings = []
    for layout in forms:
        if layout in skipped:
            timings.append(FormTiming(layout, skipped=skipped[layout]))
            continue
        sparse = times[layout]
        error, agrees = errors[layout]
        timings.append(
            FormTiming(
                layout,
                seconds=statistics.median(sparse),
                min_seconds=min(sparse),
                speedup=statistics.median(dense) / statistics.median(sparse),
                speedup_of_minima=min(dense) / min(sparse),
                max_abs_error=error,
                agrees=agrees,
            )
        )
    weight = weights.weight
    return LayerTiming(
        name=name,
        shape=(weight.shape[0], weight.shape[1]),
        rows=x.numel() // weight.shape[1],
        sparsity=1.0 - int(weight.count_nonzero()) / weight.numel(),
        dtype=weight.dtype,
        dense_seconds=statistics.median(dense),
        dense_min_seconds=min(dense),
        forms=tuple(timings),
    )


def _build(
    name: str,
    module: nn.Module,
    weights: LinearWeights,
    layout: str,
    blocksize: tuple[int, int] | None,
) -> nn.Module:
    """The sparse form of one layer, or the converter's TypeError/ValueError."""
    check_convertible(name, module)
    if layout == "semi_structured":
        check_semi_structured_support(name, weights.weight)
        return semi_structured_linear(weights)
    layout_blocksize = blocksize if layout == "bsr" else None
    check_sparse_support(name, weights.weight, layout, layout_blocksize)
    return SparseLinear.from_dense(weights, layout, layout_blocksize)


def _interleaved_times(
    callables: dict[str, nn.Module], x: Tensor, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each callable, one call of each per round, after one warm-up."""
    clock = _cuda_seconds if x.device.type == "cuda" else _cpu_seconds
    for function in callables.values():
        function(x)
    times: dict[str, list[float]] = {key: [] for key in callables}
    for _ in range(repeats):
        for key, function in callables.items():
            times[key].append(clock(function, x))
    return times


def _cpu_seconds(function: Callable[[Tensor], Tensor], x: Tensor) -> float:
    start = time.perf_counter()
    function(x)
    return time.perf_counter() - start


def _cuda_seconds(function: Callable[[Tensor], Tensor], x: Tensor) -> float:
    # Kernels run asynchronously: events recorded on the stream bracket the work itself, and
    # the synchronisations keep earlier work out of the interval and wait for this one.
    torch.cuda.synchronize(x.device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    function(x)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _measured(layer: LayerTiming) -> list[FormTiming]:
    return [form for form in layer.forms if form.skipped is None]


def _cell(form: FormTiming) -> str:
    if form.seconds is None or form.speedup is None:
        return "n/a"
    mark = "" if form.agrees else " MISMATCH"
    return f"{1e3 * form.seconds:.3f} ({form.speedup:.2f}x){mark}"
