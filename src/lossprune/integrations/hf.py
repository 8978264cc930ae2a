"""Hugging Face ``Trainer`` integration: fine-tune a pruned model with its masks held fixed.

Usage::

    pruner = Pruner(model, QuadraticModel(lam=1e-3), ExponentialSchedule(0.5, 4), data=loader)
    pruner.run()
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[PruningCallback(pruner)])
    trainer.train()      # pruned weights stay exactly zero (AdamW, clipping, schedulers, bf16)

The callback calls :meth:`lossprune.Pruner.attach` on the optimizer the ``Trainer`` built (which
``accelerate`` wraps; ``attach`` unwraps it), when training begins, and removes its hooks when
training ends, so a second ``trainer.train()`` attaches to the new optimizer and no hook outlives
the run. Gradients of pruned weights are replaced by zeros as they are computed (before
gradient clipping measures the norm), and the weights are set back to zero after every optimizer
step (weight decay and Adam's moments cannot move them).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..pruning import Pruner
from ..selection import MaskHandle

__all__ = ["PruningCallback"]


class PruningCallback(TrainerCallback):
    """Keeps ``pruner``'s pruned weights exactly zero during ``Trainer.train()``.

    Args:
        pruner: the :class:`~lossprune.Pruner` whose masks to keep; its current masks are read
            at every step, so stages run between two ``train()`` calls are covered too.

    Raises:
        TypeError: ``pruner`` is not a :class:`~lossprune.Pruner`.
    """

    def __init__(self, pruner: Pruner) -> None:
        if not isinstance(pruner, Pruner):
            raise TypeError(f"pruner must be a lossprune.Pruner, got {type(pruner).__name__}")
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
        self._handle = self.pruner.attach(optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the hooks (the weights stay pruned)."""
        self._detach()

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
