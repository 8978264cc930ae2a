"""Compensation updates against dense float64 solves; auto_lam; layer-collapse detection."""

import copy

import pytest
import torch
from torch import nn

from lossprune import (
    OBD,
    Compensation,
    ExponentialSchedule,
    LayerCollapseError,
    LayerCollapseWarning,
    LinearSchedule,
    Magnitude,
    Pruner,
    QuadraticModel,
)
from lossprune.pruning.updates import CGResult, compensation_step, trust_region_step
from tests import brute_force as bf
from tests.conftest import make_mlp

CE = nn.CrossEntropyLoss()


def dense_ggn(model, params, inputs, targets):
    theta = bf.flatten(params)

    def outputs(t):
        return bf.outputs_at(model, bf.unflatten(t, params), inputs)

    jac = torch.func.jacrev(outputs)(theta)  # (N, C, P)
    p = outputs(theta).softmax(1)
    h_out = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / len(inputs)


def split_masks(params, fraction_pruned=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    newly = {
        k: torch.rand(p.shape, generator=generator) < fraction_pruned for k, p in params.items()
    }
    return {k: ~m for k, m in newly.items()}, newly


@pytest.mark.parametrize("curvature,lam", [("ggn", 1e-2), ("ggn", 1.0), ("hessian", 5.0)])
def test_compensation_matches_dense_solve(curvature, lam):
    model = make_mlp()
    batch = (torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,)))
    params = bf.weights(model)
    kept, newly = split_masks(params)
    theta = bf.flatten(params)
    k_mask, p_mask = bf.flatten(kept), bf.flatten(newly)
    g = bf.gradient(model, params, *batch, CE)
    if curvature == "ggn":
        c = dense_ggn(model, params, *batch)
    else:
        c = bf.dense_hessian(model, params, *batch, CE)
    a = (c + lam * torch.eye(len(theta)))[k_mask][:, k_mask]
    assert torch.linalg.eigvalsh(a).min() > 0  # the dense problem is well posed
    rhs = -g[k_mask] + c[k_mask][:, p_mask] @ theta[p_mask]
    expected = torch.zeros_like(theta)
    expected[k_mask] = torch.linalg.solve(a, rhs)
    expected[p_mask] = -theta[p_mask]

    delta, result = compensation_step(
        model,
        params,
        kept,
        newly,
        batch,
        CE,
        lam=lam,
        curvature=curvature,
        max_iters=500,
        tol=1e-12,
    )
    torch.testing.assert_close(bf.flatten(delta), expected, atol=1e-8, rtol=1e-6)
    assert result.residual <= 1e-10 and not result.negative_curvature
    assert result.iterations <= int(k_mask.sum()) + 1


def test_compensation_minimises_the_quadratic_model():
    model = make_mlp()
    batch = (torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,)))
    params = bf.weights(model)
    kept, newly = split_masks(params, seed=1)
    lam = 0.1
    g = bf.gradient(model, params, *batch, CE)
    c = dense_ggn(model, params, *batch)

    def model_value(d):
        return float(g @ d + 0.5 * d @ (c + lam * torch.eye(len(d))) @ d)

    delta, _ = compensation_step(
        model, params, kept, newly, batch, CE, lam=lam, max_iters=500, tol=1e-12
    )
    best = bf.flatten(delta)
    zero = bf.flatten({k: torch.where(newly[k], -params[k], 0) for k in params})
    assert model_value(best) < model_value(zero)
    k_mask = bf.flatten(kept)
    for _ in range(5):  # any other step on K with the same pruned part is worse
        other = best.clone()
        other[k_mask] += 1e-3 * torch.randn(int(k_mask.sum()), dtype=torch.float64)
        assert model_value(other) > model_value(best)


def test_negative_curvature_stops_cg_safely():
    # Loss with an indefinite Hessian in the kept direction: CG must stop and report it.
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Tanh(), nn.Linear(2, 2, bias=False))
    model = model.double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, -1.0], [0.5, 3.0]]))
        model[2].weight.copy_(torch.tensor([[1.5, -2.0], [-1.0, 2.5]]))
    batch = (torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64), torch.tensor([0, 1]))
    params = bf.weights(model)
    h = bf.dense_hessian(model, params, *batch, CE)
    assert torch.linalg.eigvalsh(h).min() < 0
    kept = {k: torch.ones_like(p, dtype=torch.bool) for k, p in params.items()}
    kept["2.weight"][0, 0] = False
    newly = {k: ~m for k, m in kept.items()}
    delta, result = compensation_step(
        model,
        params,
        kept,
        newly,
        batch,
        CE,
        lam=0.0,
        curvature="hessian",
        max_iters=50,
        tol=1e-14,
    )
    assert result.negative_curvature
    assert all(torch.isfinite(d).all() for d in delta.values())
    assert delta["2.weight"][0, 0] == -params["2.weight"][0, 0]


def trained_mlp_and_data():
    torch.manual_seed(0)
    inputs = torch.randn(120, 6, dtype=torch.float64)
    targets = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0.5).long()
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(150):
        optimizer.zero_grad()
        CE(model(inputs), targets).backward()
        optimizer.step()
    return model, (inputs, targets)


def test_pruner_compensate_reports_cg_and_keeps_exact_zeros():
    model, data = trained_mlp_and_data()
    before = copy.deepcopy(model)
    pruner = Pruner(
        model,
        QuadraticModel(1e-3),
        ExponentialSchedule(0.8, 3),
        loss_fn=CE,
        data=data,
        update=Compensation(lam=0.5, cg_iters=8),
        diagnostics=True,
    )
    total = sum(p.numel() for p in pruner.params.values())
    for report in pruner.run():
        assert report.compensated and report.update_lam == 0.5
        assert 1 <= report.cg_iterations <= 8 and report.cg_residual >= 0
        assert report.cg_negative_curvature is False
        assert report.loss_after is not None and report.predicted_delta is not None
    assert pruner.num_pruned() == round(0.8 * total)
    for name, param in pruner.params.items():
        assert (param[~pruner.masks[name]] == 0).all()
    moved = [
        (
            pruner.params[k][pruner.masks[k]] != dict(before.named_parameters())[k][pruner.masks[k]]
        ).any()
        for k in pruner.params
    ]
    assert any(moved)  # kept weights were compensated


def test_compensation_resume_is_identical():
    def make():
        model, data = trained_mlp_and_data()
        pruner = Pruner(
            model,
            QuadraticModel(1e-3),
            ExponentialSchedule(0.8, 4),
            loss_fn=CE,
            data=data,
            update=Compensation(lam=1e-3, auto_lam=True),
        )
        return model, pruner

    model_a, straight = make()
    straight.run()
    model_b, first = make()
    first.step()
    first.step()
    saved_model, saved = copy.deepcopy(model_b.state_dict()), first.state_dict()
    model_c, resumed = make()
    model_c.load_state_dict(saved_model)
    resumed.load_state_dict(saved)
    resumed.run()
    for name in straight.masks:
        assert torch.equal(straight.masks[name], resumed.masks[name])
    for (name, a), b in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_auto_lam_never_does_worse_than_zeroing_on_the_scoring_data():
    base, data = trained_mlp_and_data()
    losses = {}
    for update in ("zero", "compensate"):
        model = copy.deepcopy(base)
        pruner = Pruner(
            model,
            QuadraticModel(1e-3),
            LinearSchedule(0.6, 1),
            loss_fn=CE,
            data=data,
            update=Compensation(lam=1e-4, auto_lam=True) if update == "compensate" else None,
        )
        losses[update] = pruner.step()
    assert losses["compensate"].loss_after <= losses["zero"].loss_after + 1e-12
    report = losses["compensate"]
    assert report.update_lam >= 1e-4 if report.compensated else report.update_lam is None


def test_trust_region_accepts_enough_improvement_and_falls_back_otherwise():
    zero = {"w": torch.zeros(3)}
    options = Compensation(lam=1e-3, auto_lam=True, auto_lam_tol=0.5, auto_lam_tries=3)
    tried = []

    def solve(lam):
        tried.append(lam)
        return {"w": torch.full((3,), 1.0 / lam)}, CGResult(2, 0.0, False)

    def model_change(delta):  # the model predicts an improvement proportional to the step
        return -float(delta["w"].sum())

    # Measured improvement better than predicted: accepted at once (ratio > 1 is welcome).
    delta, result, lam, accepted = trust_region_step(
        solve, model_change, lambda d: 2 * model_change(d), zero, 1e-3, options
    )
    assert accepted and lam == 1e-3 and result.iterations == 2 and tried == [1e-3]
    # Only a tenth of the predicted improvement until λ >= 0.1: two increases, iterations add up.
    tried.clear()

    def measured(d):
        return model_change(d) * (1.0 if d["w"][0] <= 10 else 0.1)

    delta, result, lam, accepted = trust_region_step(
        solve, model_change, measured, zero, 1e-3, options
    )
    assert accepted and lam == pytest.approx(0.1) and result.iterations == 6
    assert tried == pytest.approx([1e-3, 1e-2, 1e-1])
    # A step that always makes the loss worse: fall back to the zero step after the tries.
    delta, result, lam, accepted = trust_region_step(
        solve, model_change, lambda d: abs(model_change(d)), zero, 1e-3, options
    )
    assert not accepted and delta is zero and result.iterations == 2 * (options.auto_lam_tries + 1)


def test_compensation_options_are_validated():
    model, data = trained_mlp_and_data()
    common = {"loss_fn": CE, "data": data}
    with pytest.raises(TypeError, match="update must be None or a lossprune.Compensation"):
        Pruner(model, Magnitude(), LinearSchedule(0.5, 1), update="compensate", **common)
    for shortcut in ("update_lam", "curvature", "cg_iters", "cg_tol", "auto_lam"):
        with pytest.raises(TypeError, match=shortcut):  # the shortcut keywords are gone
            Pruner(model, Magnitude(), LinearSchedule(0.5, 1), **{shortcut: 1}, **common)
    with pytest.raises(ValueError, match="lam"):
        Compensation(lam=-1.0)
    with pytest.raises(TypeError, match="cg_iters"):
        Compensation(cg_iters=2.5)
    with pytest.raises(ValueError, match="auto_lam"):
        Compensation(lam=0.0, auto_lam=True)
    with pytest.raises(ValueError, match="lam must be at most"):
        Compensation(lam=1e39)  # ½·λ would overflow float32
    with pytest.raises(ValueError, match="data"):
        Pruner(model, Magnitude(), LinearSchedule(0.5, 1), update=Compensation())
    assert (
        Pruner(
            model, Magnitude(), LinearSchedule(0.5, 1), update=Compensation(lam=2.0), **common
        ).compensation.lam
        == 2.0
    )


def collapsing_model():
    """Magnitude pruning to 70% in one stage empties the tiny last layer of this network."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    return model, (torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 3, (30,)))


def test_layer_collapse_warns_names_the_layer_or_raises():
    model, data = collapsing_model()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.7, 1), loss_fn=CE, data=data)
    with pytest.warns(LayerCollapseWarning, match="2.weight"):
        pruner.step()
    assert not pruner.masks["2.weight"].any()

    model, data = collapsing_model()
    weights = copy.deepcopy(model.state_dict())
    pruner = Pruner(
        model, Magnitude(), LinearSchedule(0.7, 1), loss_fn=CE, data=data, on_collapse="raise"
    )
    with pytest.raises(LayerCollapseError, match="2.weight"):
        pruner.step()
    assert pruner.stage == 0
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_min_density_prevents_the_collapse():
    model, data = collapsing_model()
    pruner = Pruner(
        model, Magnitude(), LinearSchedule(0.7, 1), loss_fn=CE, data=data, min_density=0.05
    )
    # No layer is emptied, but its 3 kept weights (ceil(0.05 * 60)) cannot reach all 3 classes.
    with pytest.warns(LayerCollapseWarning) as caught:
        report = pruner.step()
    assert report.layer_density["2.weight"] >= 0.05
    assert not any("prunes every weight" in str(w.message) for w in caught)
    assert report.disconnected_outputs == 3 - int(pruner.masks["2.weight"].any(1).sum())
    with pytest.raises(ValueError, match="on_collapse"):
        Pruner(model, OBD(), LinearSchedule(0.7, 1), loss_fn=CE, data=data, on_collapse="panic")
