"""A forward pass that draws random numbers is refused before scoring, whatever draws them:
dropout modules, dropout written as a function call, attention dropout (issue 18). A model that
is only in training mode, but draws nothing, is scored; Magnitude never runs the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lossprune import (
    LinearModel,
    LinearSchedule,
    Magnitude,
    Pruner,
    QuadraticModel,
    SynFlow,
    scores,
)
from lossprune.curvature import loss_and_grad
from tests.hf_models import transformers

V = 16
MESSAGE = "the model's forward pass draws random numbers \\(aten.bernoulli_.float in module "


def opt(dropout=0.1):
    """OPT writes its dropout as nn.functional.dropout(..., training=self.training)."""
    config = transformers.OPTConfig(
        vocab_size=V, hidden_size=8, num_hidden_layers=1, ffn_dim=8, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=8, dropout=dropout,
        attention_dropout=0.0, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(config).double()


def llama(attention_dropout=0.1, implementation="sdpa"):
    """Llama's only randomness: the dropout_p its attention functions are handed in training."""
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        attention_dropout=attention_dropout, attn_implementation=implementation,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double()


def batch():
    ids = torch.randint(2, V, (3, 6), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(before, model):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


BUILDERS = [
    pytest.param(opt, "model.decoder.layers.0", id="opt-functional-dropout"),
    pytest.param(llama, "model.layers.0.self_attn", id="llama-sdpa-attention-dropout"),
    pytest.param(
        lambda: llama(implementation="eager"),
        "model.layers.0.self_attn",
        id="llama-eager-attention-dropout",
    ),  # fmt: skip
]


@pytest.mark.parametrize("build,module", BUILDERS)
def test_functional_dropout_in_training_mode_is_refused_before_scoring(build, module):
    model = build().train()
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    before = state(model)
    pruner = Pruner(model, QuadraticModel(lam=1e-3), LinearSchedule(0.5, 1), data=batch())
    with pytest.raises(ValueError, match=MESSAGE + f"'{module}'.*Call model.eval\\(\\)"):
        pruner.step()
    assert same(before, model) and pruner.stage == 0
    with pytest.raises(ValueError, match=MESSAGE):
        scores(model, LinearModel(), batch())
    params = {k: p.detach() for k, p in model.named_parameters() if k.endswith("proj.weight")}
    with pytest.raises(ValueError, match=MESSAGE):
        loss_and_grad(model, params, batch())


@pytest.mark.parametrize("build,module", BUILDERS)
def test_eval_mode_when_asked_for_gives_the_eval_mode_scores(build, module):
    model = build().train()
    pruner = Pruner(model, LinearModel(), LinearSchedule(0.5, 1), data=batch(), eval_mode=True)
    pruner.step()
    assert all(m.training for m in model.modules())  # its mode restored
    reference = build().eval()
    expected = Pruner(reference, LinearModel(), LinearSchedule(0.5, 1), data=batch())
    expected.step()
    assert all(torch.equal(pruner.masks[k], expected.masks[k]) for k in expected.masks)


def test_a_training_mode_model_that_draws_nothing_is_scored_as_in_eval_mode():
    model = opt(dropout=0.0).train()
    expected = scores(opt(dropout=0.0).eval(), LinearModel(), batch())
    actual = scores(model, LinearModel(), batch())
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_magnitude_without_data_does_not_care_about_training_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1))
    pruner.step()
    assert pruner.sparsity() == 0.5
    assert set(scores(model, Magnitude())) == {"0.weight", "3.weight"}
    # with data and diagnostics it runs the model, so the model's mode matters again
    data = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1), data=data,
                    loss_fn=nn.CrossEntropyLoss())  # fmt: skip
    with pytest.raises(ValueError, match="is in training mode"):
        pruner.step()


class NoisyNet(nn.Module):
    """Noise drawn in forward whatever the mode: no eval() can help."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.inp(x) + 0.1 * torch.randn_like(x))


def test_data_free_diagnostics_and_synflow_see_random_draws_too():
    model = NoisyNet().eval()
    data = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    before = state(model)
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1), data=data,
                    loss_fn=nn.CrossEntropyLoss())  # fmt: skip
    with pytest.raises(ValueError, match="randn_like.* in it, .*Make its forward pass determ"):
        pruner.step()
    with pytest.raises(ValueError, match="draws random numbers"):
        scores(model, SynFlow(input_shape=(4,)))
    assert same(before, model)
