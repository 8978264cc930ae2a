r"""Float64 brute-force twins for every routine of :mod:`lossprune.curvature`.

Cases come from ONE table (:mod:`tests.cases`: model x loss x parameter subset, crossed with the
available devices); references from ONE module (:mod:`tests.brute_force`): dense Hessians with
:func:`torch.func.hessian` of the loss of a flat parameter vector, Gauss-Newton matrices
:math:`J^\top (\partial^2 L/\partial f^2) J` of the whole batch, the Fisher as the explicit
per-example, per-class loop of Laurent et al. (2020). Every fast path is also compared with the
generic ``torch.func`` path it replaces (``fast=False``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lossprune import curvature
from lossprune.curvature import (
    NonFiniteError,
    Statistic,
    compute_statistics,
    contractions,
    fisher_diag,
    fisher_diag_mc,
    ggn_vp,
    hutchinson_diag,
    hvp,
    loss_and_grad,
)
from lossprune.curvature import products as curvature_products
from lossprune.curvature.layers import RULES
from tests import brute_force as bf
from tests.cases import CASES, DTYPE, MODELS, Case, build, case_params

CE = nn.CrossEntropyLoss()


def setup(name: str, n: int = 7, subset: bool = False, seed: int = 0):
    built = build(Case(name, "ce", subset), n=n, seed=seed)
    return built.model, built.params, built.batch


def random_vectors(params, k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn((k, *p.shape), dtype=DTYPE, generator=gen).to(p.device)
        for name, p in params.items()
    }


def assert_close(actual, expected, **kw):
    kw.setdefault("rtol", 1e-10)
    kw.setdefault("atol", 1e-12)
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        for k in expected:
            torch.testing.assert_close(actual[k], expected[k], msg=k, **kw)
    else:
        torch.testing.assert_close(actual, expected, **kw)


def dense_hessian(model, params, batch, loss_fn=CE):
    return bf.dense_hessian(model, params, *batch, loss_fn)


def dense_ggn(model, params, batch, loss_fn=CE):
    return bf.dense_ggn(model, params, *batch, loss_fn)


def fisher_loop(model, params, batch):
    return bf.unflatten(bf.fisher_diagonal_loop(model, params, *batch), params)


ALL = list(MODELS)


def test_every_registered_layer_has_a_brute_force_case():
    """Adding a rule to the table without a case here fails: each rule must be run by a fast
    path (the fused chain, or for layers with parameters the squared contractions) in some
    model of the case table, which the tests below compare with brute force."""
    from lossprune.curvature.chain import find_chain
    from lossprune.curvature.contractions import layer_ggn_diag

    exercised = set()
    for name in MODELS:
        model, params, (x, y) = setup(name)
        if find_chain(model, params) is not None:
            exercised |= {type(m) for m in model.modules()}
        sums = layer_ggn_diag(
            model, params, x, lambda o, y=y: curvature.output_hessian_sqrt(o, y, CE)
        )
        exercised |= {type(model.get_submodule(q.rpartition(".")[0])) for q in sums.sums}
    missing = [t.__name__ for t in RULES if t not in exercised]
    assert not missing, f"add a model in which a fast path runs {missing} to tests/cases.py"


# ---------------------------------------------------------------------------------------------
# The case table against brute force
# ---------------------------------------------------------------------------------------------


@case_params()
def test_loss_and_grad(case, device):
    model, params, (x, y), loss_fn = build(case, device)
    loss, grads = loss_and_grad(model, params, (x, y), loss_fn)
    assert_close(loss, bf.mean_loss(model, params, x, y, loss_fn))
    assert_close(grads, bf.unflatten(bf.gradient(model, params, x, y, loss_fn), params))


@case_params()
@pytest.mark.parametrize(
    ("fast", "cpu_choice"), [(True, True), (True, False), (False, True)],
    ids=["fast", "fast-as-on-a-gpu", "generic"],
)  # fmt: skip
def test_hvp_matches_dense_hessian(case, device, fast, cpu_choice, monkeypatch):
    """``fast-as-on-a-gpu``: the batched algorithms a GPU takes for several vectors (the fused
    chain, else forward-over-reverse), run here on the CPU, which takes reverse-over-reverse."""
    if not cpu_choice:
        monkeypatch.setattr(curvature_products, "_on_cpu", lambda params: False)
    model, params, batch, loss_fn = build(case, device)
    h = bf.dense_hessian(model, params, *batch, loss_fn)
    for k in (3, 1):
        vectors = random_vectors(params, k=k)
        loss, grads, products = hvp(model, params, batch, loss_fn, vectors, fast=fast)
        assert_close(products, bf.products(h, vectors))
    ref_loss, ref_grads = loss_and_grad(model, params, batch, loss_fn)
    assert_close(loss, ref_loss)
    assert_close(grads, ref_grads)


@case_params()
@pytest.mark.parametrize("fast", [True, False])
def test_ggn_vp_matches_dense_ggn(case, device, fast):
    model, params, batch, loss_fn = build(case, device)
    vectors = random_vectors(params, k=2)
    products = ggn_vp(model, params, batch, loss_fn, vectors, fast=fast).products
    assert_close(products, bf.products(bf.dense_ggn(model, params, *batch, loss_fn), vectors))


@case_params()
@pytest.mark.parametrize(
    ("fast", "cpu_choice"), [(True, True), (True, False), (False, True)],
    ids=["fast", "fast-as-on-a-gpu", "generic"],
)  # fmt: skip
def test_fisher_diag_is_the_dense_ggn_diagonal(case, device, fast, cpu_choice, monkeypatch):
    """``fast-as-on-a-gpu``: the output columns go back as one vmapped backward pass, as on a
    GPU (on the CPU: one backward pass per column)."""
    if not cpu_choice:
        monkeypatch.setattr(contractions, "_one_backward_per_column", lambda device: False)
    model, params, batch, loss_fn = build(case, device)
    expected = bf.diagonal(bf.dense_ggn(model, params, *batch, loss_fn), params)
    assert_close(fisher_diag(model, params, batch, loss_fn, fast=fast), expected)


@case_params([c for c in CASES if c.loss == "ce"])
def test_fisher_diag_matches_per_class_loop(case, device):
    """The paper's formula, one example and one class at a time (Laurent et al. 2020)."""
    model, params, batch, loss_fn = build(case, device)
    assert_close(fisher_diag(model, params, batch, loss_fn), fisher_loop(model, params, batch))


@pytest.mark.parametrize("name", ["mlp", "cnn", "residual"])
def test_double_backward_twin_equals_fused(name, monkeypatch):
    monkeypatch.setattr(curvature_products, "_on_cpu", lambda params: False)  # as on a GPU
    model, params, batch = setup(name)
    vectors = random_vectors(params, k=3)
    fused = hvp(model, params, batch, CE, vectors)
    twin = curvature_products._hvp_double_backward(model, params, batch, CE, vectors)
    for a, b in zip(fused, twin, strict=True):
        assert_close(a, b)


class _NoForwardTanh(torch.autograd.Function):
    """tanh with a backward but no forward-mode rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * (1 - t * t)


class NoForwardAD(nn.Module):
    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 4)
        self.fc2 = nn.Linear(4, 3)
        self.plain = plain

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.tanh(h) if self.plain else _NoForwardTanh.apply(h))


def test_double_backward_fallback_when_forward_ad_missing(monkeypatch):
    # Several vectors take forward-over-reverse only off the CPU (choose_backend).
    monkeypatch.setattr(curvature_products, "_on_cpu", lambda params: False)
    torch.manual_seed(0)
    model = NoForwardAD().to(DTYPE)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(5, 6, dtype=DTYPE), torch.randint(0, 3, (5,)))
    vectors = random_vectors(params, k=2)
    with pytest.warns(RuntimeWarning, match="double-backward"):
        curvature_products._WARNED_DOUBLE_BACKWARD.clear()
        _, _, products = hvp(model, params, batch, CE, vectors)
    twin = NoForwardAD(plain=True).to(DTYPE)
    twin.load_state_dict(model.state_dict())
    assert_close(products, bf.products(dense_hessian(twin, params, batch), vectors))


@pytest.mark.parametrize("name", ["mlp", "cnn", "residual"])
def test_chunk_size_gives_identical_results(name):
    model, params, batch = setup(name)
    vectors = random_vectors(params, k=5)
    whole = hvp(model, params, batch, CE, vectors)
    chunked = hvp(model, params, batch, CE, vectors, chunk_size=2)
    for a, b in zip(whole, chunked, strict=True):
        assert_close(a, b)
    ggn_whole = ggn_vp(model, params, batch, CE, vectors)[2]
    assert_close(ggn_vp(model, params, batch, CE, vectors, chunk_size=2)[2], ggn_whole)
    assert_close(
        fisher_diag(model, params, batch, CE, chunk_size=1), fisher_diag(model, params, batch, CE)
    )


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_several_hessian_vectors_take_reverse_over_reverse_on_the_cpu(name):
    """Measured fastest and lightest on a CPU for any k (benchmarks/README.md); the chain
    still takes GGN products, and several Hessian vectors off the CPU."""
    model, params, _ = setup(name)
    choose = curvature_products.choose_backend
    Backend = curvature_products.Backend
    assert choose(model, params, "hessian", 16, fast=True).backend is Backend.REVERSE_OVER_REVERSE
    assert choose(model, params, "ggn", 16, fast=True).backend is Backend.CHAIN
    meta = {k: v.to("meta") for k, v in params.items()}  # off the CPU
    assert choose(model, meta, "hessian", 16, fast=True).backend is Backend.CHAIN
    assert choose(model, meta, "hessian", 1, fast=True).backend is Backend.REVERSE_OVER_REVERSE


def test_unknown_curvature_and_bad_vectors_raise():
    model, params, batch = setup("mlp")
    vectors = random_vectors(params, k=1)
    with pytest.raises(ValueError, match="curvature"):
        hvp(model, params, batch, CE, vectors, curvature="fisher")
    with pytest.raises(ValueError, match="keys"):
        hvp(model, params, batch, CE, {k: vectors[k] for k in list(vectors)[:1]})
    with pytest.raises(ValueError, match="shape"):
        hvp(model, params, batch, CE, {k: v[..., :1] for k, v in vectors.items()})


# ---------------------------------------------------------------------------------------------
# Curvature diagonals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_mse_fisher_diag_closed_form(name):
    """Mean MSE over N x O entries: H_n = 2/O I, so D = 2/(N O) sum_n sum_o (d f_no / d theta)^2."""
    model, params, (x, _) = setup(name)
    targets = torch.randn(len(x), 3, dtype=DTYPE)
    theta = bf.flatten(params)
    jac = torch.func.jacrev(lambda t: bf.outputs_at(model, bf.unflatten(t, params), x))(theta)
    expected = bf.unflatten(2.0 * (jac**2).sum((0, 1)) / jac[..., 0].numel(), params)
    for fast in (True, False):
        assert_close(fisher_diag(model, params, (x, targets), nn.MSELoss(), fast=fast), expected)


def _standard_error_check(estimates, exact, z=5.0):
    """Mean of independent seeded estimates within ``z`` standard errors of the exact value."""
    stacked = {k: torch.stack([e[k] for e in estimates]) for k in exact}
    for k, s in stacked.items():
        se = s.std(0) / math.sqrt(len(estimates))
        assert torch.all((s.mean(0) - exact[k]).abs() <= z * se + 1e-10), k


@pytest.mark.parametrize("fast", [True, False])
def test_fisher_diag_mc_converges(fast):
    model, params, batch = setup("mlp")
    exact = fisher_diag(model, params, batch, CE)
    gen = torch.Generator().manual_seed(0)
    estimates = [
        fisher_diag_mc(model, params, batch, CE, samples=20, generator=gen, fast=fast)
        for _ in range(40)
    ]
    _standard_error_check(estimates, exact)
    many = fisher_diag_mc(model, params, batch, CE, samples=4000, generator=gen, fast=fast)
    assert_close(many, exact, rtol=0.2, atol=1e-3)


def test_fisher_diag_mc_fast_equals_generic_with_same_seed():
    model, params, batch = setup("cnn")
    a = fisher_diag_mc(
        model, params, batch, CE, samples=3, generator=torch.Generator().manual_seed(5)
    )
    b = fisher_diag_mc(
        model, params, batch, CE, samples=3, generator=torch.Generator().manual_seed(5), fast=False
    )
    assert_close(a, b)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_hutchinson_diag_converges(name):
    model, params, batch = setup(name)
    exact = bf.diagonal(dense_hessian(model, params, batch), params)
    gen = torch.Generator().manual_seed(0)
    estimates = [
        hutchinson_diag(model, params, batch, CE, probes=25, generator=gen) for _ in range(40)
    ]
    _standard_error_check(estimates, exact)


# ---------------------------------------------------------------------------------------------
# Statistics over many batches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "residual"])
def test_compute_statistics_batches_equal_full_batch(name):
    model, params, (x, y) = setup(name, n=9)
    requests = [Statistic("grad"), Statistic("fisher"), Statistic("hessian_grad")]
    full = compute_statistics(model, params, (x, y), CE, requests)
    batches = [(x[:4], y[:4]), (x[4:5], y[4:5]), (x[5:], y[5:])]
    split = compute_statistics(model, params, batches, CE, requests)
    assert split.examples == full.examples == 9
    assert split.loss == pytest.approx(full.loss, rel=1e-12)
    assert_close(split.grad, full.grad)
    for r in requests:
        assert_close(split[r], full[r])
    h = dense_hessian(model, params, (x, y))
    assert_close(full[Statistic("hessian_grad")], bf.unflatten(h @ bf.flatten(full.grad), params))
    assert_close(full[Statistic("fisher")], fisher_loop(model, params, (x, y)))


def test_compute_statistics_random_requests_are_seeded():
    model, params, batch = setup("mlp")
    requests = [Statistic("fisher_mc", 3), Statistic("hutchinson", 4)]
    a = compute_statistics(
        model, params, batch, CE, requests, generator=torch.Generator().manual_seed(3)
    )
    b = compute_statistics(
        model, params, batch, CE, requests, generator=torch.Generator().manual_seed(3)
    )
    for r in requests:
        assert_close(a[r], b[r], rtol=0, atol=0)
    _, grads = loss_and_grad(model, params, batch, CE)
    assert_close(a.grad, grads)


def test_buffers_and_parameters_not_mutated():
    model, params, batch = setup("batch_norm")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    vectors = random_vectors(params, k=2)
    hvp(model, params, batch, CE, vectors)
    ggn_vp(model, params, batch, CE, vectors)
    fisher_diag(model, params, batch, CE)
    fisher_diag_mc(model, params, batch, CE, samples=2)
    compute_statistics(model, params, batch, CE, [Statistic("fisher"), Statistic("hessian_grad")])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not model[1].training


def test_non_finite_loss_raises():
    model, params, (x, y) = setup("mlp")
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        compute_statistics(model, params, (x, y), CE, [Statistic("fisher")])
    assert issubclass(NonFiniteError, ValueError)


def test_float32_fast_paths_agree_with_generic():
    torch.manual_seed(0)
    model = MODELS["cnn"][0]()
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,)))
    vectors = {k: torch.randn(2, *p.shape) for k, p in params.items()}
    fast = hvp(model, params, batch, CE, vectors)[2]
    slow = hvp(model, params, batch, CE, vectors, fast=False)[2]
    assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    assert_close(
        fisher_diag(model, params, batch, CE),
        fisher_diag(model, params, batch, CE, fast=False),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("name", "uncovered"),
    [
        ("mlp", set()),
        ("cnn", set()),
        ("every_layer_1d", set()),
        ("every_layer_2d", set()),
        ("grouped_conv", set()),
        ("residual", set()),
        ("conv1d", set()),
        ("sequence", set()),
        ("batch_norm", {"1.weight", "1.bias"}),
        ("tied", {"fc.weight", "fc.bias"}),
        ("weight_reuse", {"fc.weight", "fc.bias"}),
    ],
)
def test_layer_diag_covers_exactly_the_safe_layers(name, uncovered):
    """The squared-contraction path takes plain once-used layers and nothing else."""
    from lossprune.curvature.contractions import layer_ggn_diag

    model, params, (x, y) = setup(name)
    sums = layer_ggn_diag(model, params, x, lambda o: curvature.output_hessian_sqrt(o, y, CE)).sums
    assert set(params) - set(sums) == uncovered


@pytest.mark.parametrize(
    ("name", "is_chain"),
    [
        ("mlp", True),
        ("every_layer_1d", True),
        ("every_layer_2d", True),
        ("grouped_conv", False),  # the chain rule of a convolution takes groups == 1
        ("traced", True),
        ("cnn", True),
        ("conv1d", True),
        ("bias_free", True),
        ("batch_norm", False),
        ("residual", False),
        ("tied", False),
        ("weight_reuse", False),
        ("sequence", False),
    ],
)
@pytest.mark.parametrize("subset", [False, True])
def test_chain_fast_path_is_selected_exactly_for_chains(name, is_chain, subset):
    from lossprune.curvature.chain import find_chain

    model, params, _ = setup(name, subset=subset)
    assert (find_chain(model, params) is not None) == is_chain
    assert find_chain(NoForwardAD(), dict(NoForwardAD().named_parameters())) is None


def test_chain_linear_on_sequence_falls_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).to(DTYPE)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(5, 2, 3, dtype=DTYPE), torch.randint(0, 3, (5,)))
    vectors = random_vectors(params, k=2)
    assert_close(
        hvp(model, params, batch, CE, vectors)[2],
        hvp(model, params, batch, CE, vectors, fast=False)[2],
    )
