"""Every criterion against its PAPER.md formula built from brute-force statistics (float64)."""

import copy
import pickle

import pytest
import torch
from torch import nn

from lossprune import (
    OBD,
    Criterion,
    GraSP,
    LinearModel,
    Magnitude,
    QuadraticModel,
    SynFlow,
    scores,
)
from lossprune.criteria import ScaledCriterion, SumCriterion
from lossprune.curvature import Statistic
from tests import brute_force as bf
from tests.conftest import make_cnn

CE = nn.CrossEntropyLoss()
LAMS = [0.0, 1e-2, 10.0]


def flat(score_dict):
    return bf.flatten(score_dict)


def reference(model, batch):
    params = bf.weights(model)
    theta = bf.flatten(params)
    g = bf.gradient(model, params, *batch, CE)
    d = bf.fisher_diagonal_loop(model, params, *batch)
    return theta, g, d


@pytest.mark.parametrize("lam", LAMS)
def test_linear_model_formula(mlp, mlp_batch, lam):
    theta, g, _ = reference(mlp, mlp_batch)
    got = flat(scores(mlp, LinearModel(lam=lam), mlp_batch, loss_fn=CE))
    torch.testing.assert_close(got, (g * theta).abs() + 0.5 * lam * theta**2)


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_quadratic_model_formula(model_name, lam, request):
    model = request.getfixturevalue(model_name)
    batch = request.getfixturevalue(f"{model_name}_batch")
    theta, g, d = reference(model, batch)
    got = flat(scores(model, QuadraticModel(lam=lam), batch, loss_fn=CE))
    torch.testing.assert_close(got, (-g * theta + 0.5 * d * theta**2).abs() + 0.5 * lam * theta**2)


@pytest.mark.parametrize("lam", LAMS)
def test_obd_formula(mlp, mlp_batch, lam):
    theta, _, d = reference(mlp, mlp_batch)
    got = flat(scores(mlp, OBD(lam=lam), mlp_batch, loss_fn=CE))
    torch.testing.assert_close(got, 0.5 * d * theta**2 + 0.5 * lam * theta**2)


def test_magnitude_formula_and_lambda_invariance(mlp):
    theta = bf.flatten(bf.weights(mlp))
    got = flat(scores(mlp, Magnitude()))
    torch.testing.assert_close(got, 0.5 * theta**2)
    # MP + λ·penalty ranks exactly like MP (the penalty IS magnitude), computed by the library.
    combined = flat(scores(mlp, Magnitude() + 2.0 * Magnitude()))
    torch.testing.assert_close(combined, 3.0 * got)
    assert torch.equal(combined.argsort(stable=True), got.argsort(stable=True))


def test_statistics_are_example_weighted_means_over_batches(mlp, mlp_batch):
    inputs, targets = mlp_batch
    batches = [(inputs[:3], targets[:3]), (inputs[3:], targets[3:])]
    whole = scores(mlp, QuadraticModel(lam=0.1), mlp_batch, loss_fn=CE)
    split = scores(mlp, QuadraticModel(lam=0.1), batches, loss_fn=CE)
    torch.testing.assert_close(flat(split), flat(whole))


def test_data_loader_is_accepted(mlp, mlp_batch):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*mlp_batch), batch_size=4)
    torch.testing.assert_close(
        flat(scores(mlp, LinearModel(), loader, loss_fn=CE)),
        flat(scores(mlp, LinearModel(), mlp_batch, loss_fn=CE)),
    )


def test_hessian_diag_curvature_converges_to_dense_hessian_diagonal(mlp, mlp_batch):
    params = bf.weights(mlp)
    theta = bf.flatten(params)
    g = bf.gradient(mlp, params, *mlp_batch, CE)
    h = bf.dense_hessian(mlp, params, *mlp_batch, CE)
    probes = 4000
    gen = torch.Generator().manual_seed(1)
    crit = QuadraticModel(lam=0.0, curvature="hessian_diag", probes=probes)
    got = flat(scores(mlp, crit, mlp_batch, loss_fn=CE, generator=gen))
    exact = (-g * theta + 0.5 * h.diagonal() * theta**2).abs()
    # Hutchinson's variance per entry is sum_{j != q} H_qj^2; 5 standard errors of the mean.
    std = ((h**2).sum(1) - h.diagonal() ** 2).sqrt() / probes**0.5
    assert ((got - exact).abs() <= 0.5 * theta**2 * 5 * std + 1e-12).all()


def test_fisher_mc_curvature_converges_to_exact_fisher(mlp, mlp_batch):
    theta, g, d = reference(mlp, mlp_batch)
    gen = torch.Generator().manual_seed(2)
    samples = 3000
    crit = OBD(curvature="fisher_mc", mc_samples=samples)
    got = flat(scores(mlp, crit, mlp_batch, loss_fn=CE, generator=gen))
    d_mc = got / (0.5 * theta**2)
    # Per example the estimator is a mean of `samples` terms bounded by max_c of the per-class
    # squared gradients; tolerance: 6 standard errors from an upper bound on the variance.
    params = bf.weights(mlp)
    bound = torch.zeros_like(theta)
    for n in range(len(mlp_batch[0])):
        t = theta.clone().requires_grad_(True)
        logp = bf.outputs_at(mlp, bf.unflatten(t, params), mlp_batch[0][n : n + 1])[0].log_softmax(
            0
        )
        for c in range(3):
            (gc,) = torch.autograd.grad(logp[c], t, retain_graph=True)
            bound = torch.maximum(bound, gc**4)
    std = (bound / (samples * len(mlp_batch[0]))).sqrt()
    assert ((d_mc - d).abs() <= 6 * std + 1e-12).all()


def test_grasp_is_theta_times_hessian_gradient_product(mlp, mlp_batch):
    params = bf.weights(mlp)
    theta = bf.flatten(params)
    g = bf.gradient(mlp, params, *mlp_batch, CE)
    h = bf.dense_hessian(mlp, params, *mlp_batch, CE)
    got = flat(scores(mlp, GraSP(temperature=1.0), mlp_batch, loss_fn=CE))
    torch.testing.assert_close(got, theta * (h @ g))


@pytest.mark.parametrize("temperature", [200.0, 3.0])
def test_grasp_at_temperature_matches_the_tempered_dense_hessian(mlp, mlp_batch, temperature):
    """θ ⊙ H_T g_T for L_T(θ) = CE(f(x; θ) / T, y), as the authors' code and Synaptic-Flow."""

    def tempered(outputs, targets):
        return CE(outputs / temperature, targets)

    params = bf.weights(mlp)
    g = bf.gradient(mlp, params, *mlp_batch, tempered)
    h = bf.dense_hessian(mlp, params, *mlp_batch, tempered)
    criterion = GraSP(temperature=temperature)
    got = flat(scores(mlp, criterion, mlp_batch, loss_fn=CE))
    torch.testing.assert_close(got, bf.flatten(params) * (h @ g))
    assert GraSP() == GraSP(temperature=200) and GraSP() != GraSP(temperature=1.0)
    plain = flat(scores(mlp, GraSP(temperature=1.0), mlp_batch, loss_fn=CE))
    assert not torch.allclose(got / got.norm(), plain / plain.norm())  # T changes the ranking


def test_grasp_sign_convention_prunes_largest_gradient_flow_increase_first():
    """GraSP removes the weights with the LARGEST -θ⊙Hg, i.e. the lowest θ⊙Hg here."""
    model = nn.Sequential(nn.Linear(4, 3)).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    s = flat(scores(model, GraSP(temperature=1.0), batch, loss_fn=CE))
    params = bf.weights(model)
    hg = bf.dense_hessian(model, params, *batch, CE) @ bf.gradient(model, params, *batch, CE)
    wang_score = -bf.flatten(params) * hg  # Wang et al.: larger = pruned first
    assert torch.equal(s.argsort(stable=True), (-wang_score).argsort(stable=True))


def test_synflow_closed_form_on_bias_free_linear_chain():
    torch.manual_seed(3)
    w1, w2, w3 = (torch.randn(5, 4), torch.randn(3, 5), torch.randn(2, 3))
    model = nn.Sequential(
        nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False), nn.Linear(3, 2, bias=False)
    )
    with torch.no_grad():
        for layer, w in zip(model, (w1, w2, w3)):
            layer.weight.copy_(w)
    a1, a2, a3 = w1.abs().double(), w2.abs().double(), w3.abs().double()
    ones_in, ones_out = torch.ones(4, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    # R = 1ᵀ A3 A2 A1 1;  dR/dA_l = (1ᵀ A_{>l})ᵀ (A_{<l} 1)ᵀ
    expected = {
        "0.weight": a1 * torch.outer(ones_out @ a3 @ a2, ones_in),
        "1.weight": a2 * torch.outer(ones_out @ a3, a1 @ ones_in),
        "2.weight": a3 * torch.outer(ones_out, a2 @ a1 @ ones_in),
    }
    got = scores(model, SynFlow(input_shape=(4,)))
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-6, atol=1e-6)
        assert got[name].dtype == torch.float64  # the computation dtype: no overflow on a cast
        assert (got[name] >= 0).all()


def test_synflow_reads_input_shape_from_data_and_uses_no_labels(cnn, cnn_batch):
    a = scores(cnn, SynFlow(), cnn_batch)
    b = scores(cnn, SynFlow(input_shape=cnn_batch[0].shape[1:]))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(ValueError, match="input_shape"):
        scores(cnn, SynFlow())


def test_composition_scores_add_and_scale(mlp, mlp_batch):
    qm, mp = QuadraticModel(lam=1e-3), Magnitude()
    combo = qm + 0.5 * mp
    a = flat(scores(mlp, qm, mlp_batch, loss_fn=CE))
    b = flat(scores(mlp, mp))
    torch.testing.assert_close(flat(scores(mlp, combo, mlp_batch, loss_fn=CE)), a + 0.5 * b)
    assert isinstance(combo, SumCriterion) and isinstance(combo.terms[1], ScaledCriterion)
    assert sum([qm, mp]) == qm + mp
    assert isinstance(2 * qm, Criterion) and (qm * 2) == (2 * qm)


def test_composition_computes_shared_statistics_once(mlp, mlp_batch, monkeypatch):
    import lossprune.pruning.scoring as scoring

    calls = []
    original = scoring.compute_statistics

    def counting(*args, **kwargs):
        calls.append(set(args[4]))
        return original(*args, **kwargs)

    monkeypatch.setattr(scoring, "compute_statistics", counting)
    combo = QuadraticModel(lam=0.1) + OBD(lam=1.0) + LinearModel()
    scores(mlp, combo, mlp_batch, loss_fn=CE)
    assert calls == [{Statistic("grad"), Statistic("fisher_auto", 1)}]  # curvature="auto"


def test_criteria_validate_arguments():
    with pytest.raises(ValueError, match="lam"):
        QuadraticModel(lam=-1.0)
    with pytest.raises(ValueError, match="lam"):
        LinearModel(lam=float("nan"))
    with pytest.raises(TypeError, match="lam"):
        OBD(lam="big")
    with pytest.raises(ValueError, match="curvature"):
        QuadraticModel(curvature="kfac")
    with pytest.raises(TypeError, match="curvature"):
        OBD(curvature=3)
    with pytest.raises(ValueError, match="samples"):
        QuadraticModel(curvature="fisher_mc", mc_samples=0)
    with pytest.raises(ValueError, match="input_shape"):
        SynFlow(input_shape=(0, 3))
    with pytest.raises(TypeError):
        QuadraticModel() + 1.0
    with pytest.raises(ValueError, match="finite"):
        float("inf") * Magnitude()


def test_scores_validates_inputs(mlp, mlp_batch):
    with pytest.raises(TypeError, match="criterion"):
        scores(mlp, "magnitude")
    with pytest.raises(TypeError, match="model"):
        scores("model", Magnitude())
    with pytest.raises(ValueError, match="data"):
        scores(mlp, LinearModel(), loss_fn=CE)
    with pytest.raises(ValueError, match="loss_fn"):
        scores(mlp, LinearModel(), mlp_batch)
    with pytest.raises(ValueError, match="reduction"):
        scores(mlp, LinearModel(), mlp_batch, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    with pytest.raises(ValueError, match="empty"):
        scores(mlp, LinearModel(), [], loss_fn=CE)


def test_batch_norm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    with pytest.raises(ValueError, match="training mode"):
        scores(model, QuadraticModel(), batch, loss_fn=CE)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    scores(model, QuadraticModel(), batch, loss_fn=CE)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_dropout_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    with pytest.raises(ValueError, match="random"):
        scores(model, LinearModel(), batch, loss_fn=CE)
    model.eval()
    scores(model, LinearModel(), batch, loss_fn=CE)


@pytest.mark.parametrize(
    "criterion",
    [
        Magnitude(),
        LinearModel(lam=1e-3),
        QuadraticModel(lam=1e-2, curvature="fisher_mc", mc_samples=3),
        OBD(curvature="hessian_diag", probes=7),
        GraSP(),
        SynFlow(input_shape=(3, 4)),
        QuadraticModel() + 0.5 * Magnitude(),
    ],
    ids=repr,
)
def test_criteria_pickle_deepcopy_and_config(criterion):
    for clone in (pickle.loads(pickle.dumps(criterion)), copy.deepcopy(criterion)):
        assert clone == criterion
        assert clone.config() == criterion.config()
        assert clone.requests() == criterion.requests()
    assert repr(criterion)


def test_scores_on_cnn_cover_conv_weights_only(cnn, cnn_batch):
    s = scores(cnn, QuadraticModel(lam=1e-3), cnn_batch, loss_fn=CE)
    assert list(s) == ["0.weight", "2.weight", "5.weight"]
    assert isinstance(make_cnn(), nn.Module)
