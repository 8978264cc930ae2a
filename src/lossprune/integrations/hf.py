"""Hugging Face ``Trainer`` integration: fine-tune a pruned model with its masks held fixed.

Usage::

    pruner = Pruner(model, QuadraticModel(lam=1e-3), ExponentialSchedule(0.5, 4), data=loader)
    pruner.run()
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[PruningCallback(pruner)])
    trainer.train()      # pruned weights stay exactly zero (AdamW, clipping, schedulers, bf16)

or, in another process, from what ``save_pretrained`` and :meth:`lossprune.Pruner.save_masks`
wrote::

    model = AutoModelForCausalLM.from_pretrained("pruned/")
    trainer = Trainer(model=model, ..., callbacks=[PruningCallback("pruned/")])

The callback attaches :func:`lossprune.selection.keep_pruned_at_zero` (through
:meth:`lossprune.Pruner.attach` for a pruner) to the optimizer the ``Trainer`` built (which
``accelerate`` wraps; it is unwrapped), when training begins, and removes its hooks when
training ends, so a second ``trainer.train()`` attaches to the new optimizer and no hook outlives
the run. Gradients of pruned weights are replaced by zeros as they are computed (before
gradient clipping measures the norm), and the weights are set back to zero after every optimizer
step (weight decay and Adam's moments cannot move them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor
from transformers import TrainerCallback

from ..pruning import Pruner
from ..selection import MaskHandle, keep_pruned_at_zero, load_masks

__all__ = ["PruningCallback"]


class PruningCallback(TrainerCallback):
    """Keeps the pruned weights exactly zero during ``Trainer.train()``.

    Args:
        pruner: what to keep: a :class:`~lossprune.Pruner` (its current masks are read at every
            step, so stages run between two ``train()`` calls are covered too), a dict of
            ``bool`` masks by parameter name, or a mask file / the directory holding one
            (:func:`lossprune.selection.save_masks`, read now). Masks are matched to the
            ``Trainer``'s model when training begins.

    Raises:
        TypeError: ``pruner`` is none of these.
        FileNotFoundError, ValueError: a path with no mask file, or not a mask file.
    """

    def __init__(self, pruner: Pruner | Mapping[str, Tensor] | str | os.PathLike) -> None:
        if isinstance(pruner, str | os.PathLike):
            pruner = load_masks(pruner)
        elif isinstance(pruner, Mapping):
            pruner = dict(pruner)
        elif not isinstance(pruner, Pruner):
            raise TypeError(
                "pruner must be a lossprune.Pruner, a dict of bool masks or a mask file, got "
                f"{type(pruner).__name__}"
            )
        self.pruner = pruner
        self._handle: MaskHandle | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Attach the mask hooks to the optimizer the ``Trainer`` created."""
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise ValueError(
                "PruningCallback needs the Trainer's optimizer at on_train_begin, got None"
            )
        self._detach()
        if isinstance(self.pruner, Pruner):
            self._handle = self.pruner.attach(optimizer)
            return
        model = kwargs.get("model")
        if model is None:
            raise ValueError(
                "PruningCallback needs the Trainer's model at on_train_begin, got None"
            )
        self._handle = keep_pruned_at_zero(optimizer, model, self.pruner)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the hooks (the weights stay pruned)."""
        self._detach()

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
