"""What one batch of scoring data is, whatever form the user's data takes.

A batch reaches the library as

* ``(inputs, targets)`` with a tensor of inputs (the model is called ``model(inputs)``);
* ``((a, b, ...), targets)``, a nested tuple: the model is called ``model(a, b, ...)``;
* a mapping (``dict``, Hugging Face ``BatchEncoding``, any :class:`collections.abc.Mapping`):
  every entry except ``labels`` is a keyword argument of the model, ``labels`` the targets.

:func:`to_batch` turns each into a :class:`Batch` ``(inputs, targets)`` whose ``inputs`` is the
tensor itself (the fast paths read it) or a :class:`ModelInputs` (positional and keyword
arguments, and how to read the loss's input from the model's outputs).

For models that follow the Hugging Face convention the loss may be omitted: the model's own
loss, :class:`~lossprune._common.model_loss.ModelLoss`, reads the logits from the outputs, aligns
the labels with them and, for an encoder-decoder, builds the decoder inputs from the labels
(:mod:`.model_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .model_loss import DECODER_INPUTS, ModelLoss, model_loss, model_loss_in, resolve_loss

__all__ = [
    "Batch",
    "ModelInputs",
    "ModelLoss",
    "batch_examples",
    "counted_positions",
    "is_batch",
    "model_loss",
    "model_loss_in",
    "resolve_loss",
    "to_batch",
]

LABELS = "labels"
#: The label value the Hugging Face convention ignores (``ignore_index`` of its cross-entropy).
IGNORE_INDEX = -100


class ModelInputs:
    """The model inputs of one batch: ``model(*args, **kwargs)``, then ``read`` of the outputs.

    Args:
        args: positional inputs, tensors (batch dimension first) or other constants.
        kwargs: keyword inputs, same kinds.
        read: maps the model's outputs to what the loss reads (``None``: the outputs themselves).
        labels: the ``labels`` of a mapping batch as the user gave them (before any causal-LM
            shift), which say which positions count in input statistics
            (:func:`counted_positions`); ``None`` for other batches.
    """

    __slots__ = ("args", "kwargs", "read", "labels")

    def __init__(
        self,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        read: Callable[[Any], Any] | None = None,
        labels: Tensor | None = None,
    ) -> None:
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.read = read
        self.labels = labels

    def tensors(self) -> list[Tensor]:
        return [t for t in (*self.args, *self.kwargs.values()) if isinstance(t, Tensor)]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> ModelInputs:
        def each(value: Any) -> Any:
            return fn(value) if isinstance(value, Tensor) else value

        return ModelInputs(
            tuple(each(a) for a in self.args),
            {k: each(v) for k, v in self.kwargs.items()},
            self.read,
            each(self.labels),
        )

    def to(self, device: torch.device) -> ModelInputs:
        return self._map(lambda t: t.to(device))

    def rows(self, start: int, stop: int) -> ModelInputs:
        """Examples ``start:stop`` of every tensor (the others are constants)."""
        return self._map(lambda t: t[start:stop])

    def example_rows(self, start: int, stop: int, examples: int) -> ModelInputs:
        """Examples ``start:stop`` of every tensor whose first dimension is ``examples``.

        The other tensors (a ``(1, T)`` position tensor broadcast over the batch, constants)
        are passed as they are, so that a slice of a batch is still a valid batch.
        """
        return self._map(lambda t: t[start:stop] if t.dim() and len(t) == examples else t)

    def index(self, index: Tensor) -> ModelInputs:
        return self._map(lambda t: t[index.to(t.device)])

    def __repr__(self) -> str:
        keys = ", ".join(self.kwargs)
        return f"ModelInputs({len(self.args)} positional, keywords [{keys}])"


class Batch(NamedTuple):
    """One batch: the model inputs and the targets the loss compares the outputs with."""

    inputs: Tensor | ModelInputs
    targets: Tensor


def batch_examples(batch: Batch) -> int:
    """The number of examples (sequences, images) of ``batch``: its targets' first dimension."""
    return len(batch.targets)


def counted_positions(kwargs: Mapping[str, Any], labels: Tensor | None) -> Tensor | None:
    r"""Which positions of a batch of sequences count in input statistics (``None``: all).

    The ONE rule of the library for which tokens an input statistic (Wanda's
    :math:`\|X_j\|^2`, the Gram matrices of layer-wise pruning) sums over. A position
    :math:`(n, t)` counts unless

    * the batch's ``attention_mask`` (2-d, ``(N, T)``) is 0 there (padding), or
    * its own label, ``labels[n, t]`` as given in the batch (the token at that position, BEFORE
      the causal-LM shift), is ``-100`` (ignored; padding, or a prompt the user masked out).

    Labels count only when they are one per position (integer, shaped like ``input_ids`` or
    the attention mask); a batch without labels uses its attention mask alone, and a batch
    with neither counts every position. Right- and left-padded batches therefore give the
    statistics of the unpadded sequences.

    Raises:
        ValueError: an ``attention_mask`` that is not 2-d (a 4-d mask does not say which
            positions are padding).
    """
    counted = None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor):
        if mask.dim() != 2:
            raise ValueError(
                f"input statistics read padding from a 2-d (batch, positions) attention_mask; "
                f"got one of shape {tuple(mask.shape)}: pass the 2-d padding mask"
            )
        counted = mask != 0
    ids = kwargs.get("input_ids")
    shape = counted.shape if counted is not None else getattr(ids, "shape", None)
    per_position = (
        labels is not None
        and labels.dim() == 2
        and not labels.is_floating_point()
        and labels.shape == shape
    )
    if per_position:
        assert labels is not None
        labelled = labels != IGNORE_INDEX
        counted = labelled if counted is None else counted & labelled.to(counted.device)
    return counted


def is_batch(data: Any) -> bool:
    """One batch (a mapping, or ``(inputs, targets)`` with tensor targets), not many."""
    if isinstance(data, Mapping):
        return True
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], Tensor)
        and (isinstance(data[0], Tensor) or _tensor_tuple(data[0]))
    )


def _tensor_tuple(value: Any) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) > 0
        and any(isinstance(v, Tensor) for v in value)
        and all(isinstance(v, Tensor) or v is None for v in value)
    )


_EXPECTED = (
    "an (inputs, targets) pair, ((input, ...), targets), or a mapping of model inputs with 'labels'"
)


def to_batch(raw: Any, loss_fn: Any = None, device: torch.device | None = None) -> Batch:
    """``raw`` as a :class:`Batch` on ``device``, read through ``loss_fn`` when a ModelLoss.

    Raises:
        TypeError: ``raw`` has none of the forms of the module docstring.
        ValueError: a mapping without ``labels``, or entries of different lengths.
    """
    if isinstance(raw, Batch):  # already converted (the per-batch functions inside a loop)
        return raw if device is None else Batch(raw.inputs.to(device), raw.targets.to(device))
    if isinstance(raw, Mapping):
        _check_no_lists(raw)
        if LABELS not in raw:
            raise ValueError(
                "a mapping batch needs a 'labels' entry (the targets the loss compares the "
                f"outputs with), got keys {sorted(map(str, raw))}"
            )
        targets = raw[LABELS]
        if not isinstance(targets, Tensor):
            raise TypeError(f"the 'labels' of a mapping batch must be a tensor, got {targets!r}")
        if targets.dim() == 0:
            raise ValueError(
                "the 'labels' of a mapping batch are one number: this is one example (a row), "
                "not a batch; batch the rows, e.g. DataLoader(rows, batch_size=8)"
            )
        inputs: Tensor | ModelInputs = ModelInputs(
            (), {str(k): v for k, v in raw.items() if k != LABELS}, labels=targets
        )
    elif isinstance(raw, (tuple, list)) and len(raw) == 2 and isinstance(raw[1], Tensor):
        first, targets = raw
        if isinstance(first, Tensor):
            inputs = first
        elif _tensor_tuple(first):
            inputs = ModelInputs(tuple(first))
        else:
            raise TypeError(
                f"each batch must be {_EXPECTED}; its inputs are {type(first).__name__}"
            )
    else:
        raise TypeError(f"each batch must be {_EXPECTED}, got {_describe(raw)}")
    own = model_loss_in(loss_fn)
    if own is not None:
        if isinstance(inputs, Tensor):
            inputs = ModelInputs((inputs,))
        kwargs = inputs.kwargs
        if own.task == "seq2seq" and not any(k in kwargs for k in DECODER_INPUTS):
            # What the encoder-decoder does with labels and no decoder inputs (model_loss).
            kwargs = {**kwargs, "decoder_input_ids": own.decoder_inputs(targets)}
        # An encoder-decoder's labels are the decoder's positions, not the inputs' own.
        labels = None if own.task == "seq2seq" else inputs.labels
        inputs = ModelInputs(inputs.args, kwargs, own.read, labels)
        targets = own.targets(targets)
    _check_lengths(inputs, targets)
    if device is not None:
        inputs, targets = inputs.to(device), targets.to(device)
    return Batch(inputs, targets)


def _check_no_lists(raw: Mapping[Any, Any]) -> None:
    """A mapping of lists of numbers is a tokenizer's output that was never made into tensors.

    (A list of tensors, e.g. images of several sizes, is a model input like any other.)
    """
    lists = [
        str(k)
        for k, v in raw.items()
        if isinstance(v, list) and (not v or isinstance(v[0], (int, float, list)))
    ]
    if lists:
        raise TypeError(
            f"the mapping batch holds Python lists under {lists} (a tokenizer's output without "
            "return_tensors='pt'?): call the tokenizer with padding=True, return_tensors='pt', "
            "or batch the rows with a DataLoader and a collator (DataCollatorWithPadding)"
        )


def _describe(raw: Any) -> str:
    if isinstance(raw, (tuple, list)):
        return f"a {type(raw).__name__} of {len(raw)} ({', '.join(type(v).__name__ for v in raw)})"
    return type(raw).__name__


def _check_lengths(inputs: Tensor | ModelInputs, targets: Tensor) -> None:
    if isinstance(inputs, Tensor):
        if len(inputs) != len(targets):
            raise ValueError(
                f"inputs and targets differ in length: {len(inputs)} != {len(targets)}"
            )
        return
    named = [*enumerate(inputs.args), *inputs.kwargs.items()]
    for key, value in named:
        if isinstance(value, Tensor) and (value.dim() == 0 or len(value) != len(targets)):
            raise ValueError(
                f"model input {key!r} has {len(value) if value.dim() else 0} rows but the targets "
                f"have {len(targets)}: every tensor of a batch needs the batch dimension first"
            )
