"""Keyword-input (Hugging Face) models: per-example statistics one example at a time, fused.

Float64, dict batches with padding (``attention_mask`` zeros) and ``-100`` labels, on GPT-2,
Llama with grouped-query attention and BERT. The slow twins are written out here: a per-example
loop with dense Jacobians of each example's logits (``torch.func.jacrev``) and the closed-form
softmax Hessian per token, independent of the library's code.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

from lossprune._common.batches import model_loss
from lossprune._common.functional import FunctionalModel
from lossprune._common.probe import PROBED_EXAMPLES
from lossprune.curvature import (
    Statistic,
    compute_statistics,
    diagonals,
    fisher_diag,
    fisher_diag_mc,
    hutchinson_diag,
    loss_and_grad,
    per_example,
    statistics,
)
from lossprune.curvature.outputs import SoftmaxCrossEntropy, rademacher
from lossprune.selection import prunable_parameters
from tests.hf_models import transformers

DTYPE = torch.float64
EXAMPLES, LENGTH, VOCAB = 3, 5, 16


def micro_gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=8, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def micro_llama():
    """Grouped-query attention: two query heads share one key/value head."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        max_position_embeddings=LENGTH, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def micro_bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=LENGTH, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _batch(name: str) -> dict:
    """Padded rows (attention_mask 0, labels -100); BERT ignores a whole example."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    if name == "bert":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([2, -100, 0])}
    labels = ids.clone()
    labels[0, -2:] = -100
    labels[2, 2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


BUILDERS = {"gpt2": micro_gpt2, "llama": micro_llama, "bert": micro_bert}


def _setup(name: str):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval().to(DTYPE)
    params = {k: v.detach() for k, v in prunable_parameters(model).items()}
    return model, params, _batch(name)


def _per_example_jacobians(model, params, batch):
    """Per example: its logits ``(C, D)`` in the loss's layout and their dense Jacobians."""
    loss = model_loss(model)
    labels = loss.targets(batch["labels"])
    constants = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    for n in range(len(labels)):
        row = {k: v[n : n + 1] for k, v in batch.items() if k != "labels"}

        def logits_of(p, row=row):
            with sdpa_kernel(SDPBackend.MATH):
                out = functional_call(model, {**constants, **p}, (), row)
            logits = loss.read(out)[0]
            return logits.reshape(logits.shape[0], -1)  # (C, D)

        logits = logits_of(params).detach()
        yield logits, jacrev(logits_of)(params), labels[n].reshape(-1)


def _kept_units(model, batch) -> int:
    labels = model_loss(model).targets(batch["labels"])
    return int((labels != -100).sum())


def reference_fisher(model, params, batch):
    r""":math:`\sum_n \sum_d \operatorname{diag}(J_{nd}^\top (\operatorname{diag}p - pp^\top)
    J_{nd}) / Z` over the kept units, one example (a batch of one) at a time."""
    z = _kept_units(model, batch)
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for logits, jac, labels in _per_example_jacobians(model, params, batch):
        for d in range(logits.shape[1]):
            if int(labels[d]) == -100:
                continue
            p = logits[:, d].softmax(0)
            hessian = (torch.diag(p) - torch.outer(p, p)) / z
            for k in params:
                j = jac[k][:, d].reshape(len(p), -1)
                total[k] += ((hessian @ j) * j).sum(0).view_as(params[k])
    return total


def reference_fisher_mc(model, params, batch, labels_drawn, samples):
    r""":math:`\sum_n \sum_j (J_n^\top z_{nj})^2`, :math:`z = (e_y - p)/\sqrt{Zk}` per kept unit."""
    z_units = _kept_units(model, batch)
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    draws = iter(labels_drawn)
    for logits, jac, labels in _per_example_jacobians(model, params, batch):
        if bool((labels == -100).all()):
            continue
        drawn = next(draws)  # (D, k): the labels sampled for this example's units
        p = logits.softmax(0)  # (C, D)
        for j in range(samples):
            one_hot = torch.nn.functional.one_hot(drawn[:, j], p.shape[0]).T.to(DTYPE)
            column = (one_hot - p) * (labels != -100) / (z_units * samples) ** 0.5
            for k in params:
                g = (jac[k] * column.reshape(*column.shape, *([1] * params[k].dim()))).sum((0, 1))
                total[k] += g * g
    return total


def reference_loss_and_grad(model, params, batch):
    def loss_of(p):
        constants = {k: v.detach() for k, v in model.named_parameters() if k not in p}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with sdpa_kernel(SDPBackend.MATH):
            out = functional_call(model, {**constants, **p}, (), inputs)
        loss = model_loss(model)
        return loss(loss.read(out), loss.targets(batch["labels"]))

    grad = torch.func.grad(loss_of)(params)
    return loss_of(params), grad


def close(actual, expected, rtol=1e-7):
    for k in expected:
        scale = float(expected[k].abs().max())
        torch.testing.assert_close(actual[k], expected[k], rtol=rtol, atol=rtol * scale)


def tolerance(name: str) -> float:
    """Llama's RMSNorm computes in float32 whatever the model's dtype, so two exact ways of
    differentiating it agree to float32's precision only."""
    return 1e-5 if name == "llama" else 1e-7


@pytest.mark.filterwarnings("ignore:the exact Fisher:RuntimeWarning")
@pytest.mark.parametrize("fast", [True, False], ids=["batched layers", "one by one"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_exact_fisher_of_dict_batches_is_the_per_example_loop(name, fast):
    model, params, batch = _setup(name)
    expected = reference_fisher(model, params, batch)
    close(fisher_diag(model, params, batch, None, fast=fast), expected, tolerance(name))
    # The memory option bounds the columns pulled back at once (here half a token's), not the
    # numbers.
    close(fisher_diag(model, params, batch, None, chunk_size=5, fast=fast), expected,
          tolerance(name))  # fmt: skip


def recording_labels(monkeypatch) -> list[Tensor]:
    """The labels every sampling draws, per example with a counted unit: ``(D, k)`` each."""
    drawn: list[Tensor] = []
    sample_columns = SoftmaxCrossEntropy.sample_columns

    def recording(self, samples, generator):
        columns = sample_columns(self, samples, generator)  # (N, C * D, k): sqrt(c/k)(e_y - p)
        classes = self.probs.shape[1]
        for example in columns:
            if bool(example.any()):  # an example whose units are all ignored has no column
                drawn.append(example.reshape(classes, -1, samples).argmax(0))  # y: (D, k)
        return columns

    monkeypatch.setattr(SoftmaxCrossEntropy, "sample_columns", recording)
    return drawn


@pytest.mark.parametrize("fast", [True, False], ids=["batched layers", "one by one"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_fisher_mc_of_dict_batches_is_the_per_example_loop_with_the_same_labels(
    name, fast, monkeypatch
):
    model, params, batch = _setup(name)
    drawn = recording_labels(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    estimate = fisher_diag_mc(model, params, batch, None, samples=2, generator=generator,
                              fast=fast)  # fmt: skip
    assert len(drawn) == sum(1 for n in batch["labels"] if bool((n != -100).any()))
    close(estimate, reference_fisher_mc(model, params, batch, drawn, samples=2), tolerance(name))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_hutchinson_of_dict_batches_is_the_mean_of_its_probes_products(name):
    model, params, batch = _setup(name)
    estimate = hutchinson_diag(
        model, params, batch, None, probes=3, generator=torch.Generator().manual_seed(0)
    )
    generator = torch.Generator().manual_seed(0)
    probes = {k: rademacher((3, *p.shape), p, generator) for k, p in params.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    _, grad = reference_loss_and_grad(model, leaves, batch)
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    for j in range(3):
        hz = torch.autograd.grad(
            list(grad.values()), list(leaves.values()), [probes[k][j] for k in params],
            retain_graph=True,
        )  # fmt: skip
        for k, h in zip(params, hz, strict=True):
            expected[k] += probes[k][j] * h / 3
    close(estimate, expected, tolerance(name))


def one_by_one(monkeypatch) -> None:
    """Keyword inputs take the one-example-at-a-time path (as when no layer is covered)."""
    monkeypatch.setattr(diagonals, "_keyword_layers_pass", lambda *args: None)


@pytest.mark.parametrize("path", ["batched layers", "one by one"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_statistics_pass_fuses_the_loss_and_gradient_into_the_fisher_pass(
    name, path, monkeypatch
):
    """Batched layers: ONE forward pass of the batch with its graph gives the squares, the loss
    and the gradient, plus the last example alone (without a graph) for the coupling check; one
    by one: each example's graph gives its squares, its loss and its gradient."""
    model, params, batch = _setup(name)
    if path == "one by one":
        one_by_one(monkeypatch)
    calls = []
    original = FunctionalModel.__call__

    def counting(self, p, inputs):
        calls.append(len(inputs.kwargs["input_ids"]))
        return original(self, p, inputs)

    monkeypatch.setattr(FunctionalModel, "__call__", counting)
    monkeypatch.setattr(statistics, "loss_and_grad", lambda *a: pytest.fail("a gradient pass"))
    stats = compute_statistics(
        model, params, batch, None, [Statistic("fisher_mc", 1)],
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    kept = sum(1 for n in batch["labels"] if bool((n != -100).any()))
    # The first batch's probe on two of its examples (lossprune._common.probe), without a
    # graph: their outputs, and the model's own loss to check ModelLoss against.
    probe = [PROBED_EXAMPLES] * 2
    if path == "one by one":
        assert calls == probe + [1] * kept
    else:
        assert calls == probe + [EXAMPLES, 1]
    monkeypatch.undo()
    loss, grad = reference_loss_and_grad(model, params, batch)
    torch.testing.assert_close(torch.tensor(stats.loss, dtype=DTYPE), loss)
    close(stats.grad, grad, tolerance(name))
    close(stats.grad, loss_and_grad(model, params, batch).grad, tolerance(name))


def test_the_memory_option_bounds_the_columns_pulled_back_at_once(monkeypatch):
    model, params, batch = _setup("gpt2")
    one_by_one(monkeypatch)
    widths = []
    pull_back = per_example._pull_back

    def recording(flat, leaves, block):
        widths.append(block.shape[1])
        return pull_back(flat, leaves, block)

    monkeypatch.setattr(per_example, "_pull_back", recording)
    for chunk_size in (1, 2):
        widths.clear()
        fisher_diag_mc(model, params, batch, None, samples=3, chunk_size=chunk_size)
        compute_statistics(model, params, batch, None, [Statistic("fisher_mc", 3)],
                           chunk_size=chunk_size)  # fmt: skip
        assert max(widths) == chunk_size


def test_the_memory_option_bounds_the_batched_layers_per_example_gradients(monkeypatch):
    """``chunk_size=c``: at most c parameter-sized per-example gradients (numbers of all
    differentiated parameters) exist at once in the squared contractions and in the
    back-propagated columns; the numbers do not change."""
    model, params, batch = _setup("gpt2")
    size = sum(p.numel() for p in params.values())
    expected = fisher_diag_mc(model, params, batch, None, samples=3,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    blocks = []
    einsum = torch.einsum

    def recording(*args):
        out = einsum(*args)
        blocks.append(out.numel())
        return out

    monkeypatch.setattr(torch, "einsum", recording)
    for chunk_size in (1, 2):
        blocks.clear()
        estimate = fisher_diag_mc(model, params, batch, None, samples=3, chunk_size=chunk_size,
                                  generator=torch.Generator().manual_seed(0))  # fmt: skip
        close(estimate, expected, 1e-12)
        assert blocks and max(blocks) <= chunk_size * size
    blocks.clear()
    fisher_diag_mc(model, params, batch, None, samples=3)
    largest = max(p.numel() for p in params.values())
    assert max(blocks) == EXAMPLES * 3 * largest > size  # by default, the whole batch at once
