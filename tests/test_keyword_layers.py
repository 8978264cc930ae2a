"""Keyword-input models: covered layers from one batched pass, checked on every batch.

The batched path (:func:`lossprune.curvature.contractions.layer_ggn_diag` with keyword inputs)
must give what the one-example-at-a-time path gives (its slow twin, checked against dense
per-example Jacobians in ``test_per_example.py``), and must refuse, on the batch, any model
whose examples are coupled, so that the numbers stay those of the slow twin.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lossprune.curvature import (
    alone_check,
    broadcast_tables,
    contractions,
    diagonals,
    fisher_diag,
    fisher_diag_mc,
    module_grads,
)
from lossprune.curvature.layers import HFConv1DRule, parameter_uses, rule_for
from lossprune.selection import prunable_parameters
from tests.hf_models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama, transformers

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}


def _batch(name: str, examples: int = 4, length: int = 6) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (examples, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    if name == "bert":
        labels = torch.arange(examples) % 3
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    labels = ids.clone()
    labels[0, -2:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _relative_error(actual: dict, expected: dict) -> float:
    """Per tensor, relative to its largest entry; a tensor whose exact diagonal is zero (BERT's
    key biases: softmax ignores a shift shared by all keys) holds rounding noise only, so the
    scale is at least 1e-8 of the largest entry of all."""
    floor = 1e-8 * max(float(e.abs().max()) for e in expected.values())
    return max(
        float((actual[k] - expected[k]).abs().max()) / max(float(expected[k].abs().max()), floor)
        for k in expected
    )


def _spy(monkeypatch) -> list:
    """The results of every batched keyword pass (``None``: it left the batch to the slow path)."""
    results: list = []
    original = diagonals._keyword_layers_pass

    def spying(*args):
        results.append(original(*args))
        return results[-1]

    monkeypatch.setattr(diagonals, "_keyword_layers_pass", spying)
    return results


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_parameter_matches_the_slow_twin_with_the_same_labels(name, monkeypatch):
    """Prunable layers batched; embeddings, norms and biases one example at a time, pulling
    back the SAME sampled columns: the sum is the slow twin's, label for label."""
    torch.manual_seed(0)
    model = BUILDERS[name]().double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    batch = _batch(name)
    results = _spy(monkeypatch)
    fast = fisher_diag_mc(model, params, batch, None, samples=2,
                          generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert results and results[0] is not None
    slow = fisher_diag_mc(model, params, batch, None, samples=2,
                          generator=torch.Generator().manual_seed(5), fast=False)  # fmt: skip
    assert _relative_error(fast, slow) < 1e-10


@pytest.mark.parametrize("name", list(BUILDERS))
def test_float32_models_take_the_batched_path(name, monkeypatch):
    """The alone-versus-batch check passes at float32 rounding (kernels block a batch of one
    differently), so real models are not silently sent to the slow path."""
    torch.manual_seed(0)
    model = BUILDERS[name]()
    params = {k: p.detach() for k, p in prunable_parameters(model).items()}
    batch = _batch(name, examples=8, length=16)
    results = _spy(monkeypatch)
    fast = fisher_diag(model, params, batch, None) if name == "bert" else fisher_diag_mc(
        model, params, batch, None, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert results[0] is not None and set(results[0].diagonal) == set(params)
    slow = fisher_diag(model, params, batch, None, fast=False) if name == "bert" else (
        fisher_diag_mc(model, params, batch, None, generator=torch.Generator().manual_seed(0),
                       fast=False))  # fmt: skip
    assert _relative_error(fast, slow) < 1e-4


class TokenClassifier(nn.Module):
    """Keyword-input classifier; ``coupling`` makes an example's activations depend on others.

    * ``"batch_mean"``: the BATCH mean of the hidden states added to each (as batch statistics do);
    * ``"capacity"``: only the first ``capacity`` tokens of the batch reach the second layer,
      the later ones are dropped (capacity-limited expert routing, Switch Transformers);
    * ``None``: independent examples.
    """

    def __init__(self, coupling: str | None) -> None:
        super().__init__()
        self.coupling = coupling
        self.embed = nn.Embedding(VOCAB, 8)
        self.hidden = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(self.embed(input_ids)))  # (N, T, 8)
        if self.coupling == "batch_mean":
            h = h + h.mean(0, keepdim=True)
        elif self.coupling == "capacity":
            capacity = 2 * input_ids.shape[1]  # two examples' tokens
            kept = torch.arange(input_ids.numel()).reshape(input_ids.shape) < capacity
            h = h * kept.unsqueeze(-1)
        return self.out(h).mean(1)  # (N, 3)


def _token_batch() -> dict:
    """Four examples of five tokens and a class label each, for the small classifiers here."""
    ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "labels": torch.tensor([0, 1, 2, 1])}


@pytest.mark.parametrize("coupling", ["batch_mean", "capacity"])
def test_coupled_examples_are_left_to_the_slow_twin(coupling, monkeypatch):
    torch.manual_seed(0)
    model = TokenClassifier(coupling).double().eval()
    params = {k: p.detach() for k, p in model.named_parameters() if k.endswith("weight")}
    batch = _token_batch()
    loss = nn.CrossEntropyLoss()
    results = _spy(monkeypatch)
    fast = fisher_diag(model, params, batch, loss)
    assert results == [None]  # the last example alone differs from its rows of the batch
    slow = fisher_diag(model, params, batch, loss, fast=False)
    assert _relative_error(fast, slow) < 1e-12
    # Without the check, the batched contraction would be wrong: the check is what keeps it exact.
    monkeypatch.setattr(alone_check, "alone_matches", lambda *args: set())
    alone_check.COUPLED.clear()
    assert _relative_error(fisher_diag(model, params, batch, loss), slow) > 1e-3


def test_independent_examples_of_the_same_model_take_the_batched_path(monkeypatch):
    torch.manual_seed(0)
    model = TokenClassifier(None).double().eval()
    params = {k: p.detach() for k, p in model.named_parameters() if k.endswith("weight")}
    batch = _token_batch()
    results = _spy(monkeypatch)
    fast = fisher_diag(model, params, batch, nn.CrossEntropyLoss())
    assert results[0] is not None and set(results[0].diagonal) == set(params)
    slow = fisher_diag(model, params, batch, nn.CrossEntropyLoss(), fast=False)
    assert _relative_error(fast, slow) < 1e-12


def test_a_coupled_shape_is_remembered(monkeypatch):
    """After one refusal, batches of the same shapes skip the batched forward pass."""
    torch.manual_seed(0)
    model = TokenClassifier("batch_mean").double().eval()
    params = {k: p.detach() for k, p in model.named_parameters() if k.endswith("weight")}
    batch = _token_batch()
    checks = []
    original = alone_check.alone_matches
    monkeypatch.setattr(
        alone_check, "alone_matches", lambda *args: checks.append(1) or original(*args)
    )
    for _ in range(3):
        fisher_diag(model, params, batch, nn.CrossEntropyLoss())
    assert len(checks) == 1


@pytest.mark.parametrize("shape", [(5, 4), (3, 6, 4)], ids=["one position", "positions"])
def test_the_hf_conv1d_rule_is_the_per_example_loop(shape):
    r""":math:`\sum_n\sum_r (\sum_t a_{nt} \delta_{rnt}^\top)^2` for the ``(in, out)`` weight and
    the bias, against per-example autograd gradients."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(3, 4).double()
    rule = rule_for(layer, "c", {"c.weight": layer.weight, "c.bias": layer.bias},
                    parameter_uses(layer))  # fmt: skip
    assert isinstance(rule, HFConv1DRule)
    a = torch.randn(shape, dtype=torch.float64)
    columns = 2
    delta = torch.randn(columns, *shape[:-1], 3, dtype=torch.float64)
    expected = {"weight": torch.zeros_like(layer.weight), "bias": torch.zeros_like(layer.bias)}
    for r in range(columns):
        for n in range(shape[0]):
            out = layer(a[n : n + 1])
            grads = torch.autograd.grad(out, [layer.weight, layer.bias], delta[r, n : n + 1])
            expected["weight"] += grads[0] ** 2
            expected["bias"] += grads[1] ** 2
    got = rule.squared_contraction(a, delta, ["weight", "bias"])
    torch.testing.assert_close(got["weight"], expected["weight"])
    torch.testing.assert_close(got["bias"], expected["bias"])


@pytest.mark.filterwarnings("ignore:the exact Fisher:RuntimeWarning")
def test_exact_columns_too_large_for_memory_go_one_example_at_a_time(monkeypatch):
    """A language model's exact (N, T·V, T·V) square roots are never formed for the batch."""
    torch.manual_seed(0)
    model = tiny_gpt2().double()
    params = {k: p.detach() for k, p in prunable_parameters(model).items()}
    batch = _batch("gpt2", examples=2, length=3)
    expected = fisher_diag(model, params, batch, None, fast=False)
    monkeypatch.setattr(diagonals, "_DENSE_COLUMN_ELEMENTS", 100)
    results = _spy(monkeypatch)
    got = fisher_diag(model, params, batch, None)
    assert results == [None]
    assert _relative_error(got, expected) < 1e-12


def test_gpt2_conv1d_layers_are_covered():
    model = tiny_gpt2()
    names = {q for q in prunable_parameters(model) if ".attn.c_attn." in q or ".mlp.c_fc." in q}
    assert names
    uses = parameter_uses(model)
    for name in names:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert isinstance(module, transformers.pytorch_utils.Conv1D)
        assert isinstance(rule_for(module, "", {"weight": module.weight}, uses), HFConv1DRule)


@pytest.mark.parametrize("samples", [0, 2], ids=["fisher", "fisher_mc"])
def test_a_tensor_input_statistics_pass_takes_its_gradient_from_the_diagonal_pass(
    samples, monkeypatch
):
    """Covered layers (one tensor of inputs): the batched forward pass of the layer
    contractions also gives the loss and gradient; no separate gradient pass, same numbers."""
    from lossprune.curvature import Statistic, compute_statistics, loss_and_grad, statistics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    batch = (torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss_fn = nn.CrossEntropyLoss()
    expected = loss_and_grad(model, params, batch, loss_fn)
    request = Statistic("fisher_mc", samples) if samples else Statistic("fisher")
    monkeypatch.setattr(statistics, "loss_and_grad", lambda *a: pytest.fail("a gradient pass"))
    stats = compute_statistics(model, params, batch, loss_fn, [request],
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert stats.loss == pytest.approx(float(expected.loss), rel=1e-14)
    assert _relative_error(stats.grad, expected.grad) < 1e-13


def _families():
    from tests.test_families_end_to_end import FAMILIES

    return FAMILIES


@pytest.mark.parametrize("family", _families())
def test_every_family_takes_the_batched_path_with_the_slow_twins_numbers(family, monkeypatch):
    """The 18 families of the end-to-end test, float32, default prunable set, padded batches:
    the batch's examples are found uncoupled, and the batched diagonal is the one-by-one one."""
    from torch.utils.data import default_collate

    from tests.test_families_end_to_end import _model, _rows

    model = _model(family)
    batch = default_collate(_rows(family, getattr(model.config, "vocab_size", 0))[:4])
    params = {k: p.detach() for k, p in prunable_parameters(model).items()}
    results = _spy(monkeypatch)
    fast = fisher_diag_mc(model, params, batch, None, generator=torch.Generator().manual_seed(0))
    assert results[0] is not None
    slow = fisher_diag_mc(model, params, batch, None, generator=torch.Generator().manual_seed(0),
                          fast=False)  # fmt: skip
    assert _relative_error(fast, slow) < 1e-5


@pytest.mark.filterwarnings("ignore:the exact Fisher:RuntimeWarning")
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_keyword_batched_path_on_cuda(name, monkeypatch):
    """On a GPU (float32, whatever kernels a batch of one gets): the batched path is taken and
    gives the one-by-one numbers. The exact Fisher: CUDA's generator does not draw a batch's
    labels in the same order as one example's at a time."""
    _check_batched_path_on(torch.device("cuda"), name, monkeypatch)


def _check_batched_path_on(device: torch.device, name: str, monkeypatch) -> None:
    torch.manual_seed(0)
    model = BUILDERS[name]().to(device)
    params = {k: p.detach() for k, p in prunable_parameters(model).items()}
    batch = {k: v.to(device) for k, v in _batch(name, examples=8, length=8).items()}
    results = _spy(monkeypatch)
    fast = fisher_diag(model, params, batch, None)
    assert results[0] is not None and set(results[0].diagonal) == set(params)
    slow = fisher_diag(model, params, batch, None, fast=False)
    assert _relative_error(fast, slow) < 1e-3


@pytest.mark.filterwarnings("ignore:the exact Fisher:RuntimeWarning")
def test_the_device_check_runs_on_cpu(monkeypatch):
    """The body of the CUDA test, here on the CPU (so that it is known to pass)."""
    _check_batched_path_on(torch.device("cpu"), "llama", monkeypatch)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_norms_embeddings_and_tied_heads_are_batched_too(name, monkeypatch):
    """Every parameter: closed forms for the linear maps, the per-module pull-backs
    (module_grads) for norms, embeddings, Llama's head tied to its embedding and the position
    tables GPT-2 and BERT call on a (1, T) tensor broadcast over the batch; nothing is left to
    the one-example path."""
    torch.manual_seed(0)
    model = BUILDERS[name]().double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    batch = _batch(name)
    left = _left_one_by_one(monkeypatch)
    fisher_diag_mc(model, params, batch, None, generator=torch.Generator().manual_seed(0))
    assert left == []


class BroadcastTable(nn.Module):
    """Token embeddings plus a position table called on ``(1, T)`` positions.

    ``use`` says how the table's ``(1, T, D)`` row meets the batch:

    * ``"add"``: added to the ``(N, T, D)`` token embeddings (GPT-2, BERT);
    * ``"averaged_first"``: averaged over its leading dimension first: a no-op on one row, and
      on rows expanded to the batch the same numbers, but every example's cotangent is then
      spread over all rows (the alone check cannot see it: the outputs do not change);
    * ``"two_tables"``: two position tables added together before the token embeddings;
    * ``"in_place"``: scaled in place before it is added.
    """

    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use
        self.embed = nn.Embedding(VOCAB, 8)
        self.pos = nn.Embedding(5, 8)
        self.pos2 = nn.Embedding(5, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        row = self.pos(positions)
        if self.use == "averaged_first":
            row = row.mean(0, keepdim=True)
        elif self.use == "two_tables":
            row = row + self.pos2(positions)
        elif self.use == "in_place":
            row.mul_(2.0)
        h = torch.tanh(self.embed(input_ids) + row)
        return self.out(h).mean(1)


def _broadcast_table_case(use: str):
    torch.manual_seed(0)
    model = BroadcastTable(use).double().eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    if use != "two_tables":
        del params["pos2.weight"]  # unused
    return model, params, _token_batch(), nn.CrossEntropyLoss()


@pytest.mark.parametrize("diagonal", ["fisher", "fisher_mc"])
def test_a_broadcast_position_table_is_batched_with_the_slow_twins_numbers(diagonal, monkeypatch):
    """Its output is expanded to the batch's examples, so each example's cotangent reaches it:
    the exact and sampled diagonals of the table are the one-example-at-a-time ones."""
    model, params, batch, loss = _broadcast_table_case("add")

    def run(fast: bool) -> dict:
        if diagonal == "fisher":
            return fisher_diag(model, params, batch, loss, fast=fast)
        return fisher_diag_mc(model, params, batch, loss, samples=3, fast=fast,
                              generator=torch.Generator().manual_seed(4))  # fmt: skip

    left = _left_one_by_one(monkeypatch)
    fast = run(True)
    assert left == []
    slow = run(False)
    assert _relative_error(fast, slow) < 1e-12


@pytest.mark.parametrize("use", ["averaged_first", "two_tables", "in_place"])
def test_a_broadcast_table_used_otherwise_goes_one_by_one(use, monkeypatch):
    """Any use of the expanded row other than adding it to the examples' own rows refuses the
    expansion: the batch is run again with the table's own output, the table (and, used twice,
    its partner) goes one example at a time, and the refusal is remembered."""
    model, params, batch, loss = _broadcast_table_case(use)
    left = _left_one_by_one(monkeypatch)
    fast = fisher_diag(model, params, batch, loss)
    expected = {"pos.weight", "pos2.weight"} if use == "two_tables" else {"pos.weight"}
    assert left == [expected]
    assert set(broadcast_tables.UNEXPANDABLE[model]) >= {"pos"}
    slow = fisher_diag(model, params, batch, loss, fast=False)
    assert _relative_error(fast, slow) < 1e-12


def test_the_expansion_check_is_what_keeps_an_averaged_table_exact(monkeypatch):
    """Forced through on the averaged row, the expansion gives the same outputs (the alone
    check passes) but every example the other examples' cotangents: a wrong diagonal."""
    model, params, batch, loss = _broadcast_table_case("averaged_first")
    slow = fisher_diag(model, params, batch, loss, fast=False)
    monkeypatch.setattr(broadcast_tables, "only_rowwise_consumers", lambda *args: True)
    assert _relative_error(fisher_diag(model, params, batch, loss), slow) > 1e-3


@pytest.mark.parametrize("fast", [True, False], ids=["batched", "one-by-one"])
def test_a_table_the_loss_never_reads_has_a_zero_diagonal(fast):
    """Left alone to the one-example path (nothing else of it needs a gradient), an unused
    module's parameters get zeros, not autograd's error on an output without a graph."""
    model, _, batch, loss = _broadcast_table_case("add")
    unused = {"pos2.weight": model.pos2.weight.detach()}
    for diagonal in (fisher_diag(model, unused, batch, loss, fast=fast),
                     fisher_diag_mc(model, unused, batch, loss, fast=fast)):  # fmt: skip
        assert set(diagonal) == {"pos2.weight"} and not diagonal["pos2.weight"].any()


def test_consumers_lists_every_use_of_a_node():
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    z = (y + y.sin()).sum()
    found = module_grads.consumers(z.grad_fn, {(y.grad_fn, 0)})
    assert sorted(n.name() for n in found[(y.grad_fn, 0)]) == ["AddBackward0", "SinBackward0"]


class Router(nn.Module):
    """Returns its logits and the probabilities computed from them (as MoE routers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8) / 3)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(h, self.weight)
        return logits, logits.softmax(-1)


class Routed(nn.Module):
    """``logits_read``: the model also reads the router's logits (an auxiliary term)."""

    def __init__(self, logits_read: bool) -> None:
        super().__init__()
        self.logits_read = logits_read
        self.embed = nn.Embedding(VOCAB, 8)
        self.router = Router()
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        logits, probs = self.router(h.reshape(-1, 8))
        h = h * probs.reshape(h.shape)
        if self.logits_read:
            h = h + logits.reshape(h.shape).tanh()
        return self.out(h).mean(1)


@pytest.mark.parametrize("logits_read", [False, True], ids=["weights-only", "logits-too"])
def test_an_output_computed_from_another_is_not_pulled_back_twice(logits_read, monkeypatch):
    """A router's logits get the total cotangent (through its probabilities too): pulled back
    with the probabilities' they would count that path twice. Read only inside the call, they
    are dropped; read outside too, the router goes one example at a time."""
    torch.manual_seed(0)
    left, error = _left_and_error(Routed(logits_read).double().eval(), monkeypatch)
    assert left == ([{"router.weight"}] if logits_read else [])
    assert error < 1e-12


def _left_one_by_one(monkeypatch) -> list[set]:
    """The parameters each diagonal pass leaves to the one-example-at-a-time path."""
    left: list[set] = []
    original = diagonals.per_example_pass

    def recording(fmodel, rest, *args, **kwargs):
        left.append(set(rest))
        return original(fmodel, rest, *args, **kwargs)

    monkeypatch.setattr(diagonals, "per_example_pass", recording)
    return left


def _left_and_error(model: nn.Module, monkeypatch, batch: dict | None = None) -> tuple:
    """What the exact Fisher of every parameter leaves to the one-example path (cross-entropy,
    :func:`_token_batch` by default), and its largest relative error against the slow twin."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    batch = batch or _token_batch()
    loss = nn.CrossEntropyLoss()
    left = _left_one_by_one(monkeypatch)
    fast = fisher_diag(model, params, batch, loss)
    taken = list(left)  # before the slow twin runs the one-example path itself
    return taken, _relative_error(fast, fisher_diag(model, params, batch, loss, fast=False))


class NormMisuse(nn.Module):
    """A LayerNorm used in a way its own call does not show.

    * ``"weight_reused"``: its weight also multiplies the hidden states outside its call;
    * ``"output_in_place"``: its output is scaled in place after its call.
    """

    def __init__(self, misuse: str) -> None:
        super().__init__()
        self.misuse = misuse
        self.embed = nn.Embedding(VOCAB, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(input_ids))
        if self.misuse == "weight_reused":
            h = h * self.norm.weight
        else:
            h.mul_(2.0)
        return self.out(h).mean(1)


def test_a_parameter_used_outside_its_module_goes_one_by_one(monkeypatch):
    torch.manual_seed(0)
    model = NormMisuse("weight_reused").double().eval()
    with torch.no_grad():
        model.norm.weight.normal_()
    params = {k: p.detach() for k, p in model.named_parameters()}
    batch = _token_batch()
    loss = nn.CrossEntropyLoss()
    left = _left_one_by_one(monkeypatch)
    fast = fisher_diag(model, params, batch, loss)
    assert left == [{"norm.weight"}]  # the embedding, the bias and the Linear are batched
    slow = fisher_diag(model, params, batch, loss, fast=False)
    assert _relative_error(fast, slow) < 1e-12
    # Taken through the LayerNorm's call alone, its weight's diagonal would be wrong.
    monkeypatch.setattr(contractions, "reaches_only_through", lambda *args: True)
    assert _relative_error(fisher_diag(model, params, batch, loss), slow) > 1e-3


def test_the_edge_count_sees_a_use_outside_the_call():
    torch.manual_seed(0)
    model = NormMisuse("weight_reused").double()
    leaf = model.norm.weight.detach().requires_grad_(True)
    calls = []
    start = module_grads.sequence_now()
    with torch.enable_grad():
        h = torch.nn.functional.layer_norm(torch.randn(2, 8, dtype=torch.float64), (8,), leaf)
        end = module_grads.sequence_now()
        out = (h * leaf).sum()
    call = module_grads.ModuleCall(model.norm, {"weight": "w"}, (h,), (h,), None, start, end, 2)
    calls.append(call)
    total = module_grads.leaf_edges(out.grad_fn)[id(leaf)]
    assert total == 2
    assert not module_grads.reaches_only_through(leaf, calls, total)
    assert module_grads.reaches_only_through(leaf, calls, 1)


class NotVmappable(nn.Module):
    """A norm-like module whose forward reads a Python number from the data (no vmap)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight / (1.0 + float(x.detach().abs().max()) * 0)


def test_a_module_vmap_cannot_run_is_pulled_back_example_by_example(monkeypatch):
    """Its own call is run on each example's rows in a loop (not the whole model): the same
    numbers as the one-example-at-a-time path, and nothing is left to it."""
    torch.manual_seed(0)
    model = TokenClassifier(None)
    model.hidden = nn.Sequential(nn.Linear(8, 8), NotVmappable())
    model = model.double().eval()
    params = {k: p.detach() for k, p in model.named_parameters() if k.endswith("weight")}
    batch = _token_batch()
    loss = nn.CrossEntropyLoss()
    left = _left_one_by_one(monkeypatch)
    looped = []
    original = module_grads._mapped

    def recording(fn, *inputs):
        try:
            return torch.func.vmap(fn)(*inputs)
        except RuntimeError:
            looped.append(len(inputs[0][0]))
            return original(fn, *inputs)

    monkeypatch.setattr(module_grads, "_mapped", recording)
    fast = fisher_diag(model, params, batch, loss)
    assert left == [] and looped == [4]  # the four examples, in a loop
    slow = fisher_diag(model, params, batch, loss, fast=False)
    assert _relative_error(fast, slow) < 1e-12


def _moe_families():
    from tests.moe_models import FAMILIES

    return FAMILIES


@pytest.mark.parametrize("family", _moe_families())
def test_mixture_of_experts_take_the_batched_path_with_the_slow_twins_numbers(family, monkeypatch):
    """Routers and fused experts are called on the batch's (N·T, D) flattened tokens: each
    example's T rows are pulled back through the module alone (the experts in a loop over
    examples: they pick their tokens with ``nonzero``). Only GPT-OSS's attention sinks, used
    inside an attention called by keyword, are left to the one-example path."""
    from tests.moe_models import tiny_moe, token_batch

    model = tiny_moe(family)
    params = {k: p.detach() for k, p in model.named_parameters()}
    batch = token_batch(n=4)
    left = _left_one_by_one(monkeypatch)
    fast = fisher_diag_mc(model, params, batch, None, samples=2,
                          generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert left == ([{"model.layers.0.self_attn.sinks"}] if family == "gpt_oss" else [])
    slow = fisher_diag_mc(model, params, batch, None, samples=2, fast=False,
                          generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert _relative_error(fast, slow) < 1e-10


@pytest.mark.filterwarnings("ignore:the exact Fisher:RuntimeWarning")
def test_the_exact_fisher_of_the_experts_is_the_slow_twins(monkeypatch):
    from tests.moe_models import tiny_moe, token_batch

    model = tiny_moe("qwen2_moe")
    params = {k: p.detach() for k, p in model.named_parameters() if "mlp" in k}
    batch = token_batch(n=3, t=4)
    results = _spy(monkeypatch)
    fast = fisher_diag(model, params, batch, None)
    assert results[0] is not None and set(results[0].diagonal) == set(params)
    assert _relative_error(fast, fisher_diag(model, params, batch, None, fast=False)) < 1e-10


class FlattenedTokens(nn.Module):
    """A Linear applied to the batch's tokens flattened to ``(N·T, D)``, by example
    (``order="examples"``, as a mixture of experts does) or position first (``"positions"``:
    rows of one example are not consecutive)."""

    def __init__(self, order: str) -> None:
        super().__init__()
        self.order = order
        self.embed = nn.Embedding(VOCAB, 8)
        self.hidden = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)  # (N, T, 8)
        n, t, d = h.shape
        if self.order == "examples":
            h = torch.tanh(self.hidden(h.reshape(n * t, d))).reshape(n, t, d)
        else:
            flat = h.transpose(0, 1).reshape(t * n, d)
            h = torch.tanh(self.hidden(flat)).reshape(t, n, d).transpose(0, 1)
        return self.out(h).mean(1)


@pytest.mark.parametrize("order", ["examples", "positions"])
def test_flattened_tokens_are_batched_only_when_each_examples_rows_are_consecutive(
    order, monkeypatch
):
    torch.manual_seed(0)
    model = FlattenedTokens(order).double().eval()
    left, error = _left_and_error(model, monkeypatch)
    # Position-first rows fail the check of the last example: the whole batch goes one by one.
    assert left == ([] if order == "examples" else [{k for k, _ in model.named_parameters()}])
    assert error < 1e-12


def test_a_module_output_modified_in_place_goes_one_by_one(monkeypatch):
    torch.manual_seed(0)
    model = NormMisuse("output_in_place").double().eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    batch = _token_batch()
    loss = nn.CrossEntropyLoss()
    left = _left_one_by_one(monkeypatch)
    fast = fisher_diag(model, params, batch, loss)
    assert left == [{"norm.weight", "norm.bias"}]
    slow = fisher_diag(model, params, batch, loss, fast=False)
    assert _relative_error(fast, slow) < 1e-12


class RelativePositions(nn.Module):
    """A table of relative positions called on a ``(T, T)`` tensor (T5's attention bias): its
    ``T`` rows are positions, whatever the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.relative = nn.Embedding(16, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        offsets = torch.arange(t).unsqueeze(0) - torch.arange(t).unsqueeze(1)  # (T, T)
        bias = self.relative(offsets.clamp(-7, 7) + 7).mean(1)  # (T, 8)
        return self.out(torch.tanh(self.embed(input_ids) + bias)).mean(1)


def test_a_module_whose_rows_are_not_examples_is_left_out_alone(monkeypatch):
    """Eight positions over four examples look like two rows per example; the example run alone
    shows eight rows again, so that table (only) goes one example at a time."""
    torch.manual_seed(0)
    model = RelativePositions().double().eval()
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1, 2, 1])}
    left, error = _left_and_error(model, monkeypatch, batch)
    assert left == [{"relative.weight"}] and error < 1e-12
    assert model not in alone_check.COUPLED


class KeywordPositions(nn.Module):
    """A position table computed from the attention mask, called with a keyword tensor and a
    constant (OPT's: ``embed_positions(mask, cache_length, position_ids=None)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.positions = OffsetPositions()
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) + self.positions(attention_mask, 0, offset=2, ids=None)
        return self.out(torch.tanh(h)).mean(1)


class OffsetPositions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(16, 8)

    def forward(self, mask: torch.Tensor, cache: int, offset: int, ids: None) -> torch.Tensor:
        positions = (torch.cumsum(mask, dim=1) * mask - 1).long()[:, cache:]
        return self.table(positions + offset)


def test_a_module_called_with_keyword_tensors_and_constants_is_batched(monkeypatch):
    """Tensor inputs by keyword are split by example like positional ones; constants (an int,
    ``None``) are passed to each example as they are, and must be the same for the example run
    alone."""
    torch.manual_seed(0)
    batch = {**_token_batch(), "attention_mask": torch.ones(4, 5, dtype=torch.long)}
    batch["attention_mask"][0, -2:] = 0
    left, error = _left_and_error(KeywordPositions().double().eval(), monkeypatch, batch)
    assert left == [] and error < 1e-12


def test_call_inputs_put_other_tensors_in_the_places_of_a_calls_own():
    a, b = torch.zeros(2), torch.ones(3)
    split = module_grads.CallInputs.of((a, 3), {"mask": b, "flag": None})
    assert split is not None and split.tensors == (a, b)
    args, kwargs = split.build((b, a))
    assert args[0] is b and args[1] == 3 and kwargs["mask"] is a and kwargs["flag"] is None
    assert module_grads.CallInputs.of(((a, b),), {}) is None  # a tuple of tensors: not split


class BatchSizeArgument(nn.Module):
    """A norm-like module told the batch size as a number (as older attention code is): it
    scales by its input's rows over that number, 1 in the batch and alone, 1/4 for one
    example's rows called with the batch's number."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        return x * self.weight * (x.shape[0] / batch_size)


def test_a_module_given_the_batch_size_is_left_out_alone(monkeypatch):
    """The example alone passes another number: that module goes one example at a time (its
    call on one example's rows with the batch's number would scale its gradient by 1/4), the
    others stay batched."""
    torch.manual_seed(0)
    model = TokenClassifier(None)
    model.scale = BatchSizeArgument()
    model.forward = lambda input_ids: model.out(  # type: ignore[method-assign]
        torch.tanh(model.scale(model.hidden(model.embed(input_ids)), len(input_ids)))
    ).mean(1)
    left, error = _left_and_error(model.double().eval(), monkeypatch)
    assert left == [{"scale.weight"}] and error < 1e-12


class GatedTokens(nn.Module):
    """Token embeddings through a module of its own parameters, ``tanh(h W + b)``: no layer
    rule covers it, and the gradient of ``W`` depends on ``b`` (as in GPT-OSS's experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.gate = _Gate()
        self.out = nn.Linear(6, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.gate(self.embed(input_ids)).mean(1))


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 6) / 3)
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.weight + self.bias)


def test_a_module_with_parameters_left_out_gives_numbers_not_graphs(monkeypatch):
    """A module's weight differentiated without its bias (which still requires grad in the
    model): its squared pull-backs are plain numbers, not functions of the bias (selection
    calls ``.numpy()`` on scores: GPT-OSS's experts with their biases left out failed there),
    and equal the slow twin's."""
    torch.manual_seed(0)
    model = GatedTokens().double().eval()
    params = {k: p.detach() for k, p in model.named_parameters() if k != "gate.bias"}
    left = _left_one_by_one(monkeypatch)
    fast = fisher_diag_mc(
        model,
        params,
        _token_batch(),
        nn.CrossEntropyLoss(),
        generator=torch.Generator().manual_seed(5),
    )
    assert not [name for taken in left for name in taken]  # the gate is batched
    assert not [name for name, value in fast.items() if value.requires_grad]
    slow = fisher_diag_mc(
        model, params, _token_batch(), nn.CrossEntropyLoss(),
        generator=torch.Generator().manual_seed(5), fast=False,
    )  # fmt: skip
    assert _relative_error(fast, slow) < 1e-12
