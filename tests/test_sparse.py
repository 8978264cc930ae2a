"""lossprune.sparse: N:M masks, CSR/BSR and 2:4 export, and the per-layer speed report.

Numbers are checked in float64 against the dense model; timings are only checked for structure
(speed is measured by benchmarks/sparse_speed.py, never asserted).
"""

import copy
import doctest
import importlib
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize, prune

from lossprune import LinearSchedule, Magnitude, Pruner
from lossprune.sparse import (
    FormTiming,
    LayerTiming,
    SparseLinear,
    SpeedReport,
    _timing,
    is_nm,
    nm_mask,
    speed_report,
    to_semi_structured,
    to_sparse,
)

F64 = torch.float64
CE = nn.CrossEntropyLoss()


class Conv1D(nn.Module):
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2), written out: transformers is
    not installed here. Weight stored (in, out); forward is addmm(bias, x, weight)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"


class OtherConv1D(Conv1D):
    """Same name elsewhere: not Hugging Face's, so not converted."""


OtherConv1D.__name__ = "Conv1D"
OtherConv1D.__module__ = "somewhere.else"


class Net(nn.Module):
    """A Linear, a Conv1D and an unpruned head, on (batch, tokens, features) inputs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.act = nn.Tanh()
        self.proj = Conv1D(48, 32)  # 32 -> 48
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        return self.head(self.act(self.proj(self.act(self.fc(x)))))


def pruned_net(sparsity=0.8, dtype=F64):
    net = Net().to(dtype)
    with torch.no_grad():
        for weight in (net.fc.weight, net.proj.weight):
            weight.masked_fill_(torch.rand(weight.shape) < sparsity, 0.0)
    return net


def weights_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def assert_close_to_dense(sparse_out, dense_out, tol=1e-12):
    scale = dense_out.abs().max()
    assert torch.allclose(sparse_out, dense_out, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("module", ["lossprune.sparse", "lossprune.selection.nm"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------------
# N:M masks
# --------------------------------------------------------------------------------------------


def brute_force_nm(scores, n, m, dim):
    """Loop over every group; prune the m - n lowest, lower index first among ties."""
    moved = scores.movedim(dim, -1)
    keep = torch.ones_like(moved, dtype=torch.bool)
    for index in itertools.product(*(range(s) for s in moved.shape[:-1])):
        row = moved[index].tolist()
        for start in range(0, len(row), m):
            group = sorted(range(start, start + m), key=lambda j: (row[j], j))
            for j in group[: m - n]:
                keep[index + (j,)] = False
    return keep.movedim(-1, dim)


@pytest.mark.parametrize(
    "shape, n, m, dim",
    [((6, 8), 2, 4, 1), ((8, 6), 1, 2, 0), ((3, 4, 6), 2, 3, -1), ((4, 12), 3, 4, 1)],
)
def test_nm_mask_matches_brute_force_with_exact_counts(shape, n, m, dim):
    # Few distinct values: many ties, which must go to the lower index first.
    scores = torch.randint(0, 3, shape).to(F64)
    mask = nm_mask(scores, n, m, dim)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.equal(mask, brute_force_nm(scores, n, m, dim))
    groups = mask.movedim(dim, -1).reshape(-1, m)
    assert torch.all(groups.sum(-1) == n)
    assert is_nm(mask, n, m, dim)
    assert torch.equal(nm_mask(scores.to(torch.int64), n, m, dim), mask)


@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 3),
    m=st.integers(1, 5),
    rows=st.integers(1, 3),
    dim=st.sampled_from([0, 1]),
    data=st.data(),
)
def test_nm_mask_property_against_brute_force(groups, m, rows, dim, data):
    n = data.draw(st.integers(1, m))
    shape = (groups * m, rows) if dim == 0 else (rows, groups * m)
    values = data.draw(st.lists(st.integers(-2, 2), min_size=shape[0] * shape[1], max_size=64))
    scores = torch.tensor(values[: shape[0] * shape[1]], dtype=F64).reshape(shape)
    mask = nm_mask(scores, n, m, dim)
    assert torch.equal(mask, brute_force_nm(scores, n, m, dim))
    assert is_nm(mask, n, m, dim) and int(mask.sum()) == n * groups * rows


def test_is_nm_counts_at_most_n_per_group():
    mask = torch.tensor([[True, False, False, False, True, True, False, False]])
    assert is_nm(mask, 2, 4, 1)
    assert is_nm(mask, 1, 4, 1) is False
    assert is_nm(mask.t(), 2, 4, 0)
    assert not is_nm(torch.ones(2, 8, dtype=torch.bool), 2, 4, 1)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.zeros(2, 4), 3, 2, 1), ValueError, "n must satisfy 1 <= n <= m = 2"),
        ((torch.zeros(2, 4), 0, 4, 1), ValueError, "n must satisfy"),
        ((torch.zeros(2, 6), 2, 4, 1), ValueError, "m = 4 must divide the size 6"),
        ((torch.zeros(2, 4), 2, 4, 2), ValueError, "dim must be in \\[-2, 2\\)"),
        ((torch.zeros(2, 4), 2.0, 4, 1), TypeError, "n must be an int"),
        ((torch.zeros(2, 4), 2, 4, 1.0), TypeError, "dim must be an int"),
        ((torch.zeros(2, 4), 2, 0, 1), ValueError, "m must be >= 1"),
        (([[0.0, 1.0]], 1, 2, 1), TypeError, "scores must be a tensor"),
        ((torch.zeros(2, 4, dtype=torch.bool), 2, 4, 1), TypeError, "must be a real tensor"),
        ((torch.tensor([[0.0, float("nan")]]), 1, 2, 1), ValueError, "contains NaN"),
    ],
)
def test_nm_mask_refuses_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        nm_mask(*args)


def test_is_nm_needs_a_bool_mask():
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        is_nm(torch.zeros(2, 4), 2, 4, 1)
    with pytest.raises(ValueError, match="must divide"):
        is_nm(torch.zeros(2, 6, dtype=torch.bool), 2, 4, 1)


# --------------------------------------------------------------------------------------------
# CSR and BSR
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, blocksize", [("csr", None), ("bsr", (8, 8)), ("bsr", (2, 2))])
def test_to_sparse_computes_the_dense_function_and_leaves_the_model_alone(layout, blocksize):
    net = pruned_net()
    before = weights_of(net)
    x = torch.randn(3, 7, 16, dtype=F64)
    sparse = to_sparse(net, layout, blocksize=blocksize)
    assert_unchanged(net, before)
    assert type(net.fc) is nn.Linear and type(net.proj) is Conv1D
    # fc and proj are 80 % zero; the dense head stays as it was.
    assert isinstance(sparse.fc, SparseLinear) and isinstance(sparse.proj, SparseLinear)
    assert type(sparse.head) is nn.Linear
    assert sparse.fc.weight.layout == getattr(torch, f"sparse_{layout}")
    # Conv1D's (in, out) weight becomes the Linear orientation (out, in).
    assert torch.equal(sparse.proj.weight.to_dense(), net.proj.weight.detach().t())
    assert list(sparse.state_dict()) == list(net.state_dict())
    with torch.no_grad():
        out = sparse(x)
        assert out.is_contiguous() and out.shape == (3, 7, 5)
        assert_close_to_dense(out, net(x))


def test_to_sparse_exports_what_a_pruner_pruned_after_fine_tuning():
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    data = (torch.randn(32, 6, dtype=F64), torch.randint(0, 3, (32,)))
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.75, stages=2), data=data, loss_fn=CE)
    pruner.run()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach(optimizer)  # gradient hooks on the parameters, not on the modules
    for _ in range(2):
        optimizer.zero_grad()
        CE(model(data[0]), data[1]).backward()
        optimizer.step()
    sparse = to_sparse(model)
    for index in (0, 2):
        kept = int(pruner.masks[f"{index}.weight"].sum())
        assert sparse[index].weight.values().numel() == kept
    with torch.no_grad():
        assert_close_to_dense(sparse(data[0]), model(data[0]))


def test_to_sparse_stores_only_the_nonzeros_and_converts_named_layers():
    net = pruned_net()
    sparse = to_sparse(net, min_sparsity=0.0)
    assert isinstance(sparse.head, SparseLinear)  # no zeros, still converted at threshold 0
    assert sparse.fc.weight.values().numel() == int(net.fc.weight.count_nonzero())
    only = to_sparse(net, layers=["head"])
    assert isinstance(only.head, SparseLinear) and type(only.fc) is nn.Linear
    x = torch.randn(4, 16, dtype=F64)
    with torch.no_grad():
        assert_close_to_dense(only(x), net(x))


def test_to_sparse_replaces_a_shared_layer_everywhere_and_a_bare_linear():
    shared = nn.Linear(6, 6).double()
    with torch.no_grad():
        shared.weight[:, :4] = 0.0
    model = nn.Sequential(shared, nn.Tanh(), shared)
    sparse = to_sparse(model)
    assert sparse[0] is sparse[2] and isinstance(sparse[0], SparseLinear)
    named_twice = to_sparse(model, layers=["0", "2"])
    assert named_twice[0] is named_twice[2] and isinstance(named_twice[0], SparseLinear)
    assert torch.equal(named_twice[0].weight.to_dense(), shared.weight.detach())
    bare = to_sparse(shared)
    assert isinstance(bare, SparseLinear)
    x = torch.randn(5, 6, dtype=F64)
    with torch.no_grad():
        assert_close_to_dense(sparse(x), model(x))
        assert_close_to_dense(bare(x), shared(x))


def test_sparse_model_can_be_copied_moved_and_reloaded():
    net = pruned_net()
    sparse = to_sparse(net)
    duplicate = copy.deepcopy(sparse)
    assert duplicate.fc.weight is not sparse.fc.weight
    x = torch.randn(2, 16, dtype=F64)
    with torch.no_grad():
        assert torch.equal(duplicate(x), sparse(x))
        single = copy.deepcopy(sparse).float()
        assert single.fc.weight.dtype == torch.float32
        assert torch.allclose(single(x.float()).double(), sparse(x), atol=1e-5)
    reloaded = to_sparse(net)  # the same pattern: torch copies sparse tensors entry for entry
    with torch.no_grad():
        reloaded.fc.weight.values().zero_()
    reloaded.load_state_dict(sparse.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(x), sparse(x))
    assert list(sparse.parameters()) == list(sparse.head.parameters())  # buffers don't train


def test_sparse_linear_without_bias_and_its_repr():
    linear = nn.Linear(8, 4, bias=False).double()
    with torch.no_grad():
        linear.weight[:, ::2] = 0.0
    sparse = to_sparse(linear)
    assert sparse.bias is None
    assert "layout=torch.sparse_csr, stored=0.500" in repr(sparse)
    x = torch.randn(3, 8, dtype=F64)
    with torch.no_grad():
        assert_close_to_dense(sparse(x), linear(x))


def test_sparse_linear_handles_vectors_empty_batches_and_input_gradients():
    linear = nn.Linear(8, 4).double()
    with torch.no_grad():
        linear.weight[:, :5] = 0.0
    sparse = to_sparse(linear)
    vector = torch.randn(8, dtype=F64)
    with torch.no_grad():
        assert_close_to_dense(sparse(vector), linear(vector))
        assert sparse(torch.zeros(0, 8, dtype=F64)).shape == (0, 4)
    x = torch.randn(3, 8, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(sparse(x).square().sum(), x)
    x_ref = x.detach().requires_grad_()
    (grad_ref,) = torch.autograd.grad(linear(x_ref).square().sum(), x_ref)
    assert_close_to_dense(grad, grad_ref)


def test_sparse_linear_needs_a_sparse_weight():
    with pytest.raises(ValueError, match="must be a 2-d sparse CSR or BSR tensor"):
        SparseLinear(torch.zeros(3, 4))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"layout": "coo"}, ValueError, "layout must be one of"),
        ({"layout": "csr", "blocksize": (2, 2)}, ValueError, "blocksize applies only to"),
        ({"layout": "bsr"}, TypeError, "needs blocksize=\\(rows, columns\\)"),
        ({"layout": "bsr", "blocksize": (2, 0)}, ValueError, "blocksize must be >= 1"),
        ({"layout": "bsr", "blocksize": (5, 5)}, ValueError, "blocksize \\(5, 5\\) must divide"),
        ({"layout": "bsr", "blocksize": (8, 4)}, ValueError, "blocksize must be square"),
        ({"layout": "bsr", "blocksize": (1, 1)}, ValueError, "blocksize \\(1, 1\\) is CSR"),
        ({"min_sparsity": 1.0}, ValueError, "min_sparsity must satisfy"),
        ({"min_sparsity": 0.95}, ValueError, "nothing to convert"),
        ({"layers": ["nope"]}, ValueError, "'nope' is not a module of the model"),
        ({"layers": ["act"]}, ValueError, "'act' is a Tanh, not an nn.Linear"),
        ({"layers": [3]}, TypeError, "layers must be None, a module name"),
        ({"layers": []}, TypeError, "layers must be None"),
        ({"layers": 3}, TypeError, "layers must be None"),
    ],
)
def test_to_sparse_refuses_before_copying(kwargs, error, match):
    net = pruned_net()
    before = weights_of(net)
    with pytest.raises(error, match=match):
        to_sparse(net, **kwargs)
    assert_unchanged(net, before)


def test_to_sparse_refuses_layers_it_cannot_convert_faithfully():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        to_sparse(torch.zeros(3))
    net = pruned_net()
    prune.l1_unstructured(net.fc, "weight", amount=0.5)  # a pre-hook recomputes the weight
    with pytest.raises(ValueError, match="layer 'fc' has hooks.*from_torch_prune"):
        to_sparse(net)
    net = pruned_net()
    parametrize.register_parametrization(net.fc, "weight", nn.Identity())
    with pytest.raises(ValueError, match="'fc' is a ParametrizedLinear, not an nn.Linear"):
        to_sparse(net, layers="fc")
    half = pruned_net(dtype=torch.float16)
    with pytest.raises(TypeError, match="csr on cpu supports dtypes.*got torch.float16"):
        to_sparse(half)
    lookalike = nn.Sequential(OtherConv1D(4, 8))
    with pytest.raises(ValueError, match="is a Conv1D, not an nn.Linear"):
        to_sparse(lookalike, layers=["0"])
    on_meta = nn.Sequential(nn.Linear(4, 4, device="meta"))
    with pytest.raises(ValueError, match="supported on cpu and cuda, not on meta"):
        to_sparse(on_meta, layers=["0"])


def test_weights_that_are_not_plain_dense_matrices_are_refused():
    model = nn.Sequential(nn.Linear(4, 4).double())
    model[0].weight = nn.Parameter(torch.eye(4, dtype=F64).to_sparse_csr(), requires_grad=False)
    for convert in (to_sparse, to_semi_structured):
        with pytest.raises(ValueError, match="layer '0' has no plain dense weight"):
            convert(model)
    with pytest.raises(ValueError, match="layer '0' has no plain dense weight"):
        speed_report(model, torch.randn(2, 4, dtype=F64))


def test_subclasses_of_linear_stay_dense():
    attention = nn.MultiheadAttention(8, 2).double()
    with torch.no_grad():
        attention.out_proj.weight.zero_()
    with pytest.raises(ValueError, match="nothing to convert"):
        to_sparse(attention)  # out_proj's weight is read by the attention itself


def test_a_transformers_linear_subclass_computing_f_linear_is_converted():
    """Falcon's FalconLinear writes ``x @ W.T + b`` itself: converted, the same numbers; a
    transformers subclass whose forward is another function stays dense."""
    transformers = pytest.importorskip("transformers")
    config = transformers.FalconConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        new_decoder_architecture=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(config).double().eval()
    Pruner(model, Magnitude(), LinearSchedule(0.9, 1)).run()
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    sparse = to_sparse(model)
    assert type(sparse.transformer.h[0].mlp.dense_h_to_4h).__name__ == "SparseLinear"
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, model(ids).logits, rtol=1e-10, atol=1e-12)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    Scaled.__module__ = "transformers.models.made_up"  # as if transformers defined it
    layer = Scaled(8, 4).double()
    with torch.no_grad():
        layer.weight[:, :6] = 0
    with pytest.raises(ValueError, match="nothing to convert"):
        to_sparse(nn.Sequential(layer))
    with pytest.raises(ValueError, match="a transformers subclass computing F.linear"):
        to_sparse(nn.Sequential(layer), layers=["0"])


# --------------------------------------------------------------------------------------------
# 2:4 semi-structured
# --------------------------------------------------------------------------------------------


def two_four_linear(out_features=64, in_features=64, dtype=torch.float16, device="cpu"):
    linear = nn.Linear(in_features, out_features).to(device, dtype)
    with torch.no_grad():
        linear.weight.mul_(nm_mask(linear.weight.abs(), 2, 4, dim=1))
    return linear


def test_to_semi_structured_refusals_on_cpu_come_before_the_device_check():
    model = nn.Sequential(two_four_linear(), nn.ReLU(), two_four_linear(16, 64))
    before = weights_of(model)
    with pytest.raises(ValueError, match="need a CUDA device of compute capability >= 8.0"):
        to_semi_structured(model)
    with pytest.raises(TypeError, match="must be float16 or bfloat16, got torch.float32"):
        to_semi_structured(copy.deepcopy(model).float())
    wide = nn.Sequential(nn.Linear(30, 64).half())
    with torch.no_grad():
        wide[0].weight.zero_()
    with pytest.raises(ValueError, match="size 30 is not divisible by 4"):
        to_semi_structured(wide)
    small = nn.Sequential(two_four_linear(8, 64))
    with pytest.raises(ValueError, match=r"multiples of \(\d+, \d+\) for torch.float16"):
        to_semi_structured(small)
    dense_group = two_four_linear()
    with torch.no_grad():
        dense_group.weight[3, 8:11] = 1.0  # three non-zeros in columns 8-11 of row 3
    with pytest.raises(
        ValueError, match="not 2:4 along the input dimension \\(row 3, columns 8-11"
    ):
        to_semi_structured(nn.Sequential(dense_group))
    with pytest.raises(ValueError, match="nothing to convert"):
        to_semi_structured(nn.Sequential(nn.Linear(64, 64).half()))
    assert_unchanged(model, before)


def test_conv1d_is_2_4_along_its_first_dimension():
    # Conv1D stores (in, out): its input dimension, where 2:4 groups run, is dim 0.
    conv = Conv1D(64, 128).half()  # 128 inputs, 64 outputs
    with torch.no_grad():
        conv.weight.mul_(nm_mask(conv.weight.abs(), 2, 4, dim=0))
    with pytest.raises(ValueError, match="need a CUDA device"):  # every other check passed
        to_semi_structured(nn.Sequential(conv))
    wrong = Conv1D(64, 128).half()
    with torch.no_grad():
        wrong.weight.mul_(nm_mask(wrong.weight.abs(), 2, 4, dim=1))
    with pytest.raises(ValueError, match="not 2:4 along the input dimension"):
        to_semi_structured(nn.Sequential(wrong))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_semi_structured_matches_dense_on_cuda():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 kernels need compute capability >= 8.0")
    torch.manual_seed(0)
    model = nn.Sequential(two_four_linear(128, 256, device="cuda"), nn.ReLU())
    model.append(Conv1D(128, 128).cuda().half())
    with torch.no_grad():
        model[2].weight.mul_(nm_mask(model[2].weight.abs(), 2, 4, dim=0))
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    sparse = to_semi_structured(model)
    assert type(model[0].weight) is nn.Parameter and model[0].weight.layout == torch.strided
    assert isinstance(sparse[0].weight, torch.sparse.SparseSemiStructuredTensor)
    assert isinstance(sparse[2].weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        dense_out, sparse_out = model(x).double(), sparse(x).double()
    assert torch.allclose(sparse_out, dense_out, rtol=1e-2, atol=1e-2 * dense_out.abs().max())
    report = speed_report(model, x, layouts=("semi_structured",), repeats=2)
    assert report.all_agree and report.device.startswith("cuda")
    assert all(layer.forms[0].skipped is None for layer in report.layers)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout, blocksize", [("csr", None), ("bsr", (8, 8))])
def test_to_sparse_matches_dense_on_cuda(layout, blocksize):
    net = pruned_net().cuda()
    x = torch.randn(3, 7, 16, dtype=F64, device="cuda")
    sparse = to_sparse(net, layout, blocksize=blocksize)
    assert sparse.fc.weight.device.type == "cuda"
    with torch.no_grad():
        assert_close_to_dense(sparse(x), net(x))


# --------------------------------------------------------------------------------------------
# Speed report
# --------------------------------------------------------------------------------------------


def test_speed_report_structure_and_agreement():
    net = pruned_net()
    x = torch.randn(3, 4, 16, dtype=F64)
    before = weights_of(net)
    report = speed_report(
        net, x, layouts=("csr", "bsr", "semi_structured"), blocksize=(16, 16), repeats=2
    )
    assert_unchanged(net, before)
    assert isinstance(report, SpeedReport) and report.device == "cpu" and report.repeats == 2
    assert [layer.name for layer in report.layers] == ["fc", "proj", "head"]
    fc, proj, head = report.layers
    assert all(isinstance(layer, LayerTiming) for layer in report.layers)
    assert (fc.shape, proj.shape, head.shape) == ((32, 16), (48, 32), (5, 48))
    assert fc.rows == 12 and fc.dtype == F64
    assert fc.sparsity == pytest.approx(1 - int(net.fc.weight.count_nonzero()) / (32 * 16))
    assert head.sparsity == 0.0
    for layer in report.layers:
        assert [form.layout for form in layer.forms] == ["csr", "bsr", "semi_structured"]
        assert all(isinstance(form, FormTiming) for form in layer.forms)
        csr = layer.forms[0]
        assert csr.agrees and csr.max_abs_error <= 1e-12 and csr.seconds > 0
        assert csr.speedup == pytest.approx(layer.dense_seconds / csr.seconds)
        assert "must be float16 or bfloat16" in layer.forms[2].skipped
    assert fc.forms[1].agrees and head.forms[1].skipped.startswith("layer 'head': blocksize")
    assert report.all_agree
    assert sorted(report.faster("csr") + report.slower("csr")) == ["fc", "head", "proj"]
    assert report.faster("semi_structured") == report.slower("semi_structured") == ()
    dense, best = report.linear_seconds("csr")
    assert dense == pytest.approx(sum(layer.dense_seconds for layer in report.layers))
    expected = sum(
        layer.forms[0].seconds if layer.name in report.faster("csr") else layer.dense_seconds
        for layer in report.layers
    )
    assert best == pytest.approx(expected) and best <= dense
    text = str(report)
    assert "csr ms (speed-up)" in text and "proj" in text and "48x32" in text
    assert "csr: pays off on" in text and "not measured:" in text and "MISMATCH" not in text


def test_speed_report_accepts_positional_and_keyword_inputs():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4).double(), nn.Linear(4, 2).double()

        def forward(self, x, y):
            return self.b(self.a(x) + y)

    model = Pair()
    x, y = torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    by_position = speed_report(model, (x, y), repeats=1)
    by_keyword = speed_report(model, {"x": x, "y": y}, repeats=1)
    for report in (by_position, by_keyword):
        assert [layer.name for layer in report.layers] == ["a", "b"] and report.all_agree


def test_speed_report_flags_a_sparse_form_that_disagrees(monkeypatch):
    class Off(SparseLinear):
        def forward(self, x):  # one part in 10^9: far above float64 rounding
            return super().forward(x) * (1 + 1e-9)

    monkeypatch.setattr(_timing, "SparseLinear", Off)
    report = speed_report(pruned_net(), torch.randn(4, 16, dtype=F64), repeats=1)
    assert not report.all_agree and not report.layers[0].forms[0].agrees
    assert "MISMATCH" in str(report)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"layouts": "csr"}, TypeError, "layouts must be a tuple of layout names"),
        ({"layouts": ("csr", "csr")}, ValueError, "layouts must be distinct names"),
        ({"layouts": ("coo",)}, ValueError, "layouts must be distinct names"),
        ({"layouts": ("bsr",)}, TypeError, "needs blocksize"),
        ({"repeats": 0}, ValueError, "repeats must be >= 1"),
    ],
)
def test_speed_report_validates_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        speed_report(pruned_net(), torch.randn(2, 16, dtype=F64), **kwargs)


def test_speed_report_needs_inputs_and_linear_layers():
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        speed_report(pruned_net(), None)
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D layer of the model ran"):
        speed_report(nn.Sequential(nn.Tanh()), torch.randn(2, 3))
    report = speed_report(pruned_net(), torch.randn(2, 16, dtype=F64), repeats=1)
    with pytest.raises(ValueError, match="'bsr' is not in this report's layouts"):
        report.faster("bsr")
