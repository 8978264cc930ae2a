"""The default curvature: exact where cheap, one sampled label per unit where not, and said so."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lossprune import OBD, ExponentialSchedule, Magnitude, Pruner, QuadraticModel, scores
from lossprune.curvature import Statistic, compute_statistics, diagonals, statistics
from lossprune.experiments.presets import PRESETS
from lossprune.experiments.run import PAPER_MC_SAMPLES, make_criterion
from tests.hf_models import transformers

DTYPE = torch.float64


def micro_gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval().to(DTYPE)


def tokens(n: int = 3, t: int = 8) -> dict:
    ids = torch.randint(0, 16, (n, t), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


@pytest.fixture(autouse=True)
def _fresh_announcements():
    statistics._ANNOUNCED.clear()
    diagonals._WARNED_COST.clear()


def test_auto_is_the_exact_fisher_of_a_classifier_and_the_report_says_so(mlp, mlp_batch):
    ce = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to announce: 3 classes cost 3 gradients
        auto = scores(mlp, QuadraticModel(lam=1e-3), mlp_batch, loss_fn=ce)
    exact = scores(mlp, QuadraticModel(lam=1e-3, curvature="fisher"), mlp_batch, loss_fn=ce)
    for k in exact:
        torch.testing.assert_close(auto[k], exact[k], rtol=0, atol=0)
    pruner = Pruner(mlp, QuadraticModel(lam=1e-3), ExponentialSchedule(0.5, 2), loss_fn=ce,
                    data=mlp_batch)  # fmt: skip
    assert pruner.step().curvature == "fisher"


def test_auto_samples_one_label_per_token_for_a_language_model_announced_once():
    model, batch = micro_gpt2(), tokens()  # 7 positions x 16 classes: 112 > 100 gradients
    generator = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match=r"about 112 gradients.*1 sampled label\(s\) per unit"):
        auto = scores(model, QuadraticModel(lam=1e-3), batch, generator=generator)
    mc = scores(model, QuadraticModel(lam=1e-3, curvature="fisher_mc"), batch,
                generator=torch.Generator().manual_seed(0))  # fmt: skip
    for k in mc:
        torch.testing.assert_close(auto[k], mc[k], rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # announced once, not at every stage
        pruner = Pruner(model, QuadraticModel(lam=1e-3), ExponentialSchedule(0.5, 2), data=batch)
        reports = list(pruner.run())
    assert [r.curvature for r in reports] == ["fisher_mc(samples=1)"] * 2
    params = {k: p.detach() for k, p in model.named_parameters() if k.endswith("c_fc.weight")}
    with pytest.warns(UserWarning, match="with 2 sampled label"):
        stats = compute_statistics(model, params, batch, None, [Statistic("fisher_auto", 2)])
    assert stats.resolved[Statistic("fisher_auto", 2)] == Statistic("fisher_mc", 2)
    magnitude = Pruner(model, Magnitude(), ExponentialSchedule(0.5, 1), data=batch)
    assert magnitude.step().curvature is None


def test_the_cost_warning_names_the_users_criterion_with_the_monte_carlo_fisher():
    model, batch = micro_gpt2(), tokens()
    with pytest.warns(RuntimeWarning, match=r"about 112 gradients.*QuadraticModel\(lam=0\.001, "
                      r"curvature='fisher_mc', mc_samples=1"):  # fmt: skip
        scores(model, QuadraticModel(lam=1e-3, curvature="fisher"), batch)
    diagonals._WARNED_COST.clear()
    with pytest.warns(RuntimeWarning, match=r"OBD\(lam=0\.0, curvature='fisher_mc'"):
        scores(model, 0.5 * OBD(curvature="fisher") + Magnitude(), batch)


def test_the_reproduction_keeps_its_statistics():
    """The paper's presets use the exact Fisher; the Monte-Carlo ones keep their 10 labels."""
    for preset in PRESETS.values():
        for name in ("QM", "OBD"):
            criterion = make_criterion(name, 0.1, preset.curvature, (1, 8, 8))
            assert criterion.curvature == preset.curvature != "auto"
            assert criterion.mc_samples == PAPER_MC_SAMPLES
    assert {p.curvature for n, p in PRESETS.items() if n.startswith(("digits", "mnist"))} == {
        "fisher"
    }
