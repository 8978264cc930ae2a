"""Float64 brute-force twins for every routine of :mod:`lossprune.curvature`.

References are built from scratch: dense Hessians with :func:`torch.func.hessian` of the loss of
a flat parameter vector, GGNs 1/N sum_n J_n^T H_n J_n from :func:`torch.func.jacrev`, the Fisher
as the explicit per-example, per-class loop of Laurent et al. (2020),
1/N sum_n sum_c p_nc (d log p_c / d theta)^2. Every fast path is also compared with the generic
``torch.func`` path it replaces (``fast=False``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from lossprune import curvature
from lossprune.curvature import (
    NonFiniteError,
    Statistic,
    compute_statistics,
    fisher_diag,
    fisher_diag_mc,
    ggn_vp,
    hutchinson_diag,
    hvp,
    loss_and_grad,
)
from lossprune.curvature import products as curvature_products

DTYPE = torch.float64
CE = nn.CrossEntropyLoss()


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------


class TwoLayer(nn.Module):
    """A non-Sequential chain (traced), like the experiments' MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.flatten(x))


class Residual(nn.Module):
    """Not a chain: every fast path must fall back (or handle it through hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(x + torch.tanh(self.fc1(x)))


class Tied(nn.Module):
    """One Linear applied twice: its weight gets two uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class WeightReuse(nn.Module):
    """A Linear whose weight is also used outside its own call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x)) + 0.1 * (x @ self.fc.weight.T)
        return self.out(h)


class Sequence(nn.Module):
    """A Linear applied over a sequence dimension (per-example sums over positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x.view(-1, 2, 3))).flatten(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, stride=1, bias=False),
        nn.Tanh(),
        nn.AvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, dilation=1), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)
    )


def bias_free() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False))


def batch_norm() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


MODELS = {
    "mlp": (mlp, (6,)),
    "traced": (TwoLayer, (2, 3)),
    "cnn": (cnn, (2, 4, 4)),
    "conv1d": (conv1d, (2, 4)),
    "bias_free": (bias_free, (6,)),
    "batch_norm": (batch_norm, (6,)),
    "residual": (Residual, (6,)),
    "tied": (Tied, (6,)),
    "weight_reuse": (WeightReuse, (6,)),
    "sequence": (Sequence, (6,)),
}


def setup(name: str, n: int = 7, subset: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    build, shape = MODELS[name]
    model = build().to(DTYPE)
    params = {k: v.detach() for k, v in model.named_parameters()}
    if subset:  # only the weights, not the biases: the rest is held fixed
        params = {k: v for k, v in params.items() if k.endswith("weight")}
    x = torch.randn(n, *shape, dtype=DTYPE)
    y = torch.randint(0, 3, (n,))
    return model, params, (x, y)


# ---------------------------------------------------------------------------------------------
# Brute force
# ---------------------------------------------------------------------------------------------


def flat_fn(model, params, fn):
    """``fn(params_dict)`` as a function of one flat vector of all entries of ``params``."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def unflatten(theta):
        return {k: t.view(s) for k, t, s in zip(names, theta.split(sizes), shapes, strict=True)}

    flat = torch.cat([params[k].reshape(-1) for k in names])
    return flat, unflatten, lambda theta: fn(unflatten(theta))


def call(model, params, x):
    return functional_call(model, params, (x,), strict=False)


def dense_hessian(model, params, batch, loss_fn=CE):
    x, y = batch
    flat, unflatten, f = flat_fn(model, params, lambda p: loss_fn(call(model, p, x), y))
    return hessian(f)(flat), unflatten


def dense_ggn(model, params, batch, loss_fn=CE):
    x, y = batch
    flat, unflatten, f = flat_fn(model, params, lambda p: call(model, p, x))
    outputs = f(flat).detach()
    jac = jacrev(f)(flat).reshape(len(x), -1, flat.numel())  # (N, O, P)
    total = torch.zeros(flat.numel(), flat.numel(), dtype=DTYPE)
    for n in range(len(x)):

        def loss_n(o, n=n):
            return loss_fn(o.view(1, *outputs.shape[1:]), y[n : n + 1])

        h = hessian(loss_n)(outputs[n].reshape(-1))
        total += jac[n].T @ h @ jac[n]
    return total / len(x), unflatten


def fisher_loop(model, params, batch):
    """Laurent et al. (2020): 1/N sum_n sum_c p_nc (d log p_c / d theta)^2, one grad at a time."""
    x, y = batch
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for n in range(len(x)):
        log_p = call(model, leaves, x[n : n + 1]).log_softmax(1)[0]
        for c in range(log_p.numel()):
            grads = torch.autograd.grad(log_p[c], list(leaves.values()), retain_graph=True)
            for k, g in zip(leaves, grads, strict=True):
                total[k] += log_p[c].exp().detach() * g**2
    return {k: v / len(x) for k, v in total.items()}


def flatten(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def random_vectors(params, k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn((k, *p.shape), dtype=DTYPE, generator=gen) for name, p in params.items()
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


ALL = list(MODELS)


# ---------------------------------------------------------------------------------------------
# Gradient and curvature-vector products
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("subset", [False, True])
def test_loss_and_grad(name, subset):
    model, params, (x, y) = setup(name, subset=subset)
    loss, grads = loss_and_grad(model, params, (x, y), CE)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    expected_loss = CE(call(model, leaves, x), y)
    expected = torch.autograd.grad(expected_loss, list(leaves.values()))
    assert_close(loss, expected_loss.detach())
    assert_close(grads, dict(zip(leaves, expected, strict=True)))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("fast", [True, False])
def test_hvp_matches_dense_hessian(name, subset, fast):
    model, params, batch = setup(name, subset=subset)
    vectors = random_vectors(params, k=3)
    loss, grads, products = hvp(model, params, batch, CE, vectors, fast=fast)
    h, unflatten = dense_hessian(model, params, batch)
    v = torch.stack([flatten({k: vectors[k][j] for k in params}) for j in range(3)])
    expected = {k: torch.stack([unflatten(h @ v[j])[k] for j in range(3)]) for k in params}
    assert_close(products, expected)
    ref_loss, ref_grads = loss_and_grad(model, params, batch, CE)
    assert_close(loss, ref_loss)
    assert_close(grads, ref_grads)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("fast", [True, False])
def test_ggn_vp_matches_jacobian_sandwich(name, fast):
    model, params, batch = setup(name)
    vectors = random_vectors(params, k=2)
    _, _, products = ggn_vp(model, params, batch, CE, vectors, fast=fast)
    g, unflatten = dense_ggn(model, params, batch)
    v = torch.stack([flatten({k: vectors[k][j] for k in params}) for j in range(2)])
    expected = {k: torch.stack([unflatten(g @ v[j])[k] for j in range(2)]) for k in params}
    assert_close(products, expected)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_mse_hvp_and_ggn(name):
    model, params, (x, _) = setup(name)
    targets = torch.randn(len(x), 3, dtype=DTYPE)
    mse = nn.MSELoss()
    vectors = random_vectors(params, k=2)
    for curv, dense in (("hessian", dense_hessian), ("ggn", dense_ggn)):
        _, _, products = hvp(model, params, (x, targets), mse, vectors, curvature=curv)
        m, unflatten = dense(model, params, (x, targets), mse)
        v = torch.stack([flatten({k: vectors[k][j] for k in params}) for j in range(2)])
        expected = {k: torch.stack([unflatten(m @ v[j])[k] for j in range(2)]) for k in params}
        assert_close(products, expected)


@pytest.mark.parametrize("name", ["mlp", "cnn", "residual"])
def test_double_backward_twin_equals_fused(name):
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


def test_double_backward_fallback_when_forward_ad_missing():
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
    h, unflatten = dense_hessian(twin, params, batch)
    v = torch.stack([flatten({k: vectors[k][j] for k in params}) for j in range(2)])
    expected = {k: torch.stack([unflatten(h @ v[j])[k] for j in range(2)]) for k in params}
    assert_close(products, expected)


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


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("subset", [False, True])
def test_fisher_diag_matches_per_class_loop(name, subset):
    model, params, batch = setup(name, subset=subset)
    expected = fisher_loop(model, params, batch)
    assert_close(fisher_diag(model, params, batch, CE), expected)
    assert_close(fisher_diag(model, params, batch, CE, fast=False), expected)


@pytest.mark.parametrize("name", ["mlp", "cnn", "sequence"])
def test_fisher_diag_is_ggn_diagonal(name):
    model, params, batch = setup(name)
    g, unflatten = dense_ggn(model, params, batch)
    assert_close(fisher_diag(model, params, batch, CE), unflatten(torch.diagonal(g)))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_mse_fisher_diag_closed_form(name):
    """Mean MSE over N x O entries: H_n = 2/O I, so D = 2/(N O) sum_n sum_o (d f_no / d theta)^2."""
    model, params, (x, _) = setup(name)
    targets = torch.randn(len(x), 3, dtype=DTYPE)
    flat, unflatten, f = flat_fn(model, params, lambda p: call(model, p, x))
    jac = jacrev(f)(flat)  # (N, O, P)
    expected = unflatten(2.0 * (jac**2).sum((0, 1)) / jac[..., 0].numel())
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
    h, unflatten = dense_hessian(model, params, batch)
    exact = unflatten(torch.diagonal(h).clone())
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
    h, unflatten = dense_hessian(model, params, (x, y))
    assert_close(full[Statistic("hessian_grad")], unflatten(h @ flatten(full.grad)))
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
    model = cnn()
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
