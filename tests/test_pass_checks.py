"""A gradient, or reverse-over-reverse Hessian-vector products, of a batch nobody probed yet make
the first batch's checks on their own forward pass (lossprune._common.probe.PassCheck): a causal
LM runs one forward pass in all, another model adds only its own loss's two-example reference,
and every refusal of the probe still happens, before anything is computed where it can be."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lossprune import ModelLoss
from lossprune._common.functional import default_generator_states
from lossprune.curvature import hvp, loss_and_grad
from lossprune.curvature.products import prepare
from tests.hf_models import VOCAB, tiny_bert, tiny_llama, transformers
from tests.test_probe import _calls  # the number of examples of every forward pass


def _tokens(examples=5, length=8, seed=0):
    ids = torch.randint(0, VOCAB, (examples, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _vectors(params, k, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn((k, *p.shape), generator=generator, dtype=p.dtype)
        for name, p in params.items()
    }


def _double(model):
    return model.double(), {k: p.detach() for k, p in model.named_parameters()}


@pytest.mark.parametrize("k", [1, 3])
def test_a_causal_lm_runs_one_forward_pass_and_gives_the_probed_numbers(monkeypatch, k):
    model, params = _double(tiny_llama())
    batch, vectors = _tokens(), _vectors(params, k)
    loss_fn, ready = prepare(model, None, batch)  # probed beforehand: the reference numbers
    expected = hvp(model, params, ready, loss_fn, vectors)
    expected_grad = loss_and_grad(model, params, ready, loss_fn)
    rows = _calls(monkeypatch)
    got = hvp(model, params, batch, None, vectors)
    assert rows == [5]  # the pass itself, with the labels: nothing else
    rows.clear()
    got_grad = loss_and_grad(model, params, batch)
    assert rows == [5]
    for name in params:
        assert torch.equal(got.products[name], expected.products[name])
        assert torch.equal(got.grad[name], expected.grad[name])
        assert torch.equal(got_grad.grad[name], expected_grad.grad[name])
    assert torch.equal(got.loss, expected.loss) and torch.equal(got_grad.loss, expected.loss)
    torch.testing.assert_close(got.loss, model(**batch).loss.double())  # it upcasts to float32


def test_a_classifier_keeps_only_the_two_example_reference_and_a_tensor_model_none(monkeypatch):
    model, params = _double(tiny_bert())
    ids = _tokens()["input_ids"]
    batch = {"input_ids": ids, "labels": torch.arange(5) % 3}
    rows = _calls(monkeypatch)
    got = loss_and_grad(model, params, batch)
    assert rows == [5, 2]  # the pass, then the model's own loss on two examples
    torch.testing.assert_close(got.loss, model(**batch).loss)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    rows.clear()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    loss_and_grad(mlp, dict(mlp.named_parameters()), (x, y), nn.CrossEntropyLoss())
    hvp(mlp, dict(mlp.named_parameters()), (x, y), nn.CrossEntropyLoss(),
        _vectors(dict(mlp.named_parameters()), 2))  # fmt: skip
    assert rows == [6, 6]


def test_labels_outside_the_vocabulary_are_refused_before_any_forward_pass(monkeypatch):
    model, params = _double(tiny_llama())
    batch = _tokens()
    batch["labels"] = batch["labels"].clone()
    batch["labels"][4, 2] = VOCAB + 3  # the model's own loss would index past its logits
    rows = _calls(monkeypatch)
    for call in (
        lambda: loss_and_grad(model, params, batch),
        lambda: hvp(model, params, batch, None, _vectors(params, 1)),
    ):
        with pytest.raises(ValueError, match=f"labels hold {VOCAB + 3}, outside the {VOCAB}"):
            call()
    assert rows == []


def test_labels_of_another_length_get_the_probes_message_not_the_models_error():
    model, params = _double(tiny_llama())
    batch = _tokens()
    batch["labels"] = batch["labels"][:, :-1]  # the model's own loss fails inside the pass
    with pytest.raises(ValueError, match="reads targets of shape \\(5, 6\\) from the labels"):
        loss_and_grad(model, params, batch)


def test_a_model_whose_loss_adds_a_term_is_refused_from_the_pass_itself():
    """Mixtral with output_router_logits adds its router's auxiliary loss to the cross-entropy."""
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
        num_experts_per_tok=1, output_router_logits=True, router_aux_loss_coef=0.5,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(config).eval()  # its grouped experts: float32
    params = {k: p.detach() for k, p in model.named_parameters() if k.endswith("proj.weight")}
    for call in (
        lambda: loss_and_grad(model, params, _tokens()),
        lambda: hvp(model, params, _tokens(), None, _vectors(params, 1)),
    ):
        with pytest.raises(ValueError, match="computes a loss of .* but ModelLoss\\('causal_lm'"):
            call()


def test_a_loss_that_wraps_the_models_own_is_compared_through_the_loss_it_wraps():
    model, params = _double(tiny_llama())
    got = loss_and_grad(model, params, _tokens(), _Plus(1.0))
    torch.testing.assert_close(got.loss, model(**_tokens()).loss.double() + 1.0)


class _Plus:
    """The model's own loss plus a constant: a loss_fn that wraps a ModelLoss (as GraSP's)."""

    def __init__(self, constant):
        self.loss_fn = ModelLoss("causal_lm")
        self.constant = constant

    def __call__(self, outputs, targets):
        return self.loss_fn(outputs, targets) + self.constant


class PrivateDropout(nn.Module):
    """Dropout drawn from a generator of its own: the default generators never move."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        keep = torch.rand(x.shape, generator=self.generator, dtype=x.dtype) > 0.5
        return self.layer(x * keep)


def test_draws_from_a_private_generator_are_still_seen():
    model = PrivateDropout().double()
    assert default_generator_states(model) is None
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="draws random numbers \\(aten.rand"):
        loss_and_grad(model, dict(model.named_parameters()), (x, y), nn.CrossEntropyLoss())


def test_the_default_generator_states_move_with_every_draw():
    model = nn.Linear(2, 2)
    before = default_generator_states(model)
    assert before is not None
    torch.rand(1)
    after = default_generator_states(model)
    assert after is not None and not torch.equal(before[0], after[0])


class DrawsOnLargeBatches(nn.Module):
    """Draws only for batches of more than two examples: the probe's rerun cannot name it."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        noise = torch.rand(x.shape, dtype=x.dtype) if len(x) > 2 else torch.zeros_like(x)
        return self.layer(x + noise)


def test_a_draw_the_probe_does_not_repeat_is_refused_all_the_same():
    model = DrawsOnLargeBatches().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    message = "draws random numbers \\(the default random generator advanced during the pass\\)"
    params = dict(model.named_parameters())
    for call in (
        lambda: loss_and_grad(model, params, (x, y), nn.CrossEntropyLoss()),
        lambda: hvp(model, params, (x, y), nn.CrossEntropyLoss(), _vectors(params, 1)),
    ):
        with pytest.raises(ValueError, match=message):
            call()
