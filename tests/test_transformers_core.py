"""Transformers are first-class: batches in every form, the model's own loss, token-level
statistics (float64, against brute force), and every criterion on tiny Hugging Face models and
``nn.TransformerEncoder`` with their default attention."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

import lossprune
from lossprune import (
    OBD,
    ExponentialSchedule,
    GraSP,
    LinearModel,
    Magnitude,
    Pruner,
    QuadraticModel,
    SynFlow,
    scores,
)
from lossprune._common.batches import Batch, ModelInputs, ModelLoss, to_batch
from lossprune._common.data import random_subset
from lossprune.curvature import (
    Statistic,
    compute_statistics,
    diagonals,
    fisher_diag,
    fisher_diag_mc,
    ggn_vp,
    hvp,
    loss_and_grad,
)
from lossprune.selection import prunable_parameters
from tests import brute_force as bf
from tests.hf_models import TokenBlocks, tiny_bert, tiny_gpt2, tiny_llama, transformers

DTYPE = torch.float64
VOCAB = 16


def micro_gpt2() -> nn.Module:
    """A GPT-2 small enough for dense Hessians of ALL its prunable weights (1,536 numbers)."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval().to(DTYPE)


def token_batch(n: int = 3, t: int = 5, seed: int = 0, vocab: int = VOCAB) -> dict:
    """Causal-LM batch with padding: the last positions of some rows are ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = ids.clone()
    labels[0, -2:] = -100
    if n > 2:
        labels[2, 1] = -100
    mask = (labels != -100).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- brute force: the token-mean loss written out independently --------------------------------


def reference_loss(model, params, batch):
    """Mean over the non-ignored next-token predictions, all of it in float64."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with sdpa_kernel(SDPBackend.MATH):
        logits = functional_call(model, params, (), inputs).logits
    labels = batch["labels"]
    losses, count = [], 0
    for n in range(len(labels)):
        for t in range(labels.shape[1] - 1):
            y = int(labels[n, t + 1])
            if y == -100:
                continue
            losses.append(-torch.log_softmax(logits[n, t], -1)[y])
            count += 1
    return torch.stack(losses).sum() / count


def reference_ggn(model, params, batch):
    r""":math:`\sum_n J_n^\top H_n J_n / \#tokens`, J_n the dense Jacobian of sequence n's
    logits (attention couples its tokens), H_n block diagonal: one softmax Hessian per token."""
    names = list(params)
    flat = bf.flatten(params)
    labels = batch["labels"]
    tokens = int((labels[:, 1:] != -100).sum())
    total = torch.zeros(len(flat), len(flat), dtype=DTYPE)
    for n in range(len(labels)):
        row = {k: v[n : n + 1] for k, v in batch.items() if k != "labels"}

        def logits_of(vector, row=row):
            p = bf.unflatten(vector, params)
            with sdpa_kernel(SDPBackend.MATH):
                return functional_call(model, p, (), row).logits[0, :-1]

        logits = logits_of(flat).detach()
        jac = torch.func.jacrev(logits_of)(flat)  # (T - 1, V, P)
        for t in range(labels.shape[1] - 1):
            if int(labels[n, t + 1]) == -100:
                continue
            p = logits[t].softmax(-1)
            h = torch.diag(p) - torch.outer(p, p)
            total += jac[t].T @ h @ jac[t]
    assert names == list(params)
    return total / tokens


def all_prunable(model):
    return {k: v.detach() for k, v in prunable_parameters(model).items()}


def close(actual, expected, rtol=1e-7, atol=1e-10):
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=rtol, atol=atol)


# --- 1. batches and the model's own loss -----------------------------------------------------


def test_batch_forms_become_one_batch_type():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert to_batch((x, y)) == Batch(x, y)
    nested = to_batch(((x, x + 1), y))
    assert isinstance(nested.inputs, ModelInputs) and len(nested.inputs.args) == 2
    mapping = to_batch({"input_ids": x, "mask": x, "labels": y})
    assert isinstance(mapping.inputs, ModelInputs)
    assert sorted(mapping.inputs.kwargs) == ["input_ids", "mask"] and mapping.targets is y
    encoding = transformers.BatchEncoding({"input_ids": x, "labels": y})
    assert to_batch(encoding).inputs.kwargs.keys() == {"input_ids"}


def test_ambiguous_batches_name_what_was_expected():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="needs a 'labels' entry"):
        to_batch({"input_ids": x})
    with pytest.raises(TypeError, match="mapping of model inputs with 'labels'"):
        to_batch((x, y, y))
    with pytest.raises(TypeError, match="'labels' of a mapping batch must be a tensor"):
        to_batch({"input_ids": x, "labels": 7})
    with pytest.raises(ValueError, match="model input 'mask' has 3 rows"):
        to_batch({"input_ids": x, "mask": x[:3], "labels": y})
    with pytest.raises(ValueError, match="loss_fn is needed for Sequential"):
        loss_and_grad(nn.Sequential(nn.Linear(3, 3)), {}, (x, y))
    gpt2, tokens = tiny_gpt2(), token_batch(2, 4, vocab=64)
    with pytest.raises(TypeError, match="returns CausalLMOutputWithCrossAttentions: omit loss_fn"):
        scores(gpt2, LinearModel(), tokens, loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="pass loss_fn=...\\s*\\(only a Hugging Face"):
        scores(nn.Sequential(nn.Linear(3, 3)), LinearModel(), (x, y))


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_bert], ids=["gpt2", "llama", "bert"])
def test_the_models_own_loss_is_the_one_it_computes(build):
    torch.manual_seed(0)
    model = build().to(DTYPE)
    if isinstance(model, transformers.BertForSequenceClassification):
        ids = torch.randint(0, 64, (3, 6))
        batch = {"input_ids": ids, "labels": torch.tensor([0, 2, 1])}
    else:
        batch = token_batch(3, 6, vocab=64)
    params = all_prunable(model)
    loss = loss_and_grad(model, params, batch).loss
    with torch.no_grad():
        own = model(**batch).loss  # transformers computes it in float32
    torch.testing.assert_close(loss, own.to(DTYPE), rtol=1e-6, atol=1e-6)


def test_model_loss_refuses_labels_it_cannot_score():
    with pytest.raises(ValueError, match="task must be"):
        ModelLoss("ranking")
    with pytest.raises(ValueError, match="needs integer labels"):
        to_batch({"input_ids": torch.ones(2, 3), "labels": torch.ones(2)}, ModelLoss("sequence"))
    with pytest.raises(TypeError, match="reads the logits"):
        ModelLoss("tokens").read(("not", "logits"))


def test_random_subset_of_a_mapping_batch_keeps_rows_together():
    batch = token_batch(6, 4)
    subset = random_subset(batch, 3, torch.Generator().manual_seed(0))
    assert set(subset) == set(batch) and len(subset["labels"]) == 3
    same = (batch["input_ids"][:, None] == subset["input_ids"][None]).all(-1)  # (6, 3)
    rows = same.double().argmax(0)  # the batch row of each subset row
    assert torch.equal(batch["labels"][rows], subset["labels"])
    nested = random_subset(((batch["input_ids"], batch["attention_mask"]), batch["labels"]), 2,
                           torch.Generator().manual_seed(0))  # fmt: skip
    assert len(nested[0]) == 2 and len(nested[0][1]) == 2 and len(nested[1]) == 2


# --- 2. token-level statistics, exact by definition ------------------------------------------


def test_gradient_and_hessian_products_are_those_of_the_token_mean_loss():
    model = micro_gpt2()
    params = all_prunable(model)
    batch = token_batch()
    dense = torch.func.hessian(lambda v: reference_loss(model, bf.unflatten(v, params), batch))(
        bf.flatten(params)
    )
    expected_grad = torch.func.grad(lambda p: reference_loss(model, p, batch))(params)
    vectors = {k: torch.randn(2, *p.shape, dtype=DTYPE) for k, p in params.items()}
    loss, grad, products = hvp(model, params, batch, None, vectors)
    torch.testing.assert_close(loss, reference_loss(model, params, batch))
    close(grad, expected_grad)
    close(products, bf.products(dense, vectors))
    one = {k: v[:1] for k, v in vectors.items()}  # the reverse-over-reverse backend
    close(hvp(model, params, batch, None, one).products, bf.products(dense, one))


def test_ggn_and_exact_fisher_are_per_token_and_exact_when_attention_couples_tokens():
    model = micro_gpt2()
    params = all_prunable(model)
    batch = token_batch()
    g = reference_ggn(model, params, batch)
    vectors = {k: torch.randn(2, *p.shape, dtype=DTYPE) for k, p in params.items()}
    close(ggn_vp(model, params, batch, None, vectors).products, bf.products(g, vectors))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the cost warning (60 columns here)
        close(fisher_diag(model, params, batch, None), bf.diagonal(g, params))


def test_statistics_over_batches_are_means_over_tokens():
    """Two batches with different numbers of kept tokens: weighted per token, not per batch."""
    model = micro_gpt2()
    params = all_prunable(model)
    first, second = token_batch(3, 5, seed=1), token_batch(2, 5, seed=2)
    whole = {k: torch.cat([first[k], second[k]]) for k in first}
    g = reference_ggn(model, params, whole)
    expected_grad = torch.func.grad(lambda p: reference_loss(model, p, whole))(params)
    requests = [Statistic("fisher")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stats = compute_statistics(model, params, [first, second], None, requests)
    assert stats.units == int((whole["labels"][:, 1:] != -100).sum())
    expected_loss = reference_loss(model, params, whole)
    torch.testing.assert_close(torch.tensor(stats.loss, dtype=DTYPE), expected_loss)
    close(stats.grad, expected_grad)
    close(stats[Statistic("fisher")], bf.diagonal(g, params))


def test_fisher_mc_is_unbiased_per_token_and_forms_no_output_hessian(monkeypatch):
    r"""Per sequence :math:`\sum_t J_t^\top \sqrt{c_t}(e_{y_t} - p_t)`, independent labels per
    token: zero-mean tokens, so the expected square is the exact per-token Fisher diagonal."""
    model = micro_gpt2()
    params = all_prunable(model)
    batch = token_batch()
    exact = bf.diagonal(reference_ggn(model, params, batch), params)
    from lossprune.curvature import outputs

    def no_square_root(self):
        raise AssertionError("fisher_mc formed the output Hessian")

    monkeypatch.setattr(outputs.SoftmaxCrossEntropy, "sqrt_columns", no_square_root)
    generator = torch.Generator().manual_seed(0)
    estimate = fisher_diag_mc(model, params, batch, None, samples=4000, generator=generator)
    for k in params:  # the sampling error of 4000 draws is about 2% per tensor
        torch.testing.assert_close(estimate[k].sum(), exact[k].sum(), rtol=0.06, atol=0)
        assert torch.corrcoef(torch.stack([estimate[k].flatten(), exact[k].flatten()]))[0, 1] > 0.95


def test_exact_fisher_warns_with_its_cost_and_the_cheaper_alternative():
    model = micro_gpt2()
    params = all_prunable(model)
    batch = token_batch(2, 8)  # 7 positions x 16 classes = 112 output columns per sequence
    diagonals._WARNED_COST.clear()
    with pytest.warns(RuntimeWarning, match="about 112 gradients.*fisher_mc"):
        compute_statistics(model, params, batch, None, [Statistic("fisher")])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compute_statistics(model, params, batch, None, [Statistic("fisher")])  # warned once
        compute_statistics(model, params, token_batch(2, 6), None, [Statistic("fisher")])
        compute_statistics(model, params, batch, None, [Statistic("fisher_mc", 2)])


# --- 3. every criterion, default attention -----------------------------------------------------


class Encoder(nn.Module):
    """Embedding + ``nn.TransformerEncoder`` (default attention: SDPA inside MultiheadAttention)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (N, T, 4)
        h = self.embed(x)
        h = self.encoder(h if self.batch_first else h.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


CRITERIA = [
    Magnitude(),
    LinearModel(lam=1e-3),
    QuadraticModel(lam=1e-3),
    OBD(curvature="fisher"),
    OBD(curvature="fisher_mc", mc_samples=2),
    OBD(curvature="hessian_diag", probes=2),
    GraSP(),
    SynFlow(),
]


def _model_and_data(name):
    torch.manual_seed(0)
    if name in ("encoder_batch_first", "encoder_sequence_first"):
        model = Encoder(batch_first=name == "encoder_batch_first").eval().to(DTYPE)
        data = (torch.randn(4, 5, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 1]))
        return model, data, nn.CrossEntropyLoss()
    if name == "bert":
        ids = torch.randint(0, 64, (4, 6))
        return tiny_bert().to(DTYPE), {"input_ids": ids, "labels": torch.tensor([0, 1, 2, 1])}, None
    build = tiny_gpt2 if name == "gpt2" else tiny_llama
    return build().to(DTYPE), token_batch(3, 4, vocab=64), None


MODELS = ["gpt2", "llama", "bert", "encoder_batch_first", "encoder_sequence_first"]


@pytest.mark.filterwarnings("ignore:the exact Fisher:RuntimeWarning")
@pytest.mark.parametrize("name", MODELS)
def test_every_criterion_runs_with_the_default_attention(name):
    model, data, loss_fn = _model_and_data(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flash = torch.backends.cuda.flash_sdp_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no double-backward fallback either
        warnings.filterwarnings("ignore", "the exact Fisher", RuntimeWarning)
        for criterion in CRITERIA:
            result = scores(model, criterion, data, loss_fn=loss_fn)
            assert result.keys() == prunable_parameters(model).keys()
            assert all(torch.isfinite(s).all() for s in result.values()), criterion
    assert torch.backends.cuda.flash_sdp_enabled() == flash
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", MODELS)
def test_a_pruner_step_with_diagnostics_runs_with_the_default_attention(name):
    model, data, loss_fn = _model_and_data(name)
    pruner = Pruner(
        model, LinearModel(), ExponentialSchedule(sparsity=0.5, stages=2), loss_fn=loss_fn,
        data=data, diagnostics=True,
    )  # fmt: skip
    report = pruner.step()
    assert report.loss_before is not None and report.predicted_delta is not None
    assert 0.2 < pruner.sparsity() < 0.4


def test_synflow_on_token_ids_runs_through_the_embedding_output():
    model = tiny_gpt2().to(DTYPE)
    batch = token_batch(2, 5, vocab=64)
    result = scores(model, SynFlow(), batch)
    # Brute force: R = sum of the logits at |theta| for all-ones embeddings of T = 5 positions.
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # tied: once
    absolute = {k: v.detach().abs() if v.is_floating_point() else v for k, v in tensors.items()}
    prunable = {k: absolute[k].clone().requires_grad_(True) for k in result}
    ones = torch.ones(1, 5, 32, dtype=DTYPE)
    flow = functional_call(model, {**absolute, **prunable}, (), {"inputs_embeds": ones}).logits
    grads = torch.autograd.grad(flow.sum(), list(prunable.values()))
    for (k, leaf), g in zip(prunable.items(), grads, strict=True):
        torch.testing.assert_close(result[k], leaf.detach() * g)

    class TokenModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, ids):
            return self.fc(self.embed(ids)).mean(1)

    ids = torch.randint(0, 10, (3, 5))
    with pytest.raises(TypeError, match="SynFlow feeds an all-ones input.*token ids"):
        scores(TokenModel(), SynFlow(), (ids, torch.tensor([0, 1, 0])))


def test_synflow_on_an_encoder_decoder_feeds_ones_to_the_decoder_too():
    """T5: ones of the encoder's and the decoder's embedding shapes, the decoder as long as the
    encoder (SynFlow reads no labels); R sums every floating-point output (logits, encoder
    states)."""
    config = transformers.T5Config(
        vocab_size=32, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).to(DTYPE).eval()
    ids = torch.randint(2, 32, (3, 6), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(2, 32, (3, 4), generator=torch.Generator().manual_seed(2))
    result = scores(model, SynFlow(), {"input_ids": ids, "labels": labels})
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    absolute = {k: v.detach().abs() if v.is_floating_point() else v for k, v in tensors.items()}
    prunable = {k: absolute[k].clone().requires_grad_(True) for k in result}
    ones = {"inputs_embeds": torch.ones(1, 6, 8, dtype=DTYPE),
            "decoder_inputs_embeds": torch.ones(1, 6, 8, dtype=DTYPE)}  # fmt: skip
    outputs = functional_call(model, {**absolute, **prunable}, (), ones)
    flow = outputs.logits.sum() + outputs.encoder_last_hidden_state.sum()
    grads = torch.autograd.grad(flow, list(prunable.values()))
    decoder = [k for k in result if k.startswith("decoder.")]
    assert decoder and all(result[k].abs().sum() > 0 for k in decoder)
    for (k, leaf), g in zip(prunable.items(), grads, strict=True):
        torch.testing.assert_close(result[k], leaf.detach() * g)


# --- 5. progress, 6. README usage on an HF causal LM ------------------------------------------


def test_progress_is_shown_per_batch_inside_a_statistics_pass(monkeypatch):
    from tqdm.auto import tqdm

    from lossprune.curvature import statistics

    bars = []

    class Recorded(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.record = [kwargs["desc"], 0, kwargs["total"], kwargs["disable"]]
            bars.append(self.record)

        def __iter__(self):
            for item in super().__iter__():
                self.record[1] += 1
                yield item

    monkeypatch.setattr(statistics, "tqdm", Recorded)
    loader = DataLoader(TokenBlocks(examples=6, length=4), batch_size=2)
    for progress in (True, False):
        pruner = Pruner(tiny_gpt2().to(DTYPE), GraSP(), ExponentialSchedule(0.5, stages=1),
                        data=loader, progress=progress, diagnostics=False)  # fmt: skip
        list(pruner.run())
    assert bars == [
        ["statistics", 3, 3, False],  # the gradient pass, one step per batch
        ["Hessian-gradient product", 3, 3, False],  # GraSP's second pass
        [None, 3, 3, True],  # progress=False: the same passes, no bar shown
        [None, 3, 3, True],
    ]


@pytest.mark.filterwarnings("ignore:the exact Fisher:RuntimeWarning")
@pytest.mark.parametrize("criterion", CRITERIA, ids=lambda c: repr(c)[:30])
def test_readme_usage_on_a_causal_lm_with_a_loader_of_dict_batches(criterion):
    """README's Pruner usage unchanged, no loss_fn, ``examples=n`` on a dict dataset."""
    model = tiny_gpt2()
    loader = DataLoader(TokenBlocks(examples=8, length=6), batch_size=4, shuffle=True)
    pruner = Pruner(model, criterion, ExponentialSchedule(sparsity=0.5, stages=2),
                    data=loader, examples=4, generator=0)  # fmt: skip
    reports = list(pruner.run())
    assert len(reports) == 2 and abs(pruner.sparsity() - 0.5) < 1e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner.attach(optimizer)
    batch = next(iter(loader))
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    params = dict(model.named_parameters())
    assert all(bool((params[k][~m] == 0).all()) for k, m in pruner.masks.items())
    assert lossprune.ModelLoss is ModelLoss


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_transformer_encoder_statistics_are_exact_with_the_default_attention(batch_first):
    torch.manual_seed(0)
    model = Encoder(batch_first).eval().to(DTYPE)
    params = all_prunable(model)
    x, y = torch.randn(3, 4, 4, dtype=DTYPE), torch.tensor([0, 2, 1])
    ce = nn.CrossEntropyLoss()
    with sdpa_kernel(SDPBackend.MATH):  # the brute-force reference needs it too
        h = bf.dense_hessian(model, params, x, y, ce)
        g = bf.dense_ggn(model, params, x, y, ce)
    vectors = {k: torch.randn(2, *p.shape, dtype=DTYPE) for k, p in params.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        close(hvp(model, params, (x, y), ce, vectors).products, bf.products(h, vectors))
        close(ggn_vp(model, params, (x, y), ce, vectors).products, bf.products(g, vectors))
        close(fisher_diag(model, params, (x, y), ce), bf.diagonal(g, params))


def test_a_pruner_draws_examples_from_one_mapping_batch():
    model = tiny_llama()
    batch = token_batch(6, 5, vocab=64)
    criterion = OBD(curvature="fisher_mc", mc_samples=1)
    schedule = ExponentialSchedule(sparsity=0.5, stages=1)
    pruner = Pruner(model, criterion, schedule, data=batch, examples=3, min_density=0.1)
    report = pruner.step()
    assert report.loss_before is not None and abs(pruner.sparsity() - 0.5) < 1e-3


@pytest.mark.parametrize("class_dim", [1, -1])
def test_column_blocks_are_the_square_root_without_its_zero_columns(class_dim):
    from lossprune.curvature.outputs import MeanSquaredError, softmax_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=DTYPE)  # (N, C, T) or (N, T, V)
    if class_dim == -1:  # T = 3 positions of V = 5 classes
        labels, classes = torch.tensor([[0, 4, -100], [1, -100, 2]]), 5
    else:  # C = 3 classes at T = 5 positions
        labels, classes = torch.tensor([[0, 2, -100, 1, 1], [1, -100, 2, 0, 0]]), 3
    space = softmax_cross_entropy(logits, labels, class_dim=class_dim, label_smoothing=0.1)
    dense = space.sqrt_columns()
    mse = MeanSquaredError(logits)
    for n in range(2):
        for width in (1, 2, 7):
            blocks = torch.cat(list(space.column_blocks(n, width)), dim=1)
            torch.testing.assert_close(blocks @ blocks.T, dense[n] @ dense[n].T)
            assert blocks.shape[1] == classes * int((labels[n] != -100).sum())  # none if ignored
            generic = torch.cat(list(mse.column_blocks(n, width)), dim=1)
            torch.testing.assert_close(generic, mse.sqrt_columns()[n])


def test_nested_tuple_inputs_are_called_positionally_and_exact():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, scale):
            return torch.tanh(self.fc(x)) * scale

    torch.manual_seed(0)
    model = TwoInputs().to(DTYPE)
    params = all_prunable(model)
    x, scale = torch.randn(5, 4, dtype=DTYPE), torch.rand(5, 1, dtype=DTYPE) + 0.5
    y = torch.tensor([0, 1, 2, 1, 0])
    ce = nn.CrossEntropyLoss()

    def loss_of(vector):
        out = functional_call(model, bf.unflatten(vector, params), (x, scale))
        return ce(out, y)

    def outputs_of(vector, n):
        return functional_call(
            model, bf.unflatten(vector, params), (x[n : n + 1], scale[n : n + 1])
        )

    flat = bf.flatten(params)
    ggn = torch.zeros(len(flat), len(flat), dtype=DTYPE)
    for n in range(5):
        jac = torch.func.jacrev(outputs_of)(flat, n)[0]  # (C, P)
        p = outputs_of(flat, n)[0].softmax(-1)
        ggn += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac / 5
    batch = ((x, scale), y)
    close(
        loss_and_grad(model, params, batch, ce).grad,
        bf.unflatten(torch.func.grad(loss_of)(flat), params),
    )
    close(fisher_diag(model, params, batch, ce), bf.diagonal(ggn, params))


def test_grasps_tempered_loss_averages_over_the_tokens_of_the_loss_it_wraps():
    """Batches are weighted by kept tokens for GraSP too (its loss wraps the model's own)."""
    from lossprune.criteria.grasp import TemperedLoss
    from lossprune.curvature.outputs import loss_normaliser

    labels = token_batch()["labels"][:, 1:]
    tempered = GraSP().scoring_loss(ModelLoss("causal_lm"))
    assert isinstance(tempered, TemperedLoss)
    assert float(loss_normaliser(tempered, labels)) == int((labels != -100).sum())
    model = micro_gpt2()
    params = all_prunable(model)
    first, second = token_batch(3, 5, seed=1), token_batch(2, 5, seed=2)
    second["labels"] = second["input_ids"].clone()  # 9 of 12 tokens, then 8 of 8: not 3 : 2
    second["attention_mask"] = torch.ones_like(second["input_ids"])
    whole = {k: torch.cat([first[k], second[k]]) for k in first}
    request = [Statistic("hessian_grad")]
    split = compute_statistics(model, params, [first, second], tempered, request)
    joint = compute_statistics(model, params, whole, tempered, request)
    close(split.grad, joint.grad)
    close(split[Statistic("hessian_grad")], joint[Statistic("hessian_grad")])
