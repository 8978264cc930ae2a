"""Wanda and the input statistic ‖X_j‖² it reads, against per-example brute-force loops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossprune import LinearSchedule, Pruner, QuadraticModel, Wanda, scores
from lossprune.curvature import Statistic, compute_statistics
from lossprune.selection import select_masks

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D
CE = nn.CrossEntropyLoss()
INPUTS = Statistic("input_sq_norms")


def sequence_model():
    """A Linear applied at 3 positions, then an HF Conv1D: inputs (N, 3, 4)."""
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Flatten(), Conv1D(3, 18)).double()


def conv_model():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(2),  # (N, 4, 9): a 1-d signal of length 9
        nn.Conv1d(4, 4, 2, groups=2, padding=1, dilation=2),
        nn.Flatten(),
        nn.Linear(4 * 9, 3),
    ).double()


def patches_2d(x, kernel, stride, padding, dilation):
    """Every (in·kh·kw) patch of one example (in, h, w), by explicit slicing."""
    x = F.pad(x, (padding, padding, padding, padding))
    span = dilation * (kernel - 1) + 1
    out = []
    for i in range(0, x.shape[1] - span + 1, stride):
        for j in range(0, x.shape[2] - span + 1, stride):
            out.append(x[:, i : i + span : dilation, j : j + span : dilation].reshape(-1))
    return torch.stack(out)


def brute_force_sequence(model, batches):
    """Means over every row: the Linear sees 3 positions per example, the Conv1D one row."""
    linear_in = torch.zeros(4, dtype=torch.float64)
    conv1d_in = torch.zeros(18, dtype=torch.float64)
    examples = 0
    for inputs, _ in batches:
        for x in inputs:  # one example at a time, one position at a time
            for t in range(3):
                linear_in += x[t] ** 2
            hidden = torch.tanh(model[0](x)).reshape(-1)
            conv1d_in += hidden**2
            examples += 1
    return {
        "0.weight": linear_in.unsqueeze(0) / (3 * examples),
        "3.weight": conv1d_in.unsqueeze(1) / examples,
    }


def brute_force_conv(model, batches):
    first = torch.zeros(2 * 3 * 3, dtype=torch.float64)
    second = torch.zeros(4 * 2, dtype=torch.float64)
    last = torch.zeros(36, dtype=torch.float64)
    rows = [0, 0, 0]
    for inputs, _ in batches:
        for x in inputs:
            patches = patches_2d(x, 3, 2, 1, 1)
            first += patches.square().sum(0)
            rows[0] += len(patches)
            h = torch.tanh(model[0](x.unsqueeze(0))).flatten(2)[0]  # (4, 9)
            padded = F.pad(h, (1, 1))
            for t in range(0, padded.shape[1] - 2):  # kernel 2, dilation 2: taps t, t + 2
                second += padded[:, [t, t + 2]].reshape(-1) ** 2
                rows[1] += 1
            last += model[3](h.unsqueeze(0)).reshape(-1) ** 2
            rows[2] += 1
    in_per_group = second.reshape(2, 1, 2, 2)  # groups, 1, in/groups, k
    conv1d = in_per_group.expand(2, 2, 2, 2).reshape(4, 2, 2)
    return {
        "0.weight": first.reshape(1, 2, 3, 3) / rows[0],
        "3.weight": conv1d / rows[1],
        "5.weight": last[None] / rows[2],
    }


@pytest.mark.parametrize(
    "make, shape, brute_force",
    [(sequence_model, (3, 4), brute_force_sequence), (conv_model, (2, 5, 5), brute_force_conv)],
)
def test_input_sq_norms_are_means_over_every_example_and_position(make, shape, brute_force):
    model = make()
    batches = [
        (torch.randn(n, *shape, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (5, 3)
    ]
    params = {k: p.detach() for k, p in model.named_parameters() if k.endswith("weight")}
    statistics = compute_statistics(model, params, batches, CE, [INPUTS])
    expected = brute_force(model, batches)
    assert set(statistics[INPUTS]) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(statistics[INPUTS][name], value, rtol=1e-12, atol=1e-12)


def test_wanda_scores_are_weight_magnitude_times_input_norm():
    model = sequence_model()
    batches = [(torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    got = scores(model, Wanda(), batches, loss_fn=CE)
    means = brute_force_sequence(model, batches)
    for name, score in got.items():
        weight = model.get_parameter(name).detach()
        torch.testing.assert_close(score, weight.abs() * means[name].sqrt(), rtol=1e-12, atol=0)


class CountingBatches:
    """A re-iterable of batches that counts how often it is read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


def test_wanda_composes_with_a_loss_model_in_one_pass():
    model = sequence_model()
    batches = [(torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    combined, alone = CountingBatches(batches), CountingBatches(batches)
    together = scores(model, Wanda() + 0.5 * QuadraticModel(lam=1e-3), combined, loss_fn=CE)
    scores(model, QuadraticModel(lam=1e-3), alone, loss_fn=CE)
    assert combined.reads == alone.reads  # the input statistic adds no pass over the data
    wanda = scores(model, Wanda(), batches, loss_fn=CE)
    qm = scores(model, QuadraticModel(lam=1e-3), batches, loss_fn=CE)
    for name in together:
        torch.testing.assert_close(together[name], wanda[name] + 0.5 * qm[name])


@pytest.mark.parametrize(
    "model, include, match",
    [
        (
            nn.Sequential(nn.ConvTranspose2d(2, 2, 2), nn.Flatten(), nn.Linear(18, 3)),
            r"0\.weight",
            "only nn.Linear",
        ),
        (nn.Sequential(nn.Linear(4, 3)), r"0\.bias", "not the weight matrix"),
    ],
)
def test_unsupported_parameters_are_refused(model, include, match):
    batch = (
        torch.randn(4, 2, 2, 2) if isinstance(model[0], nn.ConvTranspose2d) else torch.randn(4, 4),
        torch.randint(0, 3, (4,)),
    )
    with pytest.raises(TypeError, match=match):
        scores(model, Wanda(), batch, loss_fn=CE, include=include)


def test_a_projection_applied_functionally_is_refused():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    batch = (torch.randn(4, 5, 4), torch.randint(0, 3, (4,)))
    with pytest.raises(TypeError, match="not called through their forward"):
        scores(Attention().eval(), Wanda(), batch, loss_fn=CE, include=r"attn\.out_proj\.weight")


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_wanda_with_layerwise_and_global_ranks_the_whole_matrix_or_all_of_them(scope):
    model = sequence_model()
    batches = [(torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    expected_scores = scores(model, Wanda(), batches, loss_fn=CE)
    pruner = Pruner(model, Wanda(), LinearSchedule(0.5, 1), loss_fn=CE, data=batches, scope=scope)
    before = dict(pruner.masks)
    pruner.step()
    expected = select_masks(expected_scores, before, sparsity=0.5, scope=scope)
    assert all(torch.equal(pruner.masks[k], expected[k]) for k in expected)
