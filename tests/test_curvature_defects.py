"""Inputs that once gave silent wrong numbers: each is now exact (float64, brute force) or raises.

Issue 10, items 1-9. Every reference comes from :mod:`tests.brute_force` (dense Hessians and
Gauss-Newton matrices of the WHOLE batch loss, no assumption on how it splits into examples).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import lossprune
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
from lossprune.pruning._diagnostics import curvature_product
from tests import brute_force as bf

DTYPE = torch.float64
CE = nn.CrossEntropyLoss()


def close(actual, expected, rtol=1e-8, atol=1e-10):
    assert set(actual) == set(expected)
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=rtol, atol=atol, msg=k)


def all_params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def vectors_for(params, k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn((k, *p.shape), dtype=DTYPE, generator=gen) for n, p in params.items()}


def check_all_exact(model, batch, loss_fn, params=None, k=3, ggn_loss=None, ggn_model=None):
    """grad, hvp (k > 1 and k = 1), ggn_vp and fisher_diag (fast and generic) against brute force.

    ``ggn_model``/``ggn_loss``: the split of the Gauss-Newton matrix (log-probability losses are
    split at the logits).
    """
    x, y = batch
    params = all_params(model) if params is None else params
    loss, grad = loss_and_grad(model, params, batch, loss_fn)
    torch.testing.assert_close(loss, bf.mean_loss(model, params, x, y, loss_fn))
    close(grad, bf.unflatten(bf.gradient(model, params, x, y, loss_fn), params))
    h = bf.dense_hessian(model, params, x, y, loss_fn)
    g = bf.dense_ggn(ggn_model or model, params, x, y, ggn_loss or loss_fn)
    for kk in (k, 1):
        v = vectors_for(params, kk)
        for fast in (True, False):
            close(hvp(model, params, batch, loss_fn, v, fast=fast)[2], bf.products(h, v))
            close(ggn_vp(model, params, batch, loss_fn, v, fast=fast)[2], bf.products(g, v))
    for fast in (True, False):
        close(fisher_diag(model, params, batch, loss_fn, fast=fast), bf.diagonal(g, params))


# ---------------------------------------------------------------------------------------------
# 1. layouts where dim 0 of a layer input does not index examples
# ---------------------------------------------------------------------------------------------


class FoldedHead(nn.Module):
    """A Linear on ``x.reshape(N * T, E)``, as a language-model head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        n = x.shape[0]
        return self.out(torch.tanh(self.fc(x.reshape(-1, 3))).reshape(n, -1))


class FoldedFrames(nn.Module):
    """Frames folded into the batch of a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 2)
        self.out = nn.Linear(2 * 2 * 3, 3)

    def forward(self, x):  # (N, frames=2, C=2, L=4)
        n = x.shape[0]
        h = torch.tanh(self.conv(x.reshape(n * 2, 2, 4)))
        return self.out(h.reshape(n, -1))


class SequenceFirst(nn.Module):
    """PyTorch's default transformer layout ``(T, N, E)``; here T == N, so shapes cannot tell."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(4, 2, dim_feedforward=5, dropout=0.0)
        self.out = nn.Linear(3 * 4, 3)

    def forward(self, x):  # (N, T, E)
        h = self.encoder(x.transpose(0, 1)).transpose(0, 1)
        return self.out(h.reshape(x.shape[0], -1))


class TransposedLinear(nn.Module):
    """A Linear applied to ``(T, N, E)`` directly, T == N."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.out = nn.Linear(6, 3)

    def forward(self, x):  # (N, T=3, E=2)
        h = torch.tanh(self.fc(x.transpose(0, 1)))  # (T, N, 2): dim 0 is NOT the examples
        return self.out(h.transpose(0, 1).reshape(x.shape[0], -1))


@pytest.mark.parametrize(
    "build, shape",
    [
        (FoldedHead, (2, 3)),
        (FoldedFrames, (2, 2, 4)),
        (SequenceFirst, (3, 4)),
        (TransposedLinear, (3, 2)),
    ],
    ids=["folded_head", "folded_frames", "sequence_first_transformer", "transposed_linear"],
)
def test_layer_inputs_not_indexed_by_examples_are_exact(build, shape):
    torch.manual_seed(0)
    model = build().to(DTYPE)
    x = torch.randn(3, *shape, dtype=DTYPE)
    y = torch.tensor([0, 2, 1])
    params = all_params(model)
    g = bf.dense_ggn(model, params, x, y, CE)
    close(fisher_diag(model, params, (x, y), CE), bf.diagonal(g, params))


class ViewBySize(nn.Module):
    """``x.view(x.size(0), -1)``, the usual flatten of a CNN, optionally mixing examples."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.mix = mix

    def forward(self, x):
        h = x.view(x.size(0), -1)
        return self.fc(h - h.mean(0) if self.mix else h)


def test_reshape_that_keeps_examples_is_still_fast():
    """The proof accepts a reshape that keeps N in dim 0 (no regression of the fast path)."""
    from lossprune.curvature.layout import proven_layers

    x = torch.randn(4, 2, 3, dtype=DTYPE)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).to(DTYPE)
    assert proven_layers(model, x) == {"1"}
    assert proven_layers(ViewBySize().to(DTYPE), x) == {"fc"}
    assert proven_layers(ViewBySize(mix=True).to(DTYPE), x) == set()
    assert proven_layers(FoldedHead().to(DTYPE), x) == set()


# ---------------------------------------------------------------------------------------------
# 2-4. class weights, ignore_index, label smoothing, (N, C, d1, ...) layouts: the same loss
# ---------------------------------------------------------------------------------------------


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


WEIGHT = torch.tensor([0.3, 2.0, 1.1], dtype=DTYPE)
LOSSES = {
    "class_weights": nn.CrossEntropyLoss(weight=WEIGHT),
    "ignore_index": nn.CrossEntropyLoss(ignore_index=1),
    "default_ignore": nn.CrossEntropyLoss(),
    "smoothing": nn.CrossEntropyLoss(label_smoothing=0.2),
    "all_options": nn.CrossEntropyLoss(weight=WEIGHT, ignore_index=0, label_smoothing=0.1),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_cross_entropy_options_are_exact(name):
    model = mlp()
    x = torch.randn(6, 4, dtype=DTYPE)
    y = torch.tensor([0, 1, 2, 1, -100 if name == "default_ignore" else 0, 2])
    check_all_exact(model, (x, y), LOSSES[name])


def test_probability_targets_are_exact():
    model = mlp()
    x = torch.randn(5, 4, dtype=DTYPE)
    y = torch.rand(5, 3, dtype=DTYPE).softmax(1)
    check_all_exact(model, (x, y), nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.1))


class TokenLogits(nn.Module):
    """Per-position logits ``(N, C, T)``, the layout of a language model's transposed head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # (N, T, E) -> (N, C, T)
        return self.head(torch.tanh(self.fc(x))).transpose(1, 2)


def test_per_position_logits_with_ignored_positions_are_exact():
    torch.manual_seed(0)
    model = TokenLogits().to(DTYPE)
    x = torch.randn(3, 4, 3, dtype=DTYPE)
    y = torch.tensor([[0, 1, 2, -100], [2, -100, -100, 1], [1, 1, 0, 2]])
    check_all_exact(model, (x, y), nn.CrossEntropyLoss(weight=WEIGHT))


@pytest.mark.parametrize("name", ["class_weights", "all_options"])
def test_statistics_of_batches_are_the_full_data_mean(name):
    """Batches are weighted by the loss's units (sum of class weights of non-ignored targets)."""
    model, loss_fn = mlp(), LOSSES[name]
    x = torch.randn(9, 4, dtype=DTYPE)
    y = torch.tensor([0, 0, 0, 1, 2, 2, 1, 0, 2])
    requests = [Statistic("fisher"), Statistic("hessian_grad")]
    params = all_params(model)
    batches = [(x[:3], y[:3]), (x[3:4], y[3:4]), (x[4:], y[4:])]
    split = compute_statistics(model, params, batches, loss_fn, requests)
    full = compute_statistics(model, params, (x, y), loss_fn, requests)
    assert split.loss == pytest.approx(float(loss_fn(bf.outputs_at(model, params, x), y)))
    close(split.grad, bf.unflatten(bf.gradient(model, params, x, y, loss_fn), params))
    g = bf.dense_ggn(model, params, x, y, loss_fn)
    close(split[Statistic("fisher")], bf.diagonal(g, params))
    h = bf.dense_hessian(model, params, x, y, loss_fn)
    close(split[Statistic("hessian_grad")], bf.unflatten(h @ bf.flatten(split.grad), params))
    assert split.units == pytest.approx(full.units)
    _, grad, product = curvature_product(model, params, batches, loss_fn, split.grad)
    close(grad, split.grad)
    close(product, split[Statistic("hessian_grad")])


def test_batch_with_only_ignored_targets_is_skipped():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x = torch.randn(6, 4, dtype=DTYPE)
    y = torch.tensor([0, 1, 2, -100, -100, -100])
    stats = compute_statistics(model, all_params(model), [(x[:3], y[:3]), (x[3:], y[3:])], loss_fn)
    assert stats.loss == pytest.approx(float(loss_fn(model(x), y).detach()))
    with pytest.raises(ValueError, match="every target is ignored"):
        compute_statistics(model, all_params(model), (x[3:], y[3:]), loss_fn)


# ---------------------------------------------------------------------------------------------
# 4, 9. batch statistics: refused before anything runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_batch_norm_without_running_statistics_is_refused(training):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False))
    model.to(DTYPE).train(training)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.randn(5, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fisher_diag(model, all_params(model), batch, CE)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_batch_norm_in_training_mode_is_refused_by_fisher_diag():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).to(DTYPE).train()
    batch = (torch.randn(5, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="training mode"):
        fisher_diag(model, all_params(model), batch, CE)
    assert int(model[1].num_batches_tracked) == 0


# ---------------------------------------------------------------------------------------------
# 5. hooks and reparametrisations take the generic path
# ---------------------------------------------------------------------------------------------


def test_forward_hooks_and_pre_hooks_are_honoured():
    model = mlp()
    model[0].register_forward_hook(lambda m, args, out: 2.0 * out)
    model[2].register_forward_pre_hook(lambda m, args: (args[0] + 0.5,))
    batch = (torch.randn(6, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 1, 0, 2]))
    check_all_exact(model, batch, CE)


def test_prune_reparametrisation_is_exact():
    model = mlp()
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.4)
    batch = (torch.randn(6, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 1, 0, 2]))
    params = {k: v for k, v in all_params(model).items() if k != "0.bias"}
    check_all_exact(model, batch, CE, params=params)


# ---------------------------------------------------------------------------------------------
# 6. half precision: sums over data accumulate in float32
# ---------------------------------------------------------------------------------------------


def test_half_precision_products_accumulate_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(torch.bfloat16)
    params = all_params(model)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    batches = [(x[i : i + 1].bfloat16(), y[i : i + 1]) for i in range(64)]
    vector = {k: torch.ones_like(p) for k, p in params.items()}
    loss, grad, product = curvature_product(model, params, batches, CE, vector, curvature="ggn")
    assert all(t.dtype == torch.float32 for t in (*grad.values(), *product.values()))
    reference = nn.Sequential(nn.Linear(4, 3)).double()
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref_params = all_params(reference)
    _, ref_grad = loss_and_grad(reference, ref_params, (x.double(), y), CE)
    for k in grad:
        torch.testing.assert_close(grad[k].double(), ref_grad[k], rtol=0.02, atol=0.02)


# ---------------------------------------------------------------------------------------------
# 7. the same seed gives the same numbers in every process
# ---------------------------------------------------------------------------------------------

_SEEDED = """
import torch
from torch import nn
from lossprune.curvature import Statistic, compute_statistics
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 3)).double()
params = {k: v.detach() for k, v in model.named_parameters()}
batch = (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
requests = {Statistic("fisher_mc", 2), Statistic("hutchinson", 3), Statistic("fisher_mc", 5)}
stats = compute_statistics(model, params, batch, nn.CrossEntropyLoss(), requests,
                           generator=torch.Generator().manual_seed(1))
print(repr([float(v.sum()) for r in sorted(requests, key=str) for v in stats[r].values()]))
"""


class _HashedBySamples(Statistic):
    """A set of these iterates in increasing ``samples`` (hash = slot), like one hash seed."""

    def __hash__(self):
        return self.samples


class _HashedAgainstSamples(Statistic):
    """... and these in decreasing ``samples``, like another hash seed."""

    def __hash__(self):
        return 7 - self.samples


def test_random_statistics_do_not_depend_on_the_order_of_a_set_of_requests():
    """The in-process twin of the PYTHONHASHSEED test below: two set orders, same numbers."""
    model = mlp()
    batch = (torch.randn(8, 4, dtype=DTYPE), torch.randint(0, 3, (8,)))
    results = []
    for kind in (_HashedBySamples, _HashedAgainstSamples):
        requests = {kind("fisher_mc", 2), kind("hutchinson", 3), kind("fisher_mc", 5)}
        assert [r.samples for r in requests] == sorted(
            (r.samples for r in requests), reverse=kind is _HashedAgainstSamples
        )
        stats = compute_statistics(
            model,
            all_params(model),
            batch,
            CE,
            requests,
            generator=torch.Generator().manual_seed(1),
        )
        ordered = sorted(requests, key=lambda r: (r.kind, r.samples))
        results.append([stats[r][k] for r in ordered for k in stats[r]])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_random_statistics_do_not_depend_on_the_hash_seed():
    """Two interpreters with different string hashes (the order of a set of requests) agree."""
    src = Path(lossprune.__file__).resolve().parents[1]  # the lossprune under test
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _SEEDED],
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(src)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in ("0", "1")  # orders the three requests differently in a set
    ]
    outputs = [run.communicate()[0] for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert outputs[0] and outputs[0] == outputs[1]


# ---------------------------------------------------------------------------------------------
# 8. log-probability outputs, sums, batch means
# ---------------------------------------------------------------------------------------------


def test_log_softmax_with_nll_loss_is_the_fisher_of_the_logits():
    logits_model = mlp()
    model = nn.Sequential(*logits_model, nn.LogSoftmax(1))
    batch = (torch.randn(6, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 1, 0, 2]))
    loss_fn = nn.NLLLoss(weight=WEIGHT)
    check_all_exact(
        model, batch, loss_fn, ggn_model=logits_model, ggn_loss=nn.CrossEntropyLoss(weight=WEIGHT)
    )


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_divergence_batchmean_is_accepted_and_exact(log_target):
    logits_model = mlp()
    model = nn.Sequential(*logits_model, nn.LogSoftmax(1))
    x = torch.randn(6, 4, dtype=DTYPE)
    targets = torch.rand(6, 3, dtype=DTYPE).softmax(1)
    loss_fn = nn.KLDivLoss(reduction="batchmean", log_target=log_target)
    batch = (x, targets.log() if log_target else targets)

    def soft_cross_entropy(logits, t):  # the Fisher split at the logits, on probabilities
        return CE(logits, t.exp() if log_target else t)

    check_all_exact(model, batch, loss_fn, ggn_model=logits_model, ggn_loss=soft_cross_entropy)


def test_nll_loss_on_outputs_that_are_not_log_probabilities_is_refused():
    model = mlp()
    batch = (torch.randn(6, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 1, 0, 2]))
    with pytest.raises(ValueError, match="log-probabilities"):
        fisher_diag(model, all_params(model), batch, nn.NLLLoss())
    with pytest.raises(ValueError, match="log-probabilities"):
        ggn_vp(model, all_params(model), batch, nn.NLLLoss(), vectors_for(all_params(model), 2))


def test_plain_function_with_a_sum_is_detected():
    model = mlp()
    batch = (torch.randn(6, 4, dtype=DTYPE), torch.randn(6, 3, dtype=DTYPE))

    def summed(outputs, targets):
        return ((outputs - targets) ** 2).sum()

    with pytest.raises(ValueError, match="not the mean over examples"):
        fisher_diag(model, all_params(model), batch, summed)
    with pytest.raises(ValueError, match="not the mean over examples"):
        compute_statistics(model, all_params(model), batch, summed, [Statistic("hutchinson", 2)])
    # A mean written as a plain function passes.
    stats = compute_statistics(model, all_params(model), batch, lambda o, t: ((o - t) ** 2).mean())
    assert math.isfinite(stats.loss)


def test_loss_linear_in_the_outputs_is_refused():
    model = mlp()
    batch = (torch.randn(6, 4, dtype=DTYPE), torch.randn(6, 3, dtype=DTYPE))

    def linear(outputs, targets):
        return (outputs * targets).sum(1).mean()

    with pytest.raises(ValueError, match="zero output Hessian"):
        fisher_diag(model, all_params(model), batch, linear)


# ---------------------------------------------------------------------------------------------
# 9 and issue 11: models returning tuples, LSTMs, operations without second derivatives, NaNs
# ---------------------------------------------------------------------------------------------


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        logits = self.body(x)
        return logits, {"hidden": x.sum(1)}


def unpack_ce(outputs, targets):
    return nn.functional.cross_entropy(outputs[0], targets)


def test_models_returning_tuples():
    model = TupleModel()
    batch = (torch.randn(6, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 1, 0, 2]))
    params = all_params(model)
    x, y = batch
    close(
        loss_and_grad(model, params, batch, unpack_ce)[1],
        bf.unflatten(bf.gradient(model, params, x, y, unpack_ce), params),
    )
    h = bf.dense_hessian(model, params, x, y, unpack_ce)
    v = vectors_for(params, 3)
    close(hvp(model, params, batch, unpack_ce, v)[2], bf.products(h, v))
    g = bf.dense_ggn(model.body, {k[5:]: p for k, p in params.items()}, x, y, CE)
    close(
        ggn_vp(model, params, batch, unpack_ce, v)[2],
        {f"body.{k}": t for k, t in bf.products(g, {k[5:]: t for k, t in v.items()}).items()},
    )
    hutchinson_diag(model, params, batch, unpack_ce, probes=2)
    expected = {
        f"body.{k}": t for k, t in bf.diagonal(g, {k[5:]: p for k, p in params.items()}).items()
    }
    for fast in (True, False):
        close(fisher_diag(model, params, batch, unpack_ce, fast=fast), expected)
        fisher_diag_mc(model, params, batch, unpack_ce, samples=2, fast=fast)


class NotPerExample(nn.Module):
    def __init__(self, extra: str) -> None:
        super().__init__()
        self.body = mlp()
        self.extra = extra

    def forward(self, x):
        if self.extra == "scalar":  # no examples in dim 0
            return self.body(x), self.body[0].weight.sum()
        return self.body(x), x[:2]  # dim 0 is not the batch


@pytest.mark.parametrize(
    ("extra", "message"),
    [("scalar", "leaves are floating-point tensors"), ("slice", "hold the 6 examples in dim 0")],
)
def test_outputs_without_examples_in_dim_0_are_refused_by_the_diagonals(extra, message):
    model = NotPerExample(extra)
    batch = (torch.randn(6, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 1, 0, 2]))
    for diagonal in (fisher_diag, fisher_diag_mc):
        with pytest.raises(TypeError, match=message):
            diagonal(model, all_params(model), batch, unpack_ce)


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.out(h[:, -1])


def test_lstm_models_are_exact():
    torch.manual_seed(0)
    model = LSTMClassifier().to(DTYPE)
    batch = (torch.randn(4, 3, 3, dtype=DTYPE), torch.tensor([0, 1, 2, 1]))
    check_all_exact(model, batch, CE, k=2)


class _NoSecondDerivative(torch.autograd.Function):
    """tanh whose backward is not differentiable and which has no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class NoSecondDerivative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return _NoSecondDerivative.apply(self.fc(x))


def test_operation_without_second_derivative_raises_a_clear_error():
    model = NoSecondDerivative().to(DTYPE)
    params = all_params(model)
    batch = (torch.randn(5, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 1, 0]))
    with pytest.raises(TypeError, match="gradient is disconnected"):
        hvp(model, params, batch, CE, vectors_for(params, 1))
    curvature.products._WARNED_DOUBLE_BACKWARD.clear()
    with pytest.raises(TypeError, match="second derivatives"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "same numbers" promise before it
        hvp(model, params, batch, CE, vectors_for(params, 2))


class _RaisingBackward(torch.autograd.Function):
    """The backward of tanh, whose own backward (a second derivative) does not exist."""

    @staticmethod
    def forward(grad, y):
        return grad * (1 - y * y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("derivative for tanh_backward_backward is not implemented")


class _NoDoubleBackward(torch.autograd.Function):
    """tanh with a backward that cannot be differentiated and no forward-mode rule (torch.func
    style, so that only the missing derivatives fail)."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _RaisingBackward.apply(grad, y)


class NoDoubleBackward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return _NoDoubleBackward.apply(self.fc(x))


def test_operations_without_second_or_forward_derivatives_raise_without_a_false_promise():
    """No exact product exists: a clear error, and no "same numbers, slower" warning before it."""
    model = NoDoubleBackward().to(DTYPE)
    params = all_params(model)
    x, y = torch.randn(3, 4, dtype=DTYPE), torch.tensor([0, 1, 2])
    curvature.products._WARNED_DOUBLE_BACKWARD.clear()
    for k in (1, 2):
        with pytest.raises(TypeError, match="double-backward support"):
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # the fallback must not promise
                hvp(model, params, (x, y), CE, vectors_for(params, k))
    with pytest.raises(TypeError, match="forward-mode derivatives"):
        ggn_vp(model, params, (x, y), CE, vectors_for(params, 2))


class FusedAttention(nn.Module):
    """``scaled_dot_product_attention``: its default fused CPU kernel has neither a double
    backward nor forward-mode derivatives; the curvature passes run it by its math kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, -1)
        return self.out(nn.functional.scaled_dot_product_attention(q, k, v).flatten(1))


def test_fused_attention_is_exact_under_the_math_kernel_and_the_kernel_choice_is_restored():
    torch.manual_seed(0)
    model = FusedAttention().to(DTYPE)
    params = all_params(model)
    x, y = torch.randn(3, 3, 4, dtype=DTYPE), torch.tensor([0, 1, 2])
    with sdpa_kernel(SDPBackend.MATH):  # the brute-force reference needs it too
        h = bf.dense_hessian(model, params, x, y, CE)
        g = bf.dense_ggn(model, params, x, y, CE)
    flash_before = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_mem_efficient_sdp(False)  # a user's own choice, kept
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback is needed
            for k in (1, 2):
                vectors = vectors_for(params, k)
                close(hvp(model, params, (x, y), CE, vectors).products, bf.products(h, vectors))
                close(ggn_vp(model, params, (x, y), CE, vectors).products, bf.products(g, vectors))
        close(fisher_diag(model, params, (x, y), CE), bf.diagonal(g, params))
        assert torch.backends.cuda.flash_sdp_enabled() == flash_before
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    finally:
        torch.backends.cuda.enable_mem_efficient_sdp(True)


def test_fisher_mc_on_a_nan_batch_raises_non_finite_error():
    model = mlp()
    x = torch.randn(6, 4, dtype=DTYPE)
    x[2, 1] = float("nan")
    batch = (x, torch.tensor([0, 1, 2, 1, 0, 2]))
    for fast in (True, False):
        with pytest.raises(NonFiniteError, match="outputs are not finite"):
            fisher_diag_mc(model, all_params(model), batch, CE, samples=2, fast=fast)


def test_missing_statistic_names_the_request():
    model = mlp()
    batch = (torch.randn(6, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 1, 0, 2]))
    stats = compute_statistics(model, all_params(model), batch, CE, [Statistic("fisher")])
    with pytest.raises(ValueError, match="hutchinson.*was not requested"):
        stats[Statistic("hutchinson", 3)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_products_take_float32_vectors(dtype):
    """The compensation solver's conjugate-gradient vectors are float32 (the statistics dtype)
    for a half-precision model: the products run in the model's dtype, the sums in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    params = all_params(model)
    batches = [(torch.randn(8, 4).to(dtype), torch.randint(0, 3, (8,))) for _ in range(2)]
    vector = {k: torch.randn(p.shape) for k, p in params.items()}  # float32
    for curvature_kind in ("ggn", "hessian"):
        _, grad, product = curvature_product(
            model, params, batches, CE, vector, curvature=curvature_kind
        )
        assert all(t.dtype == torch.float32 for t in (*grad.values(), *product.values()))
        assert all(torch.isfinite(t).all() for t in product.values())


def test_parameters_the_loss_does_not_use_have_zero_products():
    model = nn.ModuleDict({"used": nn.Linear(4, 3), "unused": nn.Linear(2, 2)}).to(DTYPE)
    model.forward = lambda x: model["used"](x)  # type: ignore[method-assign]
    params = all_params(model)
    batch = (torch.randn(5, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 1, 0]))
    for k in (1, 2):
        products = hvp(model, params, batch, CE, vectors_for(params, k))[2]
        assert all(not products[n].any() for n in params if n.startswith("unused"))


class CountsCalls(nn.Module):
    """A module that updates a buffer in its forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_layout_proof_and_statistics_leave_buffers_untouched():
    model = CountsCalls().to(DTYPE)
    batch = (torch.randn(5, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 1, 0]))
    params = all_params(model)
    fisher_diag(model, params, batch, CE)
    hvp(model, params, batch, CE, vectors_for(params, 2))
    assert float(model.calls) == 0


@pytest.mark.parametrize("fast", [True, False])
def test_monte_carlo_fisher_is_unbiased_for_weighted_per_position_logits(fast):
    """z = sqrt(c_u / k) (e_y - p_u), positions sampled independently: E = the exact diagonal."""
    torch.manual_seed(0)
    model = TokenLogits().to(DTYPE)
    x = torch.randn(3, 4, 3, dtype=DTYPE)
    y = torch.tensor([[0, 1, 2, -100], [2, -100, -100, 1], [1, 1, 0, 2]])
    loss_fn = nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.1)
    params = all_params(model)
    exact = fisher_diag(model, params, (x, y), loss_fn)
    gen = torch.Generator().manual_seed(0)
    estimates = [
        fisher_diag_mc(model, params, (x, y), loss_fn, samples=50, generator=gen, fast=fast)
        for _ in range(40)
    ]
    for k in exact:
        stacked = torch.stack([e[k] for e in estimates])
        standard_error = stacked.std(0) / len(estimates) ** 0.5
        assert torch.all((stacked.mean(0) - exact[k]).abs() <= 5 * standard_error + 1e-10), k


def test_segmentation_logits_with_two_spatial_dims_are_exact():
    """(N, C, H, W) logits of a chain of convolutions, class weights and ignored pixels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Conv2d(3, 3, 1)).to(DTYPE)
    x = torch.randn(2, 2, 3, 3, dtype=DTYPE)
    y = torch.randint(0, 3, (2, 2, 2))
    y[0, 1, 0] = -100
    check_all_exact(model, (x, y), nn.CrossEntropyLoss(weight=WEIGHT), k=2)


def test_token_logits_closed_form_matches_the_dense_output_hessian():
    """Language-model layout (N, T, V), labels (N, T): class weights, smoothing, ignored tokens."""
    from lossprune.curvature.outputs import softmax_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, dtype=DTYPE)
    labels = torch.tensor([[0, 2, -100, 1], [1, -100, -100, 2]])
    options = {"weight": WEIGHT, "ignore_index": -100, "label_smoothing": 0.1}

    def loss(o):
        return nn.functional.cross_entropy(o.transpose(1, 2), labels, **options)

    space = softmax_cross_entropy(logits, labels, class_dim=-1, **options)
    dense = torch.func.hessian(loss)(logits).reshape(24, 24)
    s = space.sqrt_columns()
    torch.testing.assert_close(torch.block_diag(*(s @ s.transpose(1, 2))), dense)
    r = torch.randn(2, 5, 4, 3, dtype=DTYPE)  # (N, k, T, V)
    blocks = dense.view(2, 12, 2, 12).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (N, 12, 12)
    expected = torch.einsum("nij,nkj->nki", blocks, r.reshape(2, 5, 12))
    torch.testing.assert_close(space.ggn_product(r).reshape(2, 5, 12), expected)
    z = space.sample_columns(20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        torch.block_diag(*(z @ z.transpose(1, 2))), dense, rtol=0.1, atol=0.01
    )
    with pytest.raises(ValueError, match="class_dim must be 1 or -1"):
        softmax_cross_entropy(logits, labels, class_dim=2)


def test_per_example_path_runs_vmapped_not_one_example_at_a_time(monkeypatch):
    """The generic per-example Fisher vmaps over examples; its one-by-one fallback (for modules
    that cannot run under vmap, e.g. LSTMs) must not be taken for a plain model, where it is
    N times slower with the same numbers."""
    from lossprune._common.functional import FunctionalModel
    from lossprune.curvature import diagonals

    calls = []
    original = FunctionalModel.__call__

    def counting(self, params, inputs):
        calls.append(1)
        return original(self, params, inputs)

    monkeypatch.setattr(FunctionalModel, "__call__", counting)
    model = mlp()
    params = all_params(model)
    batch = (torch.randn(6, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 1, 0, 2]))
    fmodel = FunctionalModel(model, params)
    cotangents = torch.randn(6, 3, 2, dtype=DTYPE)
    total = diagonals._sum_squared_per_example_vjps(fmodel, params, batch[0], cotangents, None)
    assert len(calls) == 1  # one vmapped call over all six examples
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    for n in range(6):
        for r in range(2):
            grads = torch.autograd.grad(
                (model(batch[0][n : n + 1])[0] * cotangents[n, :, r]).sum(),
                list(model.parameters()),
            )
            for (k, _), g in zip(model.named_parameters(), grads):
                expected[k] += g * g
    for k in params:
        torch.testing.assert_close(total[k], expected[k])


class TokenMixer(nn.Module):
    """Token ids -> (N, V, T) logits, with positions coupled (a causal mix of the embeddings)."""

    def __init__(self, vocab=7, width=4, length=5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(length, length, bias=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.embed(ids).transpose(1, 2)).transpose(1, 2))
        return self.head(h).transpose(1, 2)


def test_exact_fisher_too_large_for_dense_columns_is_built_block_by_block(monkeypatch):
    """A tensor-input model whose (N, T·V, T·V) square-root columns would not fit in memory gets
    the same exact diagonal one example at a time, its columns block by block."""
    from lossprune.curvature import diagonals
    from lossprune.curvature.outputs import SoftmaxCrossEntropy

    model = TokenMixer().to(DTYPE)
    params = all_params(model)
    ids = torch.randint(0, 7, (3, 5))
    targets = torch.randint(0, 7, (3, 5))
    targets[0, 1] = -100  # an ignored token has no columns
    dense = fisher_diag(model, params, (ids, targets), CE, fast=False)
    monkeypatch.setattr(diagonals, "_DENSE_COLUMN_ELEMENTS", 1)
    monkeypatch.setattr(
        SoftmaxCrossEntropy, "sqrt_columns", lambda self: pytest.fail("dense columns built")
    )
    blockwise = fisher_diag(model, params, (ids, targets), CE, fast=False)
    for k in params:
        torch.testing.assert_close(blockwise[k], dense[k], rtol=1e-10, atol=1e-12)


class _OldStyleTanh(torch.autograd.Function):
    """An autograd.Function without ``setup_context`` (BLOOM's GeLU is one): torch.func cannot
    transform it, plain reverse mode can (its backward is made of differentiable operations)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * (1 - torch.tanh(x) ** 2)


class _OldStyleMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(_OldStyleTanh.apply(self.fc1(x)))


def test_an_autograd_function_torch_func_cannot_transform_runs_in_reverse_mode():
    """The gradient, Hessian- and Gauss-Newton-vector products of a model whose activation is
    an old-style autograd.Function equal the dense brute force of its plain twin (float64)."""
    torch.manual_seed(0)
    model = _OldStyleMLP().to(DTYPE)
    twin = nn.Sequential(model.fc1, nn.Tanh(), model.fc2)  # the same weights, plain tanh
    x = torch.randn(6, 4, dtype=DTYPE)
    y = torch.randint(0, 3, (6,))
    params = {k: p.detach() for k, p in model.named_parameters()}
    twin_params = {k.replace("fc1", "0").replace("fc2", "2"): v for k, v in params.items()}
    vectors = {k: torch.randn(2, *p.shape, dtype=DTYPE) for k, p in params.items()}
    result = loss_and_grad(model, params, (x, y), CE)
    expected = bf.gradient(twin, twin_params, x, y, CE)
    torch.testing.assert_close(bf.flatten(result.grad), expected, rtol=1e-12, atol=1e-14)
    curvature.products._WARNED_DOUBLE_BACKWARD.clear()  # said once per process
    for product, dense in ((hvp, bf.dense_hessian), (ggn_vp, bf.dense_ggn)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = product(model, params, (x, y), CE, vectors)
        matrix = dense(twin, twin_params, x, y, CE)
        for j in range(2):
            v = bf.flatten({k: t[j] for k, t in vectors.items()})
            torch.testing.assert_close(
                bf.flatten({k: t[j] for k, t in got.products.items()}), matrix @ v,
                rtol=1e-10, atol=1e-12,
            )  # fmt: skip
        torch.testing.assert_close(bf.flatten(got.grad), expected, rtol=1e-12, atol=1e-14)
        if product is ggn_vp:  # said once, not silent
            assert any("Gauss-Newton-vector" in str(w.message) for w in caught)
