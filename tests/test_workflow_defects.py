"""What a real workflow hit (issue 18): each case works exactly, or is refused in one line that
names the fix before anything changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, IterableDataset

from lossprune import (
    NM,
    OBD,
    Blocks,
    Compensation,
    Criterion,
    Global,
    LinearModel,
    LinearSchedule,
    Magnitude,
    Pruner,
    QuadraticModel,
    SynFlow,
    scores,
)
from lossprune.curvature import loss_and_grad
from lossprune.sparse import speed_report
from tests.hf_models import transformers

CE = nn.CrossEntropyLoss()


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def data(dtype=torch.float64, n=16):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=generator).to(dtype), torch.randint(
        0, 3, (n,), generator=generator
    )


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(before, model):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --- resuming with the user's own criterion and selection ------------------------------------


class AbsoluteValue(Criterion):
    """A user's criterion: a plain class, the default repr (with a memory address)."""

    def __init__(self, power=1.0):
        self.power = power

    def score(self, context):
        return {k: p.abs() ** self.power for k, p in context.params.items()}


class LowestFirst:
    """A user's selection: the Selection protocol by hand, default repr."""

    def check_schedule(self, layouts, targets, min_density):
        pass

    def select(self, scores, masks, *, sparsity, min_density, layouts):
        return Global().select(
            scores, masks, sparsity=sparsity, min_density=min_density, layouts=layouts
        )


def test_a_user_criterion_and_selection_resume_from_a_state_dict():
    reference = Pruner(mlp(), AbsoluteValue(), LinearSchedule(0.6, 3), scope=LowestFirst())
    reference.run()
    first = Pruner(mlp(), AbsoluteValue(), LinearSchedule(0.6, 3), scope=LowestFirst())
    first.step()
    saved = first.state_dict()
    resumed = Pruner(mlp(), AbsoluteValue(), LinearSchedule(0.6, 3), scope=LowestFirst())
    resumed.load_state_dict(saved)
    resumed.run()
    assert all(torch.equal(resumed.masks[k], reference.masks[k]) for k in reference.masks)
    other = Pruner(mlp(), Magnitude(), LinearSchedule(0.6, 3), scope=LowestFirst())
    with pytest.raises(ValueError, match="state was saved with criterion '<tests.test_workflow_"
                       "defects.AbsoluteValue>', not 'Magnitude\\(\\)'"):  # fmt: skip
        other.load_state_dict(saved)
    assert other.stage == 0


# --- half precision: compensation solved in float32, losses in float32 --------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compensation_on_half_precision_models_solves_in_float32(dtype):
    model = mlp(dtype)
    x, y = data(dtype, n=64)
    pruner = Pruner(model, QuadraticModel(lam=1e-2), LinearSchedule(0.5, 1), loss_fn=CE,
                    data=(x, y), update=Compensation(lam=1e-2))  # fmt: skip
    report = pruner.step()
    assert report.compensated and pruner.sparsity() == 0.5
    assert all(s.dtype == torch.float32 for s in pruner.update_state.last_step.values())
    # the measured loss after is the committed model's loss, computed in float32
    with torch.no_grad():
        after = float(CE(model(x).float(), y))
        before_model = mlp(dtype)
        before = float(CE(before_model(x).float(), y))
    assert report.loss_after == pytest.approx(after, rel=1e-6)
    assert report.loss_before == pytest.approx(before, rel=1e-6)


def test_bfloat16_loss_diagnostics_are_computed_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 50)).to(torch.bfloat16)
    x = torch.randn(256, 16).to(torch.bfloat16)
    y = torch.randint(0, 50, (256,))
    with torch.no_grad():
        expected = float(CE(model(x).float(), y))
    report = Pruner(model, Magnitude(), LinearSchedule(0.5, 1), loss_fn=CE, data=(x, y)).step()
    assert report.loss_before == pytest.approx(expected, rel=1e-6)


# --- speed_report ---------------------------------------------------------------------------


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.norm(self.proj(input=x)))  # a layer called by keyword


def test_speed_report_times_layers_called_by_keyword_and_changes_nothing():
    model = KeywordCall().train()
    before = state(model)
    report = speed_report(model, torch.randn(6, 8), layouts=("csr", "semi_structured"), repeats=1)
    assert [layer.name for layer in report.layers] == ["proj", "out"]
    assert unchanged(before, model)  # batch-norm running statistics included
    text = str(report)
    reason = "2:4 semi-structured weights must be float16 or bfloat16, got torch.float32"
    assert text.count(reason) == 1 and f"{reason} (proj, out)" in text


def zero_size_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 0), nn.Linear(0, 4), nn.Linear(4, 4))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("scope", [NM(2, 4), Blocks(2, 2), "layerwise", "global"], ids=str)
def test_zero_size_layers_are_pruned_like_any_other(scope):
    model = zero_size_model()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1), scope=scope)
    pruner.step()
    assert pruner.masks["1.weight"].shape == (0, 8) and pruner.masks["2.weight"].shape == (4, 0)
    assert pruner.sparsity() == 0.5
    for name in ("0.weight", "3.weight"):
        weight = model.get_parameter(name)
        magnitude = weight.detach().abs()
        kept, pruned = magnitude[pruner.masks[name]], magnitude[~pruner.masks[name]]
        assert (weight[~pruner.masks[name]] == 0).all()
        if scope == "layerwise":
            assert pruned.max() <= kept.min()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_speed_report_leaves_out_layers_without_weights():
    report = speed_report(zero_size_model(), torch.randn(3, 4), repeats=1)
    assert [layer.name for layer in report.layers] == ["0", "3"]


# --- wrapped, meta-device and quantized models -----------------------------------------------


def test_a_compiled_model_is_pruned_through_the_network_it_wraps():
    """torch.compile's graphs have no double backward (the stage's diagnostics need it)."""
    x, y = data()
    compiled = torch.compile(mlp())
    pruner = Pruner(
        compiled, Magnitude(), LinearSchedule(0.5, 1), loss_fn=CE, data=(x, y), diagnostics=True
    )
    report = pruner.step()
    reference = Pruner(
        mlp(), Magnitude(), LinearSchedule(0.5, 1), loss_fn=CE, data=(x, y), diagnostics=True
    )
    expected = reference.step()
    assert set(pruner.masks) == {"0.weight", "2.weight"}
    assert all(torch.equal(pruner.masks[k], reference.masks[k]) for k in reference.masks)
    assert report.loss_after == expected.loss_after
    assert report.predicted_delta == pytest.approx(expected.predicted_delta, rel=1e-12)
    torch.testing.assert_close(compiled(x), reference.model(x))  # the compiled one is pruned
    assert set(scores(torch.compile(mlp()), Magnitude())) == {"0.weight", "2.weight"}


def test_meta_device_and_quantized_models_are_refused_in_one_line():
    with torch.device("meta"):
        meta = mlp(torch.float32)
    for call in (
        lambda: Pruner(meta, Magnitude(), LinearSchedule(0.5, 1)),
        lambda: scores(meta, LinearModel(), data(torch.float32), loss_fn=CE),
    ):
        with pytest.raises(ValueError, match="parameter '0.weight' is on the meta device: .*"
                           "load the weights before pruning"):  # fmt: skip
            call()
    quantized = torch.ao.quantization.quantize_dynamic(mlp(torch.float32), {nn.Linear}, torch.qint8)
    with pytest.raises(ValueError, match="the model is quantized \\(module '0' is a torch.ao"):
        Pruner(quantized, Magnitude(), LinearSchedule(0.5, 1))
    int8 = mlp(torch.float32)
    int8[0].weight = nn.Parameter(torch.ones(8, 4, dtype=torch.int8), requires_grad=False)
    before = state(int8)
    with pytest.raises(ValueError, match="parameter '0.weight' holds torch.int8\\): .*before "
                       "quantizing"):  # fmt: skip
        scores(int8, Magnitude())
    assert unchanged(before, int8)
    hf = mlp(torch.float32)
    hf.is_quantized = True  # what transformers sets on a model loaded with quantization_config
    with pytest.raises(ValueError, match="the model is quantized \\(quantization_config"):
        scores(hf, Magnitude())


# --- SynFlow on several and on keyword inputs ------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x, y):
        return self.out(torch.relu(self.a(x) + self.b(y)))


def synflow_brute_force(model, args, kwargs, names):
    absolute = {k: v.detach().double().abs() for k, v in model.named_parameters()}
    leaves = {k: absolute[k].clone().requires_grad_(True) for k in names}
    flow = functional_call(model, {**absolute, **leaves}, args, kwargs).sum()
    grads = torch.autograd.grad(flow, list(leaves.values()))
    return {k: leaf.detach() * g for (k, leaf), g in zip(leaves.items(), grads, strict=True)}


def test_synflow_feeds_ones_to_every_input_positional_or_keyword():
    model = TwoInputs().double()
    x, y, labels = torch.randn(5, 4), torch.randn(5, 2), torch.randint(0, 2, (5,))
    ones = (torch.ones(1, 4, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    expected = synflow_brute_force(model, ones, {}, ["a.weight", "b.weight", "out.weight"])
    positional = scores(model, SynFlow(), ((x, y), labels))
    keyword = scores(model, SynFlow(), {"x": x, "y": y, "labels": labels})
    for k in expected:
        torch.testing.assert_close(positional[k], expected[k], rtol=1e-12, atol=0)
        torch.testing.assert_close(keyword[k], expected[k], rtol=1e-12, atol=0)


# --- arguments and data in the forms users write -----------------------------------------------


def test_scores_take_an_int_seed_as_generator():
    model, batch = mlp(), data()
    criterion = OBD(curvature="fisher_mc", mc_samples=2)
    seeded = scores(model, criterion, batch, loss_fn=CE, generator=3)
    expected = scores(
        model, criterion, batch, loss_fn=CE, generator=torch.Generator().manual_seed(3)
    )
    assert all(torch.equal(seeded[k], expected[k]) for k in expected)
    with pytest.raises(TypeError, match="generator must be None, an int seed or a torch.Generator"):
        scores(model, criterion, batch, loss_fn=CE, generator="3")


def test_a_list_of_example_rows_is_refused_with_how_to_batch_them():
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8, num_labels=2)).eval()  # fmt: skip
    rows = [
        {"input_ids": torch.randint(0, 16, (5,)), "labels": torch.tensor(i % 2)} for i in range(4)
    ]
    before = state(model)
    with pytest.raises(ValueError, match="one example \\(a row\\), not a batch; batch the rows, "
                       "e.g. DataLoader\\(rows, batch_size=8\\)"):  # fmt: skip
        scores(model, LinearModel(), rows)
    lm_rows = [{"input_ids": torch.randint(0, 16, (5,)), "labels": torch.randint(0, 16, (5,))}]
    lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)).eval()  # fmt: skip
    with pytest.raises(ValueError, match="one label per position, \\(N, T\\), got labels of shape "
                       "\\(5,\\): batch single examples \\(rows\\) with a DataLoader"):  # fmt: skip
        scores(lm, LinearModel(), lm_rows)
    assert unchanged(before, model)
    batched = scores(model, LinearModel(), DataLoader(rows, batch_size=2))  # the fix works
    assert set(batched) == set(scores(model, Magnitude()))


def test_a_tokenizers_output_without_tensors_names_the_fix():
    encoding = transformers.BatchEncoding(
        {"input_ids": [[5, 6, 7], [8, 9]], "attention_mask": [[1, 1, 1], [1, 1]]}
    )
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)).eval()  # fmt: skip
    with pytest.raises(TypeError, match="holds Python lists under \\['input_ids', 'attention_mask'"
                       "\\] \\(a tokenizer's output without return_tensors='pt'\\?\\): call the "
                       "tokenizer with padding=True, return_tensors='pt'"):  # fmt: skip
        scores(model, LinearModel(), encoding)


class Stream(IterableDataset):
    def __iter__(self):
        x, y = data()
        yield from zip(x, y, strict=True)


def test_examples_over_an_iterable_dataset_are_refused_when_the_pruner_is_built():
    for stream, match in (
        (DataLoader(Stream(), batch_size=4), "cannot draw from a DataLoader over an IterableData"),
        (Stream(), "needs data that can be sampled: .* got Stream"),
    ):
        with pytest.raises(TypeError, match=match):
            Pruner(mlp(), LinearModel(), LinearSchedule(0.5, 1), loss_fn=CE, data=stream,
                   examples=8)  # fmt: skip


def test_a_plain_function_loss_without_reduction_is_refused_in_one_line():
    def per_example(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    model, batch = mlp(), data()
    before = state(model)
    message = (  # the loss of the two probed examples, or of the whole batch of a gradient's pass
        "loss_fn returned shape \\((2|16),\\), not one number for the batch: return the batch mean"
    )
    for call in (
        lambda: scores(model, LinearModel(), batch, loss_fn=per_example),
        lambda: scores(model, OBD(curvature="fisher"), batch, loss_fn=per_example),
        lambda: loss_and_grad(model, dict(model.named_parameters()), batch, per_example),
        lambda: Pruner(
            model, QuadraticModel(), LinearSchedule(0.5, 1), loss_fn=per_example, data=batch
        ).step(),  # fmt: skip
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert unchanged(before, model)
