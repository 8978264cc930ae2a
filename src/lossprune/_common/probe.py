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

A statistic that runs one plain forward pass over the whole batch (a gradient, reverse-over-
reverse Hessian-vector products) makes the same checks on that pass instead
(:class:`PassCheck`): the random draws are watched there, the labels checked against its logits
and, for a causal LM, the model's own loss read from the same pass. The probe's forward passes
cost half a gradient on the tiny Llama of the benchmarks, most of it the model's Python
overhead; a causal LM has none left, another model only the reference of its own loss.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .batches import LABELS, Batch, ModelInputs, batch_examples, to_batch
from .data import first_raw_batch
from .functional import FunctionalModel, at_least_float32, refuse_random_draws
from .model_loss import CROSS_ENTROPY_TASKS, DECODER_INPUTS, ModelLoss, model_loss, model_loss_in

__all__ = ["PROBED_EXAMPLES", "PassCheck", "Probe", "probe_first_batch"]

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
        outputs = refuse_random_draws(model, lambda: call({}, probed.inputs))
        if isinstance(outputs, Tensor) and len(outputs) != len(probed.targets):
            # Examples not in dim 0 of the inputs (a sequence-first model whose sequences are as
            # long as the batch): what was sliced were positions, so the whole batch is probed.
            rows, probed = slice(0, batch_examples(batch)), batch
            outputs = refuse_random_draws(model, lambda: call({}, batch.inputs))
        if own is not None:
            # Before the model's loss reads them: every label's shape and range.
            own.check_targets(outputs, batch.targets, examples=batch_examples(batch))
            # Outside the random-draw check: the pass the statistics differentiate is the one
            # above; this one only gives the model's own loss (a draw here shows as a mismatch).
            reference = _models_own(model, call, raw, device, rows)
    if own is not None and reference is not None:
        _check_same_loss(model, own, own(at_least_float32(outputs), probed.targets), reference)
    return Probe(batch, outputs, probed.targets)


class PassCheck:
    """The checks of :func:`probe_first_batch`, made on a statistic's own forward pass.

    For a statistic that runs one plain forward pass over the whole batch: :meth:`forward` runs
    that pass (it must draw no random number) and checks what the loss reads of its outputs
    before the loss reads them; :meth:`check_loss` then compares the batch loss with the
    model's own. The same errors as the probe, raised before anything of the model changes
    (nothing does: the statistic is pure).

    A causal LM gets its ``labels`` in that pass, so its ``.loss`` of the whole batch comes with
    the logits and no forward pass is left for the probe: its logits are the same with or
    without labels (bitwise, on the 45 causal-LM families checked), and its labels' range is
    checked first, against the rows of its output embeddings, because the model's own loss
    reads them inside the pass (an out-of-range label is a device-side assert on a GPU). Other
    models keep the probe's reference: the model called on two examples with their labels,
    as the user gave them (an encoder-decoder then builds its own decoder inputs, which is part
    of what is checked).

    Args:
        model: the network.
        loss_fn: the resolved loss (a :class:`~.model_loss.ModelLoss` or the user's function).
        data: one batch as the user wrote it (or data whose first batch is used).
        device: where the batch goes (``None``: where it is).
    """

    def __init__(
        self, model: nn.Module, loss_fn: Any, data: Any, device: torch.device | None = None
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.raw = first_raw_batch(data)
        self.device = device
        self.batch = to_batch(self.raw, loss_fn, device)
        self.own = model_loss_in(loss_fn)
        self._labels: Tensor | None = None  # given to the model in the pass
        self._reference: _Reference | None = None
        if self.own is None:
            return
        _check_decoder_inputs(model, self.own, self.batch)
        classes = _output_classes(model)
        if self.own.task == "causal_lm" and classes is not None and _takes_labels(model):
            self.own.check_label_range(self.batch.targets, classes)
            self._labels = to_batch(self.raw, None, device).targets

    def forward(self, call: Callable[[Any], Any]) -> Any:
        """``call(inputs)``, the pass, with its outputs checked (:meth:`check_loss` follows).

        ``call`` maps the batch's inputs to what the loss reads of the outputs.

        Raises:
            ValueError: a random draw in the pass; for the model's own loss, labels that do not
                fit the logits, or (but for a causal LM, whose turn is :meth:`check_loss`) a
                model whose ``.loss`` is another number.
        """
        inputs = self.batch.inputs
        if self._labels is not None:
            assert isinstance(inputs, ModelInputs) and inputs.read is not None  # ModelLoss's
            inputs = ModelInputs(
                inputs.args,
                {**inputs.kwargs, LABELS: self._labels},
                self._keeping_reference(inputs.read),
                inputs.labels,
            )
        try:
            # A draw is named by the probe's pass of two examples.
            outputs = refuse_random_draws(
                self.model,
                lambda: call(inputs),
                lambda: probe_first_batch(self.model, self.loss_fn, self.raw, self.device),
            )
        except (RuntimeError, ValueError, IndexError):
            if self._labels is not None:
                # Perhaps the model's own loss failed on these labels: the probe says why.
                probe_first_batch(self.model, self.loss_fn, self.raw, self.device)
            raise
        own = self.own
        if own is None:
            return outputs
        logits = outputs.detach()
        own.check_targets(logits, self.batch.targets)
        if self._labels is None:
            rows = _probed_rows(self.batch, own)
            probed = _rows(self.batch, rows)
            with torch.no_grad():
                reference = _models_own(
                    self.model, FunctionalModel(self.model, []), self.raw, self.device, rows
                )
                if reference is not None:
                    ours = own(at_least_float32(logits[rows]), probed.targets)
                    _check_same_loss(self.model, own, ours, reference)
        return outputs

    def check_loss(self, loss: Tensor) -> None:
        """The batch loss of the pass against the model's ``.loss`` of the same pass.

        Raises:
            ValueError: the model computes another number (:func:`probe_first_batch`).
        """
        reference, own = self._reference, self.own
        if reference is None or own is None:
            return
        self._reference = None  # the logits it holds are the pass's; let them go
        ours = loss.detach()
        if self.loss_fn is not own or torch.finfo(ours.dtype).bits < 32:
            with torch.no_grad():
                ours = own(at_least_float32(own.read(reference.outputs)), self.batch.targets)
        _check_same_loss(self.model, own, ours, reference)

    def _keeping_reference(self, read: Callable[[Any], Tensor]) -> Callable[[Any], Tensor]:
        """``read``, keeping the model's ``.loss`` and its logits, detached, on the side."""
        labels = self._labels
        assert labels is not None

        def keep(outputs: Any) -> Tensor:
            theirs, logits = getattr(outputs, "loss", None), getattr(outputs, "logits", None)
            if isinstance(theirs, Tensor) and isinstance(logits, Tensor):
                self._reference = _Reference(_OwnOutputs(theirs.detach(), logits.detach()), labels)
            return read(outputs)

        return keep


class _OwnOutputs(NamedTuple):
    """What the reference needs of a model's outputs: its ``.loss`` and ``.logits``."""

    loss: Tensor
    logits: Tensor


def _output_classes(model: nn.Module) -> int | None:
    """The rows of the output embeddings (a language model's classes), if it has them."""
    head = getattr(model, "get_output_embeddings", None)
    try:
        weight = getattr(head(), "weight", None) if callable(head) else None
    except (NotImplementedError, AttributeError):
        return None
    return int(weight.shape[0]) if isinstance(weight, Tensor) and weight.dim() == 2 else None


def _takes_labels(model: nn.Module) -> bool:
    try:
        return LABELS in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


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
    if not _takes_labels(model):
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


def _check_same_loss(model: nn.Module, own: ModelLoss, ours: Tensor, reference: _Reference) -> None:
    """``ours``, ``own`` on the outputs, must be the model's ``.loss`` (float32 or better)."""
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
