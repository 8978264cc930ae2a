"""The exact refit against dense constrained least squares (float64), its fast path against its
slow twin, and its refusals."""

from __future__ import annotations

import pytest
import torch

from lossprune.curvature import NonFiniteError
from lossprune.layerwise.solvers import Damping, LayerProblem, refit
from lossprune.layerwise.solvers._hessian import damped_hessian
from lossprune.layerwise.solvers.problem import damped_objective
from lossprune.layerwise.solvers.refit import default_rtol, masked_conjugate_gradients

from .solver_cases import DEVICES, digits_problems, lstsq_refit, random_mask, random_problem


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["cg", "cholesky"])
@pytest.mark.parametrize(
    ("tokens", "dead", "damping"),
    [
        (64, 0, Damping()),
        (64, 0, Damping(relative=0.0)),  # no damping: G is full rank
        (8, 0, Damping(relative=1e-3)),  # fewer tokens than inputs: rank-deficient G
        (64, 3, Damping(relative=0.0, lam=0.5)),  # dead inputs, λ as the damping
    ],
)
def test_refit_is_the_dense_constrained_least_squares(device, method, tokens, dead, damping):
    problem, _ = random_problem(7, 12, tokens, dead=dead, device=device)
    mask = random_mask(problem, 0.5)
    delta = damping.value(problem.gram)
    expected = lstsq_refit(problem, mask, delta)
    solved = refit(problem, mask, damping, method=method)
    assert solved.weight.device == problem.reference.device
    assert torch.equal(solved.mask, mask)
    assert torch.equal(solved.weight != 0, mask & (solved.weight != 0))
    if method == "cholesky":
        torch.testing.assert_close(solved.weight.cpu(), expected, atol=1e-9, rtol=1e-8)
    else:  # CG's guarantee is on the objective; flat directions (eigenvalue δ) move more.
        objective = damped_objective(problem, solved.weight, delta).cpu()
        best = damped_objective(
            problem._replace(reference=problem.reference.cpu(), gram=problem.gram.cpu()),
            expected,
            delta,
        )
        assert (objective <= best * (1 + default_rtol(torch.float64)) + 1e-14).all()
        torch.testing.assert_close(solved.weight.cpu(), expected, atol=1e-5, rtol=1e-5)
    assert solved.weight[0].eq(0).all()  # the row with everything pruned
    # Objective and relative error as documented.
    residual = problem.reference - solved.weight
    error = float(((residual @ problem.gram) * residual).sum())
    scale = float(((problem.reference @ problem.gram) * problem.reference).sum())
    assert solved.error == pytest.approx(error, rel=1e-12)
    assert solved.relative_error == pytest.approx(error / scale, rel=1e-12)


def test_damping_rule():
    problem, _ = random_problem()
    mean_diagonal = float(problem.gram.diagonal().mean())
    assert Damping().value(problem.gram) == pytest.approx(0.01 * mean_diagonal)
    assert Damping(relative=0.1, lam=3.0).value(problem.gram) == pytest.approx(
        0.1 * mean_diagonal + 1.5
    )


@pytest.mark.parametrize("layer", [0, 1, 2], ids=["pixels", "relu1", "relu2"])
def test_refit_on_real_layers_matches_the_slow_twin(layer):
    problem = digits_problems()[layer]
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(problem.kept.shape, generator=generator) < 0.4
    fast = refit(problem, mask)
    slow = refit(problem, mask, method="cholesky")
    delta = Damping().value(problem.gram)
    torch.testing.assert_close(slow.weight, lstsq_refit(problem, mask, delta), atol=1e-9, rtol=1e-8)
    fast_objective = damped_objective(problem, fast.weight, delta)
    slow_objective = damped_objective(problem, slow.weight, delta)
    # The documented guarantee: every row within (1 + rtol) of its optimum.
    assert (fast_objective <= slow_objective * (1 + default_rtol(torch.float64)) + 1e-300).all()
    # Neither above no update at all.
    unchanged = damped_objective(problem, problem.reference * mask, delta)
    assert (fast_objective <= unchanged).all()


def test_float32_meets_its_tolerance():
    problem, _ = random_problem(9, 24, 96, seed=3)
    problem32 = LayerProblem(problem.reference.float(), problem.gram.float(), problem.kept)
    # The float64 truth of the float32 numbers the solver was given.
    problem64 = LayerProblem(problem32.reference.double(), problem32.gram.double(), problem.kept)
    mask = random_mask(problem64, 0.5, seed=1)
    delta = Damping().value(problem64.gram)
    solved = refit(problem32, mask)
    assert solved.weight.dtype == torch.float32
    exact = damped_objective(problem64, lstsq_refit(problem64, mask, delta), delta)
    reached = damped_objective(problem64, solved.weight.double(), delta)
    # rtol on the objective, plus float32's own rounding of it.
    assert (reached <= exact * (1 + default_rtol(torch.float32) + 1e-5) + 1e-12).all()


def test_warm_start_from_the_answer_needs_no_iteration():
    problem, _ = random_problem(6, 16, 48)
    mask = random_mask(problem, 0.6)
    hessian = damped_hessian(problem.gram, Damping())
    cold = masked_conjugate_gradients(hessian, problem.reference, mask, rtol=1e-10, max_iter=100)
    assert cold.iterations > 1
    start = cold.correction
    warm = masked_conjugate_gradients(
        hessian, problem.reference, mask, initial=start, rtol=1e-10, max_iter=100
    )
    assert warm.iterations == 0
    assert not warm.unconverged.any()
    solved = refit(problem, mask, initial=problem.reference + start)
    torch.testing.assert_close(solved.weight, (problem.reference + start) * mask)


def test_rows_cg_does_not_finish_are_solved_exactly():
    problem, _ = random_problem(6, 16, 48, seed=2)
    mask = random_mask(problem, 0.5, seed=2)
    hessian = damped_hessian(problem.gram, Damping())
    partial = masked_conjugate_gradients(hessian, problem.reference, mask, rtol=1e-10, max_iter=1)
    assert partial.unconverged.any()
    solved = refit(problem, mask, max_iter=1)
    expected = lstsq_refit(problem, mask, Damping().value(problem.gram))
    torch.testing.assert_close(solved.weight, expected, atol=1e-9, rtol=1e-8)


def test_reference_in_another_dtype_is_solved_in_the_gram_dtype():
    problem, _ = random_problem()
    half = LayerProblem(problem.reference.bfloat16(), problem.gram, problem.kept)
    mask = random_mask(problem, 0.5)
    solved = refit(half, mask)
    assert solved.weight.dtype == torch.float64
    expected = refit(LayerProblem(half.reference.double(), problem.gram, problem.kept), mask)
    torch.testing.assert_close(solved.weight, expected.weight)


def _bad(problem, **changes):
    return problem._replace(**changes)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda p: (p.reference, p.gram, p.kept), TypeError, "must be a LayerProblem"),
        (lambda p: _bad(p, gram=p.gram.half()), TypeError, "float32 or float64"),
        (lambda p: _bad(p, reference=p.reference.long()), TypeError, "must be floating"),
        (lambda p: _bad(p, kept=p.kept.float()), TypeError, "kept must be a bool"),
        (lambda p: _bad(p, gram=[[1.0]]), TypeError, "must be a tensor"),
        (lambda p: _bad(p, reference=p.reference[0]), ValueError, r"\(out, in\) matrix"),
        (lambda p: _bad(p, gram=p.gram[:-1, :-1]), ValueError, "LayerProblem.gram must be"),
        (lambda p: _bad(p, kept=p.kept[:-1]), ValueError, "kept must have the reference"),
        (lambda p: _bad(p, gram=p.gram * float("nan")), NonFiniteError, "Gram matrix"),
        (lambda p: _bad(p, gram=torch.zeros_like(p.gram)), ValueError, "not positive definite"),
        (lambda p: _bad(p, kept=p.kept.to("meta")), ValueError, "one device"),
    ],
)  # fmt: skip
def test_bad_problems_are_refused_before_anything_changes(change, error, message):
    problem, _ = random_problem()
    before = [t.clone() for t in problem]
    mask = random_mask(problem, 0.5)
    with pytest.raises(error, match=message):
        refit(change(problem), mask)
    assert all(torch.equal(a, b) for a, b in zip(before, problem, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mask": "all"}, TypeError, "mask must be a bool tensor"),
        ({"mask": torch.ones(7, 11, dtype=torch.bool)}, ValueError, "mask must have shape"),
        ({"method": "qr"}, ValueError, "method must be one of"),
        ({"rtol": -1.0}, ValueError, "rtol must be finite and >= 0"),
        ({"max_iter": 0}, ValueError, "max_iter must be >= 1"),
        ({"damping": 0.01}, TypeError, "damping must be a Damping"),
        ({"initial": torch.zeros(7, 12), "method": "cholesky"}, ValueError, "only applies to"),
        ({"initial": torch.zeros(7, 12).long()}, TypeError, "initial must be a floating"),
        ({"initial": torch.zeros(7, 11)}, ValueError, "initial must have shape"),
        ({"initial": torch.full((7, 12), float("inf"))}, ValueError, "initial has non-finite"),
    ],
)
def test_bad_refit_arguments_are_refused(kwargs, error, message):
    problem, _ = random_problem()
    arguments = {"mask": random_mask(problem, 0.5)} | kwargs
    with pytest.raises(error, match=message):
        refit(problem, **arguments)


def test_a_mask_that_keeps_pruned_entries_is_refused():
    problem, _ = random_problem()
    kept = random_mask(problem, 0.5)
    with pytest.raises(ValueError, match="masks only shrink"):
        refit(problem._replace(kept=kept), torch.ones_like(kept))


def test_singular_gram_without_damping_is_refused():
    problem, _ = random_problem(tokens=4)
    with pytest.raises(ValueError, match=r"Damping\(relative > 0\)"):
        refit(problem, random_mask(problem, 0.5), Damping(relative=0.0))


@pytest.mark.parametrize(("field", "value"), [("relative", -0.1), ("lam", float("inf"))])
def test_bad_damping_is_refused(field, value):
    with pytest.raises(ValueError, match=f"Damping: {field}"):
        Damping(**{field: value})
    with pytest.raises(TypeError, match=f"Damping: {field}"):
        Damping(**{field: "0.1"})
