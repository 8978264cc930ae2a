"""Training, fine-tuning and evaluation loops of the reproduction.

Laurent et al. (2020, arXiv:2006.12279, Sec. 5) train and fine-tune with SGD (momentum 0.9, weight
decay 5e-4, batch 100) and keep the checkpoint with the best validation error. Fine-tuning a pruned
network keeps its mask fixed: pruned weights are zero before training and stay exactly zero.

The loop takes plain masks (no :class:`lossprune.Pruner`), so that the same loop trains the dense
networks and fine-tunes the pruned ones; the masks are held by the library's
:func:`lossprune.keep_pruned_at_zero`, the same hooks as :meth:`lossprune.Pruner.attach`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lossprune import keep_pruned_at_zero

from .data import Split, make_loader

__all__ = ["LR_SCHEDULES", "train", "evaluate"]

LRSchedule = str | Callable[[int], float]
LR_SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")
"""Names accepted as ``lr_schedule`` by :func:`train`."""


def _lr_factor(schedule: LRSchedule, epochs: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate for the 0-based epoch ``e``.

    * ``"constant"``: 1.
    * ``"step"``: divided by 10 at 50% and again at 75% of training, the CIFAR schedule of
      He et al. (2016) as used by GraSP (Wang et al. 2020).
    * ``"cosine"``: ``(1 + cos(pi * e / epochs)) / 2`` (Loshchilov & Hutter 2017, no restarts).
    * a callable: used as is.
    """
    if callable(schedule):
        return schedule
    if schedule == "constant":
        return lambda epoch: 1.0
    if schedule == "step":
        return lambda epoch: 0.1 ** ((epoch >= 0.5 * epochs) + (epoch >= 0.75 * epochs))
    if schedule == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    raise ValueError(
        f"lr_schedule must be a callable or one of {', '.join(LR_SCHEDULES)}, got {schedule!r}"
    )


def _masked_parameters(
    model: nn.Module, masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.nn.Parameter]:
    """The parameters ``masks`` names, by name (tied weights under any of their names).

    Raises:
        TypeError: If ``masks`` is not a mapping.
        ValueError: For a name that is not a parameter of ``model``.
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict name -> bool tensor, got {type(masks).__name__}")
    parameters = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(masks) - set(parameters))
    if unknown:
        raise ValueError(f"masks name parameters that the model does not have: {unknown}")
    return {name: parameters[name] for name in masks}


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    progress: bool,
) -> tuple[float, float]:
    """One pass over ``loader``; returns the running mean loss and error rate of the epoch."""
    model.train()
    # Accumulate on the device and read once per epoch: no host synchronisation per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for inputs, targets in tqdm(loader, desc="batches", leave=False, disable=not progress):
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # the mask hooks re-zero pruned weights (lossprune.keep_pruned_at_zero)
        loss_sum += loss.detach() * len(targets)
        wrong += (logits.argmax(dim=1) != targets).sum()
        count += len(targets)
    mean_loss = loss_sum.item() / count
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"training diverged: mean training loss {mean_loss}")
    return mean_loss, wrong.item() / count


def _check_hyperparameters(
    epochs: int, lr: float, momentum: float, weight_decay: float, batch_size: int
) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must satisfy 0 <= momentum < 1, got {momentum!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def train(
    model: nn.Module,
    split: Split,
    *,
    epochs: int,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 100,
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool = False,
    masks: Mapping[str, torch.Tensor] | None = None,
    lr_schedule: LRSchedule = "step",
    num_workers: int = 0,
) -> list[dict[str, float]]:
    """Train ``model`` on ``split.train`` with SGD and keep its best-validation checkpoint.

    Minimises the mean cross-entropy with SGD (heavy-ball momentum, L2 weight decay on every
    parameter) as in Laurent et al. (2020, Sec. 5). After every epoch the model is evaluated on
    ``split.val``; at the end the state with the lowest validation error (earliest on ties) is
    loaded back into ``model``.

    With ``masks``, the pruned weights (``False`` entries) are set to zero first, their gradients
    are zeroed by tensor hooks and they are re-zeroed after every optimizer step, so they are
    exactly zero throughout: fine-tuning with a fixed mask. The hooks are removed on return.

    ``seed`` fixes the global torch generator and the shuffling order, so two calls with the same
    model state and seed give bit-identical results on CPU (on CUDA, only with
    ``torch.use_deterministic_algorithms(True)``).

    Args:
        model: Network mapping a batch of inputs to logits; moved to ``device`` in place.
        split: Training and validation data (:class:`~lossprune.experiments.data.Split`).
        epochs: Number of passes over the training set.
        lr: Base learning rate. 0.1 suits the CIFAR and ImageNet networks; the digits MLP also
            converges with it in a few epochs.
        momentum: SGD momentum.
        weight_decay: L2 penalty coefficient (added to the gradient by SGD).
        batch_size: Training mini-batch size.
        seed: Seed of the run.
        device: Where to train.
        progress: Show tqdm progress bars (epochs, and batches within an epoch).
        masks: Qualified parameter name -> bool tensor of the parameter's shape, True = kept.
        lr_schedule: ``"constant"``, ``"step"`` (x0.1 at 50% and 75% of the epochs),
            ``"cosine"``, or a callable mapping the 0-based epoch to a learning-rate multiplier.
        num_workers: Data-loading worker processes (``0``: load in this process).

    Returns:
        One dict per epoch with keys ``epoch`` (1-based), ``lr``, ``train_loss`` and
        ``train_error`` (running means over the epoch's mini-batches, train mode), ``val_loss``
        and ``val_error`` (eval mode, after the epoch).

    Raises:
        TypeError: For masks that are not bool tensors (raised before training).
        ValueError: For invalid hyperparameters, schedule or mask names and shapes (raised
            before training).
        FloatingPointError: If the training loss of an epoch is not finite.
    """
    _check_hyperparameters(epochs, lr, momentum, weight_decay, batch_size)
    lr_factor = _lr_factor(lr_schedule, epochs)
    device = torch.device(device)
    model.to(device)
    masked = _masked_parameters(model, masks) if masks is not None else {}
    torch.manual_seed(seed)
    loader = make_loader(split.train, batch_size, shuffle=True, seed=seed, num_workers=num_workers)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    # The library's one implementation: masked_fill on gradients and after every step, never a
    # product with the mask (0 * inf = NaN). Validates the masks before touching anything.
    handle = keep_pruned_at_zero(optimizer, masked, dict(masks)) if masks is not None else None
    history: list[dict[str, float]] = []
    best_error, best_state = math.inf, None
    epoch_bar = tqdm(range(1, epochs + 1), desc="epochs", disable=not progress)
    try:
        for epoch in epoch_bar:
            current_lr = optimizer.param_groups[0]["lr"]
            train_loss, train_error = _train_epoch(model, loader, optimizer, device, progress)
            val_loss, val_error = evaluate(model, split.val, device=device, num_workers=num_workers)
            history.append(
                {
                    "epoch": epoch,
                    "lr": current_lr,
                    "train_loss": train_loss,
                    "train_error": train_error,
                    "val_loss": val_loss,
                    "val_error": val_error,
                }
            )
            epoch_bar.set_postfix(train_loss=f"{train_loss:.4f}", val_error=f"{val_error:.4f}")
            if val_error < best_error:
                best_error = val_error
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            scheduler.step()
    finally:
        if handle is not None:
            handle.remove()
        epoch_bar.close()
    model.load_state_dict(best_state)
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> tuple[float, float]:
    """Mean cross-entropy and error rate of ``model`` on ``dataset``, in eval mode.

    The model's train/eval mode is restored afterwards; batch-norm statistics are not updated.

    Args:
        model: Network mapping a batch of inputs to logits.
        dataset: Map-style dataset of ``(input, target)`` pairs.
        batch_size: Examples per forward pass (only affects speed and memory).
        device: Where the inputs are sent; default: the device of the model's first parameter.
        num_workers: Data-loading worker processes (``0``: load in this process).

    Returns:
        ``(mean loss, error rate)``, both as Python floats.
    """
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    try:
        for inputs, targets in make_loader(
            dataset, batch_size, shuffle=False, seed=0, num_workers=num_workers
        ):
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum")
            wrong += (logits.argmax(dim=1) != targets).sum()
            count += len(targets)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return loss_sum.item() / count, wrong.item() / count
