"""Pruner: exact counts, monotone masks, diagnostics against brute force, attach, resume, errors."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from lossprune import (
    OBD,
    ExponentialSchedule,
    GraSP,
    LayerCollapseWarning,
    LinearModel,
    LinearSchedule,
    Magnitude,
    NonFiniteError,
    Pruner,
    QuadraticModel,
    StageReport,
    SynFlow,
)
from lossprune.pruning import _diagnostics as _diag
from tests import brute_force as bf
from tests.conftest import make_cnn, make_mlp

CE = nn.CrossEntropyLoss()


def data(n=40, dtype=torch.float64):
    return torch.randn(n, 6, dtype=dtype), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("schedule_cls", [LinearSchedule, ExponentialSchedule])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize(
    "criterion", [Magnitude(), LinearModel(1e-3), QuadraticModel(1e-3), OBD(1.0)], ids=repr
)
def test_exact_counts_and_monotone_masks(schedule_cls, scope, criterion):
    model = make_mlp()
    schedule = schedule_cls(0.9, 5)
    # 90% of a 62-weight MLP may empty its 12-weight last layer: not what is tested here.
    pruner = Pruner(
        model, criterion, schedule, loss_fn=CE, data=data(), scope=scope, on_collapse="ignore"
    )
    sizes = {k: p.numel() for k, p in pruner.params.items()}
    total = sum(sizes.values())
    previous = {k: m.clone() for k, m in pruner.masks.items()}
    for stage in range(1, len(schedule) + 1):
        report = pruner.step()
        target = schedule.sparsity(stage)
        if scope == "global":
            assert pruner.num_pruned() == round(total * target)
        else:
            for k, m in pruner.masks.items():
                assert int((~m).sum()) == round(sizes[k] * target)
        for k, m in pruner.masks.items():
            assert not (m & ~previous[k]).any(), "a pruned weight came back"
            assert (pruner.params[k][~m] == 0).all()
        assert report.stage == stage and report.target_sparsity == target
        assert report.sparsity == pytest.approx(pruner.sparsity())
        previous = {k: m.clone() for k, m in pruner.masks.items()}
    assert pruner.finished
    with pytest.raises(RuntimeError, match="stages"):
        pruner.step()


def test_report_diagnostics_match_brute_force():
    model = make_mlp()
    batch = data()
    before = {k: v.clone() for k, v in bf.weights(model).items()}
    pruner = Pruner(
        model, QuadraticModel(lam=1e-2), LinearSchedule(0.5, 1), loss_fn=CE, data=batch,
        diagnostics=True,
    )  # fmt: skip
    report = pruner.step()
    after = bf.weights(model)
    theta0, theta1 = bf.flatten(before), bf.flatten(after)
    delta = theta1 - theta0
    g = bf.gradient(model, before, *batch, CE)
    h = bf.dense_hessian(model, before, *batch, CE)
    assert report.step_norm_sq == pytest.approx(float((theta0[theta1 == 0] ** 2).sum()))
    assert report.predicted_delta == pytest.approx(float(g @ delta + 0.5 * delta @ h @ delta))
    assert report.loss_before == pytest.approx(float(bf.mean_loss(model, before, *batch, CE)))
    assert report.loss_after == pytest.approx(float(bf.mean_loss(model, after, *batch, CE)))
    assert report.delta_loss == pytest.approx(report.loss_after - report.loss_before)
    assert report.pruned == int((theta1 == 0).sum())
    assert set(report.layer_density) == set(pruner.params)
    assert "stage 1" in str(report) and report.as_dict()["pruned"] == report.pruned


@pytest.mark.parametrize("criterion", [QuadraticModel(lam=1e-2), Magnitude()])
def test_default_diagnostics_are_the_measured_losses(criterion, monkeypatch):
    """By default a report has the loss before and after the step (brute force), no prediction;
    the loss before is the statistics pass's own (no forward pass of its own) when there was
    one, and Magnitude's, which reads no data, takes one forward pass."""
    from lossprune.pruning import _stage

    model = make_mlp()
    batch = data()
    before = {k: v.clone() for k, v in bf.weights(model).items()}
    passes = []
    monkeypatch.setattr(
        _stage, "mean_loss", lambda *a, **k: passes.append(a[1]) or _diag.mean_loss(*a, **k)
    )
    pruner = Pruner(model, criterion, LinearSchedule(0.5, 1), loss_fn=CE, data=batch)
    report = pruner.step()
    after = bf.weights(model)
    assert report.predicted_delta is None and "predicted" not in str(report)
    assert report.loss_before == pytest.approx(float(bf.mean_loss(model, before, *batch, CE)))
    assert report.loss_after == pytest.approx(float(bf.mean_loss(model, after, *batch, CE)))
    assert len(passes) == (2 if isinstance(criterion, Magnitude) else 1)  # (before,) after


@pytest.mark.parametrize(
    ("value", "error"), [("prediction", ValueError), (1, TypeError), ("yes", ValueError)]
)
def test_diagnostics_argument_is_checked(value, error):
    with pytest.raises(error, match="diagnostics must be None, a bool or 'loss'"):
        Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 1), loss_fn=CE, data=data(),
               diagnostics=value)  # fmt: skip
    with pytest.raises(ValueError, match="diagnostics='loss' needs data and loss_fn"):
        Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 1), diagnostics="loss")


def test_magnitude_matches_torch_global_unstructured_l1():
    model = make_cnn(torch.float32)
    reference = copy.deepcopy(model)
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.7, 1))
    pruner.run()
    targets = [(m, "weight") for m in reference.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(m.weight.numel() for m, _ in targets)
    prune.global_unstructured(
        targets, pruning_method=prune.L1Unstructured, amount=round(0.7 * total)
    )
    expected = [m.weight_mask.bool() for m, _ in targets]
    for mask, ref in zip(pruner.masks.values(), expected):
        assert torch.equal(mask, ref)


def test_parameters_keep_identity_and_state_dict_keys():
    model = make_cnn()
    ids = {k: id(p) for k, p in model.named_parameters()}
    keys = list(model.state_dict())
    Pruner(
        model,
        QuadraticModel(),
        ExponentialSchedule(0.8, 2),
        loss_fn=CE,
        data=(torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))),
    ).run()
    assert {k: id(p) for k, p in model.named_parameters()} == ids
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
    ],
    ids=["sgd-momentum-wd", "adam"],
)
def test_attach_keeps_pruned_weights_exactly_zero(make_optimizer):
    model = make_mlp()
    batch = data()
    optimizer = make_optimizer(model.parameters())
    # Momentum and Adam state built up BEFORE pruning must not move pruned weights either.
    for _ in range(3):
        optimizer.zero_grad()
        CE(model(batch[0]), batch[1]).backward()
        optimizer.step()
    pruner = Pruner(model, LinearModel(), ExponentialSchedule(0.8, 2), loss_fn=CE, data=batch)
    pruner.step()
    handle = pruner.attach(optimizer)
    for step in range(20):
        if step == 10:
            pruner.step()  # later stages are covered by the same hooks
        optimizer.zero_grad()
        CE(model(batch[0]), batch[1]).backward()
        for k, p in pruner.params.items():
            assert (p.grad[~pruner.masks[k]] == 0).all()
        optimizer.step()
        for k, p in pruner.params.items():
            assert (p[~pruner.masks[k]] == 0).all()
            assert (p[pruner.masks[k]] != 0).all()
    handle.remove()
    optimizer.zero_grad()
    CE(model(batch[0]), batch[1]).backward()
    optimizer.step()
    assert any((p[~pruner.masks[k]] != 0).any() for k, p in pruner.params.items())


def test_state_dict_resume_gives_identical_masks():
    def make():
        torch.manual_seed(0)
        model = make_mlp()
        pruner = Pruner(
            model,
            QuadraticModel(1e-3, curvature="fisher_mc", mc_samples=2),
            ExponentialSchedule(0.9, 4),
            loss_fn=CE,
            data=data(60),
            examples=20,
            generator=7,
        )
        return model, pruner

    _, straight = make()
    straight.run()

    model, first = make()
    first.step()
    first.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "pruner": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model2, resumed = make()
    model2.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["pruner"])
    assert resumed.stage == 2
    resumed.run()
    for k in straight.masks:
        assert torch.equal(resumed.masks[k], straight.masks[k])

    state = first.state_dict()
    assert pickle.loads(pickle.dumps(state))["stage"] == 2
    assert copy.deepcopy(state)["stage"] == 2


def test_load_state_dict_rejects_other_configurations():
    model = make_mlp()
    pruner = Pruner(model, LinearModel(), LinearSchedule(0.5, 2), loss_fn=CE, data=data())
    pruner.step()
    state = pruner.state_dict()
    other = Pruner(make_mlp(), LinearModel(), LinearSchedule(0.5, 3), loss_fn=CE, data=data())
    with pytest.raises(ValueError, match="schedule"):
        other.load_state_dict(state)
    other = Pruner(make_mlp(), OBD(), LinearSchedule(0.5, 2), loss_fn=CE, data=data())
    with pytest.raises(ValueError, match="criterion"):
        other.load_state_dict(state)
    with pytest.raises(TypeError):
        pruner.load_state_dict([1, 2])


def test_same_seed_gives_identical_masks():
    def run(seed):
        torch.manual_seed(0)
        pruner = Pruner(
            make_mlp(),
            OBD(curvature="fisher_mc", mc_samples=1),
            ExponentialSchedule(0.9, 3),
            loss_fn=CE,
            data=data(60),
            examples=10,
            generator=seed,
            on_collapse="ignore",  # 1-sample Monte-Carlo OBD on a tiny MLP may empty a layer
        )
        pruner.run()
        return pruner.masks

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_non_finite_loss_raises_and_leaves_model_and_masks_unchanged():
    model = make_mlp()
    pruner = Pruner(model, QuadraticModel(), LinearSchedule(0.9, 3), loss_fn=CE, data=data())
    pruner.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {k: m.clone() for k, m in pruner.masks.items()}
    inputs, targets = data()
    inputs[3, 2] = float("nan")
    pruner.data = (inputs, targets)
    with pytest.raises(NonFiniteError, match="not finite"):
        pruner.step()
    assert pruner.stage == 1
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(m, masks[k]) for k, m in pruner.masks.items())


def test_eval_mode_option_scores_in_eval_and_restores_modes():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 3))
    model = model.double().train()
    stats = copy.deepcopy(model[1].state_dict())
    with pytest.raises(ValueError, match="training mode"):
        Pruner(model, QuadraticModel(), LinearSchedule(0.5, 1), loss_fn=CE, data=data()).step()
    pruner = Pruner(
        model, QuadraticModel(), LinearSchedule(0.5, 1), loss_fn=CE, data=data(), eval_mode=True
    )
    pruner.step()
    assert all(m.training for m in model.modules())
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, stats[k])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"model": "net"}, TypeError, "model"),
        ({"criterion": "qm"}, TypeError, "criterion"),
        ({"schedule": [0.5]}, TypeError, "schedule"),
        ({"scope": "per-layer"}, ValueError, "scope"),
        ({"examples": 0}, ValueError, "examples"),
        ({"examples": 2.5}, TypeError, "examples"),
        ({"examples": 1000}, None, None),
        ({"min_density": 1.0}, ValueError, "min_density"),
        ({"include": "nothing.matches"}, ValueError, "nothing.matches"),
        ({"data": []}, None, None),
        ({"data": torch.zeros(3)}, TypeError, "data"),
        ({"data": iter([])}, TypeError, "re-iterable"),
        ({"loss_fn": None}, ValueError, "loss_fn"),
        ({"loss_fn": 3}, TypeError, "loss_fn"),
        ({"generator": "seed"}, TypeError, "generator"),
    ],
)
def test_bad_arguments_raise_before_anything_is_modified(kwargs, error, match):
    model = make_mlp()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    arguments = {
        "model": model,
        "criterion": QuadraticModel(),
        "schedule": LinearSchedule(0.5, 2),
        "loss_fn": CE,
        "data": data(),
    }
    if error is None:  # only detectable when the stage runs: still before any write
        arguments.update(kwargs)
        pruner = Pruner(
            arguments.pop("model"),
            arguments.pop("criterion"),
            arguments.pop("schedule"),
            **arguments,
        )
        with pytest.raises(ValueError):
            pruner.step()
    else:
        with pytest.raises(error, match=match):
            arguments.update(kwargs)
            Pruner(
                arguments.pop("model"),
                arguments.pop("criterion"),
                arguments.pop("schedule"),
                **arguments,
            )
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_schedule_validation_for_user_schedules():
    class Decreasing:
        def sparsity(self, s):
            return [0.5, 0.4][s - 1]

        def __len__(self):
            return 2

        def __iter__(self):
            return iter([0.5, 0.4])

    with pytest.raises(ValueError, match="decreases"):
        Pruner(make_mlp(), Magnitude(), Decreasing())


def test_min_density_prevents_layer_collapse():
    model = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # a tiny last layer that magnitude pruning would empty
    original = copy.deepcopy(model)
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.7, 1), min_density=0.2)
    pruner.run()
    assert pruner.masks["2.weight"].float().mean() >= 0.2
    unprotected = Pruner(original, Magnitude(), LinearSchedule(0.7, 1))
    with pytest.warns(LayerCollapseWarning, match="2.weight"):
        unprotected.run()
    assert not unprotected.masks["2.weight"].any()  # without it the layer collapses
    with pytest.raises(ValueError, match="min_density"):  # refused up front, for the whole schedule
        Pruner(model, Magnitude(), LinearSchedule(0.9, 1), min_density=0.2)


def test_grasp_and_synflow_run_in_the_pruner(cnn, cnn_batch):
    for criterion in (GraSP(), SynFlow()):
        model = make_cnn()
        pruner = Pruner(model, criterion, ExponentialSchedule(0.8, 3), loss_fn=CE, data=cnn_batch)
        reports = pruner.run()
        assert all(isinstance(r, StageReport) for r in reports)
        assert pruner.sparsity() == pytest.approx(
            round(0.8 * sum(p.numel() for p in pruner.params.values()))
            / sum(p.numel() for p in pruner.params.values())
        )


def test_data_loader_with_random_subsets_and_progress_bar(capsys):
    inputs, targets = data(50)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, targets), batch_size=8
    )
    pruner = Pruner(
        make_mlp(),
        QuadraticModel(),
        ExponentialSchedule(0.8, 3),
        loss_fn=CE,
        data=loader,
        examples=20,
        progress=True,
        generator=0,
    )
    assert len(pruner.run()) == 3
    assert "pruning" in capsys.readouterr().err


def test_magnitude_without_data_needs_no_loss():
    pruner = Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 1))
    report = pruner.step()
    assert report.loss_before is None and report.predicted_delta is None
    with pytest.raises(ValueError, match="diagnostics"):
        Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 1), diagnostics=True)
