r"""The loss and its quadratic model along one direction (curvature.quadratic_form).

Float64 against brute force: :math:`L`, :math:`g^\top v` and :math:`v^\top C v` with a dense
Hessian (:func:`torch.func.hessian` of the loss of the flat parameter vector) or a dense
Gauss-Newton matrix :math:`J^\top (\partial^2 L/\partial f^2) J`, on the case table, through
LayerNorm, and on Hugging Face models with dict batches and their own loss; the fallback for an
operation without a forward-mode rule; and the Pruner's diagnostics against the gradient +
curvature-vector-product path they replaced.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lossprune import LinearSchedule, Pruner, QuadraticModel
from lossprune._common.model_loss import resolve_loss
from lossprune.curvature import ggn_vp
from lossprune.curvature import products as curvature_products
from lossprune.curvature import quadratic_form as qf
from lossprune.curvature.quadratic_form import quadratic_form
from lossprune.pruning._diagnostics import curvature_product, predicted_loss_change
from tests import brute_force as bf
from tests.cases import CASES, DTYPE, build, case_params
from tests.hf_models import TokenBlocks, tiny_gpt2, tiny_llama, transformers
from tests.test_curvature import NoForwardAD
from tests.test_transformers_core import (
    all_prunable,
    micro_gpt2,
    reference_ggn,
    reference_loss,
    token_batch,
)

CE = nn.CrossEntropyLoss()
CURVATURES = ("hessian", "ggn")


def direction(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, dtype=p.dtype, generator=gen) for k, p in params.items()}


def expected_form(matrix, grad, loss, v):
    """(L, g·v, vᵀ C v) from a dense gradient and matrix of the flat parameter vector."""
    flat = bf.flatten(v)
    return loss, grad @ flat, flat @ matrix @ flat


def assert_form(form, expected, rtol=1e-10, atol=1e-12):
    for actual, wanted, what in zip(form, expected, ("loss", "slope", "curvature"), strict=True):
        torch.testing.assert_close(
            actual.to(DTYPE), torch.as_tensor(wanted, dtype=DTYPE), rtol=rtol, atol=atol, msg=what
        )


# --- the case table: every model and loss of the curvature tests -----------------------------


@pytest.mark.parametrize("curvature", CURVATURES)
@case_params(CASES)
def test_matches_the_dense_hessian_and_gauss_newton_matrix(case, device, curvature):
    model, params, batch, loss_fn = build(case, device)
    v = direction({k: p.cpu() for k, p in params.items()})
    v = {k: t.to(device) for k, t in v.items()}
    dense = bf.dense_hessian if curvature == "hessian" else bf.dense_ggn
    matrix = dense(model, params, *batch, loss_fn)
    grad = bf.gradient(model, params, *batch, loss_fn)
    loss = bf.mean_loss(model, params, *batch, loss_fn)
    form = quadratic_form(model, params, batch, loss_fn, v, curvature=curvature)
    assert_form(form, expected_form(matrix, grad, loss, v))


class Normed(nn.Module):
    """Linear → LayerNorm → Tanh → Linear: nested forward mode is wrong through LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def autograd_hessian(model, params, x, y, loss_fn):
    """The dense Hessian by reverse-over-reverse, one row at a time (no torch.func)."""

    def loss_of(theta):
        return bf.mean_loss(model, bf.unflatten(theta, params), x, y, loss_fn)

    return torch.autograd.functional.hessian(loss_of, bf.flatten(params))


@pytest.mark.parametrize("with_norm_weight", [False, True], ids=["linear", "norm-weight"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_the_hessian_through_layer_norm_is_exact(loss, with_norm_weight):
    """A forward-over-forward second derivative (PyTorch's nested JVP of native_layer_norm,
    pytorch/pytorch#196700) fails here: vᵀHv of the Linear weights is 1.05 instead of 0.77.

    With the LayerNorm weight differentiated, :func:`torch.func.hessian` (jacfwd of jacrev) is
    itself wrong in torch 2.13 (0.076 instead of 2.58 in a one-layer check, finite differences
    agreeing with reverse-over-reverse), so the reference is then
    :func:`torch.autograd.functional.hessian`.
    """
    torch.manual_seed(0)
    model = Normed().to(DTYPE)
    names = ("fc1.weight", "fc2.weight") + (("norm.weight",) if with_norm_weight else ())
    params = {k: p.detach() for k, p in model.named_parameters() if k in names}
    x = torch.randn(7, 6, dtype=DTYPE)
    loss_fn, y = (CE, torch.randint(0, 3, (7,))) if loss == "ce" else (
        nn.MSELoss(), torch.randn(7, 3, dtype=DTYPE)
    )  # fmt: skip
    v = direction(params)
    dense = autograd_hessian if with_norm_weight else bf.dense_hessian
    matrix = dense(model, params, x, y, loss_fn)
    grad = bf.gradient(model, params, x, y, loss_fn)
    expected = expected_form(matrix, grad, bf.mean_loss(model, params, x, y, loss_fn), v)
    assert_form(quadratic_form(model, params, (x, y), loss_fn, v), expected)


# --- Hugging Face models: dict batches, padding, the model's own loss ------------------------


def micro_llama() -> nn.Module:
    """Grouped-query attention (two query heads share one key/value head), RMSNorm, rotary."""
    config = transformers.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().to(DTYPE)


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("build_model", [micro_gpt2, micro_llama], ids=["gpt2", "llama"])
def test_hugging_face_models_with_dict_batches_and_their_own_loss(build_model, curvature):
    model = build_model()
    params = all_prunable(model)
    batch = token_batch()  # padded: attention_mask 0 and labels -100 on some positions

    def loss_of(flat):
        return reference_loss(model, bf.unflatten(flat, params), batch)

    theta = bf.flatten(params)
    if curvature == "hessian":
        matrix = torch.func.hessian(loss_of)(theta)
    else:
        matrix = reference_ggn(model, params, batch)
    grad = torch.func.grad(loss_of)(theta)
    v = direction(params)
    with torch.no_grad():
        loss = loss_of(theta)
    form = quadratic_form(model, params, batch, None, v, curvature=curvature)
    # Llama's RMSNorm and rotary embedding compute in float32 even in a float64 model.
    rtol = 1e-9 if build_model is micro_gpt2 else 1e-7
    assert_form(form, expected_form(matrix, grad, loss, v), rtol=rtol, atol=1e-11)


# --- an operation without a forward-mode rule ------------------------------------------------


def no_forward_ad_case():
    torch.manual_seed(0)
    model = NoForwardAD().to(DTYPE)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(5, 6, dtype=DTYPE), torch.randint(0, 3, (5,)))
    twin = NoForwardAD(plain=True).to(DTYPE)  # the same function with torch.tanh
    twin.load_state_dict(model.state_dict())
    return model, twin, params, batch


def test_the_hessian_needs_no_forward_mode():
    model, twin, params, batch = no_forward_ad_case()
    v = direction(params)
    matrix = bf.dense_hessian(twin, params, *batch, CE)
    expected = expected_form(
        matrix, bf.gradient(twin, params, *batch, CE), bf.mean_loss(twin, params, *batch, CE), v
    )
    assert_form(quadratic_form(model, params, batch, CE, v), expected)


def test_gauss_newton_without_forward_mode_takes_reverse_mode_alone():
    """Not a chain, and no forward-mode rule: the products' generic path falls back to reverse
    mode alone (Jv by the double-backward trick), said once; the products and the quadratic
    form equal the dense Gauss-Newton matrix of the plain twin."""
    model, twin, params, batch = no_forward_ad_case()
    v = direction(params)
    stacked = {k: t.unsqueeze(0) for k, t in v.items()}
    curvature_products._WARNED_DOUBLE_BACKWARD.clear()  # said once per process
    with pytest.warns(RuntimeWarning, match="double-backward Gauss-Newton-vector products"):
        products = ggn_vp(model, params, batch, CE, stacked).products
    matrix = bf.dense_ggn(twin, params, *batch, CE)
    torch.testing.assert_close(
        bf.flatten({k: t[0] for k, t in products.items()}), matrix @ bf.flatten(v),
        rtol=1e-10, atol=1e-12,
    )  # fmt: skip
    expected = expected_form(
        matrix, bf.gradient(twin, params, *batch, CE), bf.mean_loss(twin, params, *batch, CE), v
    )
    assert_form(quadratic_form(model, params, batch, CE, v, curvature="ggn"), expected)


def test_gauss_newton_fallback_gives_the_same_numbers(monkeypatch):
    """Forward mode failing in an MLP (a chain): the fused products give the same numbers, and
    the fall-back is announced once."""
    model, _, params, batch = no_forward_ad_case()
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    params = {k: p.detach() for k, p in model.named_parameters()}
    v = direction(params)
    fast = quadratic_form(model, params, batch, CE, v, curvature="ggn")

    def no_forward_mode(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with an_op that does not support it")

    monkeypatch.setattr(qf, "jvp", no_forward_mode)
    qf._WARNED_FORWARD_MODE.clear()
    with pytest.warns(RuntimeWarning, match="an_op.*same numbers"):
        fallback = quadratic_form(model, params, batch, CE, v, curvature="ggn")
    assert_form(fallback, tuple(fast))
    expected = expected_form(
        bf.dense_ggn(model, params, *batch, CE),
        bf.gradient(model, params, *batch, CE),
        bf.mean_loss(model, params, *batch, CE),
        v,
    )
    assert_form(fallback, expected)


def test_vectors_must_have_the_keys_and_shapes_of_params():
    model, _, params, batch = no_forward_ad_case()
    v = direction(params)
    with pytest.raises(ValueError, match="exactly the keys"):
        quadratic_form(model, params, batch, CE, {"fc1.weight": v["fc1.weight"]})
    with pytest.raises(ValueError, match="curvature must be"):
        quadratic_form(model, params, batch, CE, v, curvature="fisher")


# --- the Pruner's diagnostics: the numbers of the path they replaced -------------------------


def product_path(model, params, delta, data, loss_fn, curvature):
    """The former predicted_loss_change: mean gradient and C·Δ, dotted with Δ in float64."""
    loss, grad, product = curvature_product(
        model, params, data, loss_fn, delta, curvature=curvature
    )
    change = sum(
        float((grad[k].double() * delta[k]).sum() + 0.5 * (product[k].double() * delta[k]).sum())
        for k in delta
    )
    return loss, change


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("build_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_predicted_change_over_a_loader_equals_the_product_path(build_model, curvature):
    """Two dict batches with different numbers of counted tokens (weighted per token)."""
    torch.manual_seed(0)
    model = build_model().to(DTYPE)
    params = all_prunable(model)
    loader = DataLoader(TokenBlocks(6), batch_size=4)  # batches of 4 and 2 sequences
    delta = {k: 0.1 * t for k, t in direction(params).items()}
    loss_fn = resolve_loss(model, None)
    new = predicted_loss_change(model, params, delta, loader, loss_fn, curvature=curvature)
    old = product_path(model, params, delta, loader, loss_fn, curvature)
    # Llama's RMSNorm and rotary embedding compute in float32 even in a float64 model.
    assert new == pytest.approx(old, rel=1e-10 if build_model is tiny_gpt2 else 1e-7)


def test_stage_report_predicts_what_the_product_path_predicts():
    torch.manual_seed(0)
    model = tiny_gpt2().to(DTYPE)
    before = copy.deepcopy(model)
    loader = DataLoader(TokenBlocks(6), batch_size=4)
    pruner = Pruner(
        model, QuadraticModel(lam=1e-3), LinearSchedule(0.5, 1), data=loader, diagnostics=True
    )
    report = pruner.step()
    theta = {k: before.get_parameter(k).detach() for k in pruner.params}
    delta = {k: model.get_parameter(k).detach() - theta[k] for k in pruner.params}
    loss, change = product_path(before, theta, delta, loader, resolve_loss(before, None), "hessian")
    assert report.loss_before == pytest.approx(loss, rel=1e-12)
    assert report.predicted_delta == pytest.approx(change, rel=1e-10)
