"""The local loss model against torch.func on the reconstruction loss, and every criterion on it."""

import pytest
import torch

from lossprune import OBD, GraSP, LinearModel, Magnitude, QuadraticModel, SynFlow, Wanda
from lossprune.criteria.base import ScoringContext
from lossprune.curvature import Statistic
from lossprune.layerwise.local import check_local_criterion, local_statistics
from tests.layerwise.solver_cases import random_problem


def reconstruction_loss(reference, inputs):
    """E(W) = ||W0 X - W X||_F^2 / n, written out (X: in x n)."""

    def loss(weight):
        return (reference @ inputs - weight @ inputs).square().sum() / inputs.shape[1]

    return loss


def at_some_weights(problem):
    """A point away from W0 (the gradient is then not zero)."""
    generator = torch.Generator().manual_seed(5)
    return problem.reference + 0.3 * torch.randn(
        problem.reference.shape, generator=generator, dtype=problem.reference.dtype
    )


def test_gradient_hessian_and_diagonal_are_those_of_the_reconstruction_loss():
    problem, inputs = random_problem(out=3, inputs=5, tokens=40, seed=1)
    weight = at_some_weights(problem)
    loss = reconstruction_loss(problem.reference, inputs)
    requests = {Statistic("fisher"), Statistic("fisher_mc", 3), Statistic("hutchinson", 2)}

    class Probe(OBD):
        def requests(self):
            return frozenset(requests | {Statistic("grad"), Statistic("input_sq_norms")})

    statistics = local_statistics(Probe(), {"w": problem}, {"w": weight}, inputs.shape[1])
    torch.testing.assert_close(statistics.grad["w"], torch.func.grad(loss)(weight), rtol=1e-12,
                               atol=1e-12)  # fmt: skip
    hessian = torch.func.hessian(loss)(weight).reshape(15, 15)
    for request in requests:  # the exact diagonal, whatever estimator was asked for
        torch.testing.assert_close(statistics[request]["w"].reshape(-1), hessian.diagonal(),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
    # E is quadratic: each row's Hessian is 2G, rows do not interact.
    block = hessian.reshape(3, 5, 3, 5)
    for i in range(3):
        torch.testing.assert_close(block[i, :, i, :], 2 * problem.gram, rtol=1e-12, atol=1e-12)
        for j in range(3):
            if j != i:
                assert block[i, :, j, :].abs().max() == 0
    torch.testing.assert_close(statistics[Statistic("input_sq_norms")]["w"][0],
                               inputs.square().sum(1) / inputs.shape[1])  # fmt: skip
    assert statistics.loss == pytest.approx(float(loss(weight)), rel=1e-12)


@pytest.mark.parametrize(
    "criterion, formula",
    [
        (Magnitude(), lambda w, g, d, s: 0.5 * w**2),
        (LinearModel(lam=0.1), lambda w, g, d, s: (g * w).abs() + 0.05 * w**2),
        (QuadraticModel(lam=0.1), lambda w, g, d, s: (-g * w + 0.5 * d * w**2).abs() + 0.05 * w**2),
        (OBD(lam=0.1), lambda w, g, d, s: 0.5 * (d + 0.1) * w**2),
        (Wanda(), lambda w, g, d, s: w.abs() * s.sqrt()),
        (Wanda() + 2.0 * OBD(), lambda w, g, d, s: w.abs() * s.sqrt() + d * w**2),
    ],
)
def test_every_criterion_scores_the_local_loss(criterion, formula):
    """Scores from the torch.func gradient and Hessian diagonal of the reconstruction loss."""
    problem, inputs = random_problem(out=4, inputs=6, tokens=30, seed=2)
    weight = at_some_weights(problem)
    loss = reconstruction_loss(problem.reference, inputs)
    g = torch.func.grad(loss)(weight)
    d = torch.func.hessian(loss)(weight).reshape(24, 24).diagonal().reshape(4, 6)
    s = (inputs.square().sum(1) / inputs.shape[1]).expand(4, 6)
    statistics = local_statistics(criterion, {"w": problem}, {"w": weight}, inputs.shape[1])
    scores = criterion.score(ScoringContext(None, {"w": weight}, statistics))["w"]
    torch.testing.assert_close(scores, formula(weight, g, d, s), rtol=1e-12, atol=1e-12)


def test_obd_on_the_local_loss_is_wanda_squared():
    problem, inputs = random_problem(out=4, inputs=6, tokens=30, seed=3)
    weight = problem.reference
    scores = {}
    for criterion in (OBD(), Wanda()):
        statistics = local_statistics(criterion, {"w": problem}, {"w": weight}, inputs.shape[1])
        scores[criterion] = criterion.score(ScoringContext(None, {"w": weight}, statistics))["w"]
    torch.testing.assert_close(scores[OBD()], scores[Wanda()] ** 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "criterion", [GraSP(), SynFlow(), Wanda() + 0.5 * SynFlow(), GraSP(temperature=1.0) + Wanda()]
)
def test_criteria_without_a_local_meaning_are_refused(criterion):
    with pytest.raises(TypeError, match="no meaning on a layer's reconstruction loss"):
        check_local_criterion(criterion)


def test_a_criterion_asking_for_an_unknown_statistic_is_refused():
    class HessianGradient(Magnitude):
        def requests(self):
            return frozenset({Statistic("hessian_grad")})

    with pytest.raises(TypeError, match="the local loss does not define"):
        check_local_criterion(HessianGradient())
    with pytest.raises(TypeError, match="must be a lossprune.Criterion"):
        check_local_criterion("wanda")
