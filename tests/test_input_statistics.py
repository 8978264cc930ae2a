"""Input moments of weight matrices (mean squared inputs, Gram matrices) against per-row loops."""

import pytest
import torch
from torch import nn

from lossprune.curvature.inputs import InputStatistics

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D


class Stack(nn.Module):
    """A Linear over (N, T, 4), an HF Conv1D over the flattened (N·T, 6), a per-example head."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.second = Conv1D(5, 6)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        hidden = torch.tanh(self.first(x))
        flat = torch.tanh(self.second(hidden.reshape(-1, 6)))
        return self.head(flat.reshape(x.shape[0], x.shape[1], 5).mean(1))


def loop_moments(model, batches):
    """Σ x xᵀ / n over counted rows, one position at a time (no lossprune code)."""
    grams = {"first": torch.zeros(4, 4), "second": torch.zeros(6, 6), "head": torch.zeros(5, 5)}
    grams = {k: v.double() for k, v in grams.items()}
    rows = dict.fromkeys(grams, 0)
    for x, counted in batches:
        for n in range(len(x)):
            with torch.no_grad():
                hidden = torch.tanh(model.first(x[n]))  # (T, 6)
                flat = torch.tanh(model.second(hidden))  # (T, 5)
            for t in range(x.shape[1]):
                if counted is None or counted[n, t]:
                    inputs, middle = x[n, t].double(), hidden[t].double()
                    grams["first"] += torch.outer(inputs, inputs)
                    grams["second"] += torch.outer(middle, middle)
                    rows["first"] += 1
                    rows["second"] += 1
            if counted is None or counted[n].any():
                pooled = flat.mean(0).double()
                grams["head"] += torch.outer(pooled, pooled)
                rows["head"] += 1
    return {k: (grams[k] / rows[k], rows[k]) for k in grams}


def record(model, batches, **options):
    names = ["first.weight", "second.weight", "head.weight"]
    statistics = InputStatistics(model, names, gram=True, **options)
    for x, counted in batches:
        with statistics.recording(counted):
            model(x)
    return statistics.means()


def test_gram_matrices_and_diagonals_match_a_per_position_loop():
    torch.manual_seed(0)
    model = Stack().double()
    counted = torch.tensor([[True, True, False], [False, False, False], [True, False, True]])
    batches = [(torch.randn(3, 3, 4, dtype=torch.float64), counted),
               (torch.randn(2, 3, 4, dtype=torch.float64), None)]  # fmt: skip
    got = record(model, batches, dtype=torch.float64)
    expected = loop_moments(model, batches)
    for module, (gram, rows) in expected.items():
        moments = got[f"{module}.weight"]
        assert moments.rows == rows
        torch.testing.assert_close(moments.gram, gram, rtol=1e-12, atol=1e-14)
        diagonal = gram.diagonal()
        shape = (-1, 1) if module == "second" else (1, -1)  # Conv1D stores (in, out)
        torch.testing.assert_close(moments.sq_norms, diagonal.reshape(shape), rtol=1e-12, atol=0)


class OneHead(nn.Module):
    """A Linear that reads (N, 1, T, in): DeepSeek-V3's kv_b_proj on its single-head latents."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 2)

    def forward(self, x):
        return self.proj(x.unsqueeze(1)).squeeze(1)


def test_a_linear_reading_positions_with_a_dimension_of_one_put_in_counts_them():
    torch.manual_seed(0)
    model = OneHead().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    counted = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    statistics = InputStatistics(model, ["proj.weight"], gram=True, dtype=torch.float64)
    with statistics.recording(counted):
        model(x)
    moments = statistics.means()["proj.weight"]
    rows = x[counted]  # (r, 4): the counted positions
    assert moments.rows == len(rows)
    torch.testing.assert_close(moments.gram, rows.T @ rows / len(rows), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_accumulate_in_float32(dtype):
    torch.manual_seed(1)
    model = Stack().to(dtype)
    x = torch.randn(4, 3, 4).to(dtype)
    got = record(model, [(x, None)])
    for module, (gram, _) in loop_moments(model, [(x, None)]).items():
        moments = got[f"{module}.weight"]
        assert moments.gram.dtype == torch.float32 and moments.sq_norms.dtype == torch.float32
        # The half-precision inputs, squared and summed without rounding to the half type.
        torch.testing.assert_close(moments.gram.double(), gram.double(), rtol=1e-6, atol=1e-6)


def test_unsupported_requests_are_refused_before_any_hook():
    model = Stack()
    with pytest.raises(ValueError, match="float32 or float64"):
        InputStatistics(model, ["first.weight"], dtype=torch.float16)
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2))
    with pytest.raises(TypeError, match="no Gram matrix"):
        InputStatistics(conv, ["0.weight"], gram=True)
    with pytest.raises(TypeError, match="none for 'first.bias'"):
        InputStatistics(model, ["first.bias"])
    shared = nn.Sequential(nn.Linear(4, 4), Conv1D(4, 4))
    shared[1].weight = shared[0].weight
    with pytest.raises(TypeError, match="read its input dimension differently"):
        InputStatistics(shared, ["0.weight"])
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_no_counted_position_and_a_convolution_with_padding_are_refused():
    model = Stack()
    statistics = InputStatistics(model, ["first.weight"])
    with statistics.recording(torch.zeros(2, 3, dtype=torch.bool)):
        model(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="no input of 'first.weight' is at a counted position"):
        statistics.means()
    conv = nn.Sequential(nn.Conv1d(4, 2, 1))
    statistics = InputStatistics(conv, ["0.weight"])
    with pytest.raises(TypeError, match="no per-position rows"):
        with statistics.recording(torch.tensor([[True, False]])):
            conv(torch.randn(1, 4, 2))


def test_convolution_gram_matrices_and_means_are_those_of_the_unfolded_patches():
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Linear(2, 4))
    conv = conv.double()
    batches = [torch.randn(2, 2, 4, 4, dtype=torch.float64) for _ in range(2)]
    statistics = InputStatistics(conv, ["0.weight", "2.weight"], gram=True, dtype=torch.float64)
    for x in batches:
        with statistics.recording():
            conv(x)
    moments = statistics.means()
    patches = torch.cat(
        [
            nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
            for x in batches
        ]
    )
    torch.testing.assert_close(moments["0.weight"].gram, patches.T @ patches / len(patches))
    torch.testing.assert_close(moments["0.weight"].mean, patches.mean(0))
    hidden = torch.cat([conv[1](conv[0](x)).reshape(-1, 2) for x in batches])
    torch.testing.assert_close(moments["2.weight"].mean, hidden.mean(0))
    assert moments["2.weight"].rows == len(hidden)
