"""The first batch's probe (lossprune._common.probe) runs two of its examples, not the whole batch,
and still sees what it must: random draws, labels of the whole batch, the model's own loss; it
falls back to the whole batch where examples are not in dim 0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lossprune import LinearModel, ModelLoss, scores
from lossprune._common.functional import FunctionalModel
from lossprune._common.probe import PROBED_EXAMPLES, probe_first_batch
from tests.hf_models import tiny_llama
from tests.test_random_forward import opt

V = 16


def _calls(monkeypatch):
    rows = []
    original = FunctionalModel.__call__

    def counting(self, params, inputs):
        first = inputs if isinstance(inputs, torch.Tensor) else inputs.kwargs["input_ids"]
        rows.append(len(first))
        return original(self, params, inputs)

    monkeypatch.setattr(FunctionalModel, "__call__", counting)
    return rows


def test_two_examples_are_probed_and_random_draws_are_still_seen(monkeypatch):
    ids = torch.randint(2, V, (8, 6), generator=torch.Generator().manual_seed(0))
    rows = _calls(monkeypatch)
    probe_first_batch(
        opt(dropout=0.0).eval(), ModelLoss("causal_lm"), {"input_ids": ids, "labels": ids}
    )
    assert rows == [PROBED_EXAMPLES] * 2  # its outputs, and the model's own loss
    monkeypatch.undo()
    with pytest.raises(ValueError, match="draws random numbers"):
        probe_first_batch(opt().train(), ModelLoss("causal_lm"), {"input_ids": ids, "labels": ids})


def test_labels_of_every_example_are_checked_not_only_the_probed_ones():
    ids = torch.randint(2, V, (6, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[5, 3] = V + 4  # outside the vocabulary, in an example the probe does not run
    with pytest.raises(ValueError, match=f"labels hold {V + 4}, outside the {V} classes"):
        probe_first_batch(opt(dropout=0.0).eval(), ModelLoss("causal_lm"),
                          {"input_ids": ids, "labels": labels})  # fmt: skip


def test_first_examples_without_a_counted_label_are_skipped_and_all_ignored_is_no_mismatch():
    model = tiny_llama().eval()
    ids = torch.randint(2, 64, (5, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:3] = -100  # the first three examples count nothing
    probe = probe_first_batch(model, ModelLoss("causal_lm"), {"input_ids": ids, "labels": labels})
    assert (probe.targets != -100).any()  # examples 3 and 4 were probed
    nothing = torch.full_like(ids, -100)
    probe_first_batch(model, ModelLoss("causal_lm"), {"input_ids": ids, "labels": nothing})


class SequenceFirst(nn.Module):
    """(T, N, E) inputs, (N, C) outputs: examples in dim 1 of the input."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        return self.layer(x).mean(0)


def test_inputs_with_examples_in_another_dimension_are_probed_whole():
    """T == N (the only sequence-first layout a tensor batch can have: dim 0 must match the
    targets): slicing dim 0 cuts positions, so the probe runs the whole batch."""
    torch.manual_seed(0)
    model = SequenceFirst().double()
    x, y = torch.randn(4, 4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)

    def mse(outputs, targets):  # a plain function: the probe's outputs feed its checks
        return ((outputs - targets) ** 2).mean()

    got = scores(model, LinearModel(), (x, y), loss_fn=mse)
    w = model.layer.weight.detach().clone().requires_grad_(True)
    loss = mse(nn.functional.linear(x, w, model.layer.bias).mean(0), y)
    (grad,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(got["layer.weight"], (grad * w).abs().detach())
