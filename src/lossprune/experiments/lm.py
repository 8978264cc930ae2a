"""A tiny causal language model on the standard library's docstrings: build, train, evaluate.

The transformer experiments ask whether the findings of Laurent et al. (2020, arXiv:2006.12279)
hold beyond classifiers. The model is a GPT-2 (Radford et al. 2019) built from a
``transformers`` config, so that pruning runs on the same code paths as a user's Hugging Face
model (``Conv1D`` projections, a head tied to the embedding, the model's own shifted loss), at
byte level on :mod:`lossprune.experiments.text`. Training is AdamW with a cosine schedule and
gradient clipping, the usual recipe for small GPTs; fine-tuning a pruned model holds its masks
fixed with :meth:`lossprune.Pruner.attach`.

The loss is the token mean of the next-byte cross-entropy, :math:`L = \\frac{1}{|\\mathcal T|}
\\sum_{(n,t)\\in\\mathcal T} -\\log p(x_{n,t+1} \\mid x_{n,\\le t})`, over every position that has a
next byte; perplexity is :math:`e^L`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .text import VOCAB_SIZE, TextSplit

__all__ = ["LMConfig", "LMEvaluation", "build_tiny_lm", "token_loss", "evaluate_lm", "train_lm"]

IGNORE_INDEX = -100  # the Hugging Face convention for labels that carry no loss


class LMConfig(NamedTuple):
    """Shape of the tiny GPT-2 (about 0.4M parameters with the defaults)."""

    layers: int = 2
    width: int = 128
    heads: int = 4
    block_size: int = 64


class LMEvaluation(NamedTuple):
    """Token-mean loss (nats per byte), its perplexity, the number of tokens it averages and the
    next-token error rate (the most probable next byte is not the true one)."""

    loss: float
    perplexity: float
    tokens: int
    error: float


def _transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the tiny language model needs Hugging Face transformers: "
            "pip install 'lossprune[transformers]'"
        ) from error
    return transformers


def build_tiny_lm(config: LMConfig | None = None, *, seed: int = 0) -> nn.Module:
    """A byte-level GPT-2 from a config (nothing is downloaded), in eval mode, no dropout.

    Dropout is off so that the loss is a deterministic function of the weights: pruning scores
    are computed in eval mode anyway (Laurent et al. 2020, Sec. 5), and a tiny model trained
    for minutes does not need it.
    """
    transformers = _transformers()
    config = config or LMConfig()
    gpt2 = transformers.GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=config.block_size,
        n_embd=config.width,
        n_layer=config.layers,
        n_head=config.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(gpt2).eval()


def token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position ``t`` predicts label ``t + 1`` (labels ``-100`` skipped).

    The same loss as a Hugging Face ``*ForCausalLM`` model computes from ``labels``.
    """
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


@torch.no_grad()
def evaluate_lm(model: nn.Module, loader: Any, device: str | torch.device = "cpu") -> LMEvaluation:
    """Token-mean loss, perplexity and next-token error over the batches of ``loader`` (eval mode).

    Raises:
        ValueError: when the loader holds no token with a next token.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    wrong = 0
    try:
        for batch in loader:
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            logits = model(input_ids=ids).logits
            total += token_loss(logits, labels, reduction="sum").double().cpu()
            predicted = labels[:, 1:] != IGNORE_INDEX
            tokens += int(predicted.sum())
            wrong += int(((logits[:, :-1].argmax(-1) != labels[:, 1:]) & predicted).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("cannot evaluate a language model on data with no predicted token")
    loss = float(total) / tokens
    return LMEvaluation(loss, math.exp(loss), tokens, wrong / tokens)


def train_lm(
    model: nn.Module,
    split: TextSplit,
    *,
    steps: int,
    seed: int,
    lr: float = 3e-3,
    batch_size: int = 32,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    device: str | torch.device = "cpu",
    pruner: Any = None,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Train (or, with ``pruner``, fine-tune with fixed masks) for ``steps`` AdamW steps.

    The learning rate follows a cosine from ``lr`` to 0 with 5% linear warm-up; gradients are
    clipped to norm ``max_grad_norm``. With a :class:`lossprune.Pruner`, its masks are attached
    to the optimizer (pruned weights stay exactly zero) and detached on return.

    Returns:
        The history: ``step``, ``lr`` and ``train_loss`` every 10% of the steps, plus the last.

    Raises:
        ValueError: for a non-positive ``steps``, ``lr`` or ``batch_size``.
        FloatingPointError: when a training loss is not finite.
    """
    for name, value in (("steps", steps), ("lr", lr), ("batch_size", batch_size)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    model.to(device).train()
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
    other = [p for n, p in model.named_parameters() if p.dim() < 2 and p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
    )
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    handle = pruner.attach(optimizer) if pruner is not None else None
    history: list[dict[str, float]] = []
    report_every = max(1, steps // 10)
    batches = _endless(split.loader("train", batch_size, shuffle=True, seed=seed))
    try:
        for step in tqdm(range(1, steps + 1), desc="training", disable=not progress):
            batch = next(batches)
            logits = model(input_ids=batch["input_ids"].to(device)).logits
            loss = token_loss(logits, batch["labels"].to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss is not finite at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            current_lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            if step % report_every == 0 or step == steps:
                history.append({"step": step, "lr": current_lr, "train_loss": loss.item()})
    finally:
        if handle is not None:
            handle.remove()
        model.eval()
    return history


def _endless(loader: Any) -> Any:
    """Batches of ``loader`` epoch after epoch (a new shuffle each epoch)."""
    while True:
        yield from loader
