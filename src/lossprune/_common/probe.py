"""The first batch's forward passes, before any statistic: no randomness, the right loss.

What a model's modules do not show is checked by running it on two examples of the first batch
(:data:`PROBED_EXAMPLES`: what every check below needs, at a small fraction of a pass over the
batch), without gradients and on cloned buffers (nothing of the model changes):

* that the forward pass draws no random number (:func:`~.functional.no_random_draws`): dropout
  written as a function call, attention dropout;
* for a Hugging Face model's own loss (:class:`~.model_loss.ModelLoss`), that the batch has
  what that loss needs (decoder inputs, labels shaped and valued like the logits) and that
  ``loss(read(outputs), targets(labels))`` is the number the model computes itself,
  ``model(**batch, labels=labels).loss``, up to the rounding of their dtypes. A model that
  computes its loss some other way is refused with what to pass instead.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .batches import LABELS, Batch, ModelInputs, batch_examples, to_batch
from .data import first_raw_batch
from .functional import FunctionalModel, at_least_float32, no_random_draws
from .model_loss import CROSS_ENTROPY_TASKS, DECODER_INPUTS, ModelLoss, model_loss, model_loss_in

__all__ = ["PROBED_EXAMPLES", "Probe", "probe_first_batch"]

#: Examples of the first batch the probe runs: two, so that a loss can be compared with the
#: mean of its batches of one (:func:`lossprune.curvature.outputs.check_mean_over_examples`).
PROBED_EXAMPLES = 2


class _Reference(NamedTuple):
    """What ``model(*inputs, labels=labels)`` returned, and those labels."""

    outputs: Any
    labels: Tensor


class Probe(NamedTuple):
    """The first batch in the library's form, and the probed examples of it.

    ``outputs``: what the loss reads of the model's outputs on those examples; ``targets``:
    their targets.
    """

    batch: Batch
    outputs: Any
    targets: Tensor


def probe_first_batch(
    model: nn.Module, loss_fn: Any, data: Any, device: torch.device | None = None
) -> Probe:
    """Run the checks of the module docstring on the first batch of ``data``.

    Raises:
        ValueError: the forward pass is random; a model's own loss whose batch lacks decoder
            inputs, whose labels do not match the logits, or that is not the model's ``.loss``.
    """
    raw = first_raw_batch(data)
    batch = to_batch(raw, loss_fn, device)
    own = model_loss_in(loss_fn)
    if own is not None:
        _check_decoder_inputs(model, own, batch)
    rows = _probed_rows(batch, own)
    probed = _rows(batch, rows)
    call = FunctionalModel(model, [])
    reference = None
    with torch.no_grad():
        with no_random_draws(model):
            outputs = call({}, probed.inputs)
            if isinstance(outputs, Tensor) and len(outputs) != len(probed.targets):
                # Examples not in dim 0 of the inputs (a sequence-first model whose sequences are
                # as long as the batch): what was sliced were positions, so the whole batch is
                # probed.
                rows, probed = slice(0, batch_examples(batch)), batch
                outputs = call({}, batch.inputs)
        if own is not None:
            # Before the model's loss reads them: every label's shape and range.
            own.check_targets(outputs, batch.targets, examples=batch_examples(batch))
            # Outside the random-draw check: the pass the statistics differentiate is the one
            # above; this one only gives the model's own loss (a draw here shows as a mismatch).
            reference = _models_own(model, call, raw, device, rows)
    if own is not None and reference is not None:
        _check_same_loss(model, own, outputs, probed, reference)
    return Probe(batch, outputs, probed.targets)


def _probed_rows(batch: Batch, own: ModelLoss | None) -> slice:
    """:data:`PROBED_EXAMPLES` examples of ``batch``, the first with a counted label among them.

    A cross-entropy over examples whose labels are all ``ignore_index`` is 0/0: the model's own
    loss could not be compared there.
    """
    examples = batch_examples(batch)
    start = 0
    if own is not None and own.task in CROSS_ENTROPY_TASKS and examples:
        counted = (batch.targets != own.ignore_index).reshape(examples, -1).any(dim=1)
        if bool(counted.any()):
            start = int(counted.nonzero()[0])
    start = max(0, min(start, examples - PROBED_EXAMPLES))
    return slice(start, min(start + PROBED_EXAMPLES, examples))


def _rows(batch: Batch, rows: slice) -> Batch:
    """The examples ``rows`` of ``batch`` (keyword tensors of another length as they are)."""
    examples = batch_examples(batch)
    inputs = batch.inputs
    if isinstance(inputs, Tensor):
        inputs = inputs[rows]  # as long as the targets (checked by to_batch)
    else:
        inputs = inputs.example_rows(rows.start, rows.stop, examples)
    return Batch(inputs, batch.targets[rows])


def _check_decoder_inputs(model: nn.Module, own: ModelLoss, batch: Batch) -> None:
    """An encoder-decoder whose loss builds decoder inputs from labels needs them built."""
    expected = model_loss(model)
    kwargs = batch.inputs.kwargs if isinstance(batch.inputs, ModelInputs) else {}
    if (
        expected is not None
        and expected.task == "seq2seq"
        and own.task != "seq2seq"
        and not any(k in kwargs for k in DECODER_INPUTS)
    ):
        raise ValueError(
            f"{type(model).__name__} builds its decoder inputs from the labels, which "
            f"ModelLoss({own.task!r}) does not: omit loss_fn (the model's own loss, "
            "lossprune.ModelLoss.for_model(model)) or put decoder_input_ids in each batch"
        )


def _models_own(
    model: nn.Module, call: FunctionalModel, raw: Any, device: Any, rows: slice
) -> _Reference | None:
    """``model(*inputs, labels=labels)`` with its ``.loss``, or ``None`` if it has none."""
    forward = getattr(model, "forward", None)
    try:
        takes_labels = LABELS in inspect.signature(forward).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        takes_labels = False
    if not takes_labels:
        return None
    plain = _rows(to_batch(raw, None, device), rows)  # the user's inputs and labels as they are
    inputs = plain.inputs
    args, kwargs = ((inputs,), {}) if isinstance(inputs, Tensor) else (inputs.args, inputs.kwargs)
    try:
        outputs = call({}, ModelInputs(args, {**kwargs, LABELS: plain.targets}))
    except (RuntimeError, ValueError, IndexError) as error:
        # FSMT builds its decoder inputs from input_ids, so labels of another length fail
        # inside its own loss: nothing to check ModelLoss against.
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{type(model).__name__} fails to compute its own loss from the first batch's "
            f"labels ({first_line}), so ModelLoss cannot be checked against it: put "
            "decoder_input_ids in each batch (model.prepare_decoder_input_ids_from_labels("
            "labels)) or pass loss_fn=..."
        ) from error
    if not isinstance(getattr(outputs, "loss", None), Tensor):
        return None
    return _Reference(outputs, plain.targets)


def _check_same_loss(
    model: nn.Module, own: ModelLoss, outputs: Tensor, batch: Batch, reference: _Reference
) -> None:
    """``own`` on the outputs must be the model's ``.loss`` (float32 or better on both sides)."""
    ours = own(at_least_float32(outputs), batch.targets)
    theirs = reference.outputs.loss
    # Rounding of the coarser side: transformers computes some losses in float32 (causal LMs
    # upcast their logits), others in the model's dtype.
    eps = max(torch.finfo(ours.dtype).eps, torch.finfo(theirs.dtype).eps)
    expected = float(theirs)

    def agrees(loss: Tensor) -> bool:
        return abs(float(loss) - expected) <= 100 * eps * max(1.0, abs(expected))

    if agrees(ours) or (math.isnan(expected) and bool(ours.isnan())):  # both 0/0: no label
        return
    name = type(model).__name__
    hint = (
        "pass loss_fn=... the loss it computes (it may add terms, e.g. a router's auxiliary loss)"
    )
    if own.task == "causal_lm":
        tokens = ModelLoss("tokens")
        logits = tokens.read(reference.outputs)
        if agrees(tokens(at_least_float32(logits), reference.labels)):
            hint = f"{name} does not shift its labels: pass loss_fn=lossprune.ModelLoss('tokens')"
    elif own.task == "seq2seq":
        hint = (
            f"{name} builds its decoder inputs another way: put decoder_input_ids in each batch "
            "(model.prepare_decoder_input_ids_from_labels(labels)), or pass loss_fn=..."
        )
    raise ValueError(
        f"{name} computes a loss of {expected:.6g} from the first batch's labels, but "
        f"ModelLoss({own.task!r}) gives {float(ours):.6g}: {hint}"
    )
