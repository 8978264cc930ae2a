"""Every Hugging Face family that computes its loss from labels is scored without ``loss_fn``
(issue 18): the loss, its gradient and the exact Gauss-Newton diagonal are those of the model's
own ``.loss``, in float64 against a brute force written the way ``transformers`` writes it; a
family that cannot be handled exactly is refused in one line naming what to pass."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import lossprune
from lossprune import LinearModel, LinearSchedule, ModelLoss, Pruner, scores
from lossprune._common.batches import to_batch
from lossprune.curvature import Statistic, compute_statistics, fisher_diag, loss_and_grad
from lossprune.selection import prunable_parameters
from tests import brute_force as bf
from tests.hf_models import transformers

DTYPE = torch.float64
V = 12  # vocabulary
N, T, S = 3, 4, 5  # examples, label positions, encoder positions


def _ids(shape, low=3, seed=0):
    return torch.randint(low, V, shape, generator=torch.Generator().manual_seed(seed))


def _labels(shape, seed=1):
    labels = _ids(shape, seed=seed)
    labels[0, -1] = -100  # padding of the first example
    return labels


# --- the families: (model, batch, the transformers formula of its loss from logits) ----------


def t5():
    config = transformers.T5Config(
        vocab_size=V, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config)
    return model, {"input_ids": _ids((N, S)), "labels": _labels((N, T))}, "tokens"


def _bart_config(**extra):
    return transformers.BartConfig(
        vocab_size=V, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8,
        max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=1, decoder_start_token_id=2, bos_token_id=0, eos_token_id=2, **extra,
    )  # fmt: skip


def bart():
    model = transformers.BartForConditionalGeneration(_bart_config())
    return model, {"input_ids": _ids((N, S)), "labels": _labels((N, T))}, "tokens"


def _whisper_config(**extra):
    return transformers.WhisperConfig(
        vocab_size=V, num_mel_bins=4, d_model=8, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=8,
        decoder_ffn_dim=8, max_source_positions=3, max_target_positions=8, pad_token_id=1,
        decoder_start_token_id=2, bos_token_id=0, eos_token_id=2, dropout=0.0, **extra,
    )  # fmt: skip


def _features():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(N, 4, 6, generator=generator, dtype=DTYPE)  # 2 * max_source_positions


def whisper():
    model = transformers.WhisperForConditionalGeneration(_whisper_config())
    return model, {"input_features": _features(), "labels": _labels((N, T))}, "tokens"


def whisper_audio_classification():
    config = _whisper_config(num_labels=3, classifier_proj_size=4)
    model = transformers.WhisperForAudioClassification(config)
    return model, {"input_features": _features(), "labels": torch.tensor([0, 2, 1])}, "sequence"


def vit():
    config = transformers.ViTConfig(
        image_size=4, patch_size=2, num_channels=2, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=8, num_labels=3,
    )  # fmt: skip
    pixels = torch.randn(N, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    model = transformers.ViTForImageClassification(config)
    return model, {"pixel_values": pixels, "labels": torch.tensor([0, 2, 1])}, "sequence"


def _bert_config(**extra):
    return transformers.BertConfig(
        vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **extra,
    )  # fmt: skip


def bert_sequence():
    model = transformers.BertForSequenceClassification(_bert_config(num_labels=3))
    return model, {"input_ids": _ids((N, S)), "labels": torch.tensor([0, 2, 1])}, "sequence"


def bert_sequence_column():
    """Labels shaped (N, 1), as a dataset of one-element label lists collates them."""
    model = transformers.BertForSequenceClassification(_bert_config(num_labels=3))
    labels = torch.tensor([[0], [2], [1]])
    return model, {"input_ids": _ids((N, S)), "labels": labels}, "sequence"


def bert_regression():
    model = transformers.BertForSequenceClassification(_bert_config(num_labels=1))
    labels = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE)
    return model, {"input_ids": _ids((N, S)), "labels": labels}, "regression"


def bert_multi_target_regression():
    config = _bert_config(num_labels=2, problem_type="regression")
    model = transformers.BertForSequenceClassification(config)
    labels = torch.randn(N, 2, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    return model, {"input_ids": _ids((N, S)), "labels": labels}, "regression"


def bert_multi_label():
    config = _bert_config(num_labels=3, problem_type="multi_label_classification")
    model = transformers.BertForSequenceClassification(config)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=DTYPE)
    return model, {"input_ids": _ids((N, S)), "labels": labels}, "multi_label"


def bert_tokens():
    model = transformers.BertForTokenClassification(_bert_config(num_labels=3))
    labels = _ids((N, S), low=0, seed=5) % 3
    labels[1, 0] = -100
    return model, {"input_ids": _ids((N, S)), "labels": labels}, "tokens"


def bert_masked_lm():
    model = transformers.BertForMaskedLM(_bert_config())
    labels = torch.full((N, S), -100)
    labels[:, 1] = _ids((N,), seed=6)
    labels[0, 3] = 5
    return model, {"input_ids": _ids((N, S)), "labels": labels}, "tokens"


def llama():
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    return model, {"input_ids": _ids((N, S)), "labels": _labels((N, S))}, "causal"


def opt():
    config = transformers.OPTConfig(
        vocab_size=V, hidden_size=8, num_hidden_layers=1, ffn_dim=8, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=8, dropout=0.0, pad_token_id=1,
    )  # fmt: skip
    model = transformers.OPTForCausalLM(config)
    return model, {"input_ids": _ids((N, S)), "labels": _labels((N, S))}, "causal"


# Generating models whose class names end in none of the known suffixes: transformers' auto-class
# tables name their task.


def marian():
    config = transformers.MarianConfig(
        vocab_size=V, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8,
        max_position_embeddings=16, pad_token_id=1, decoder_start_token_id=2, dropout=0.0,
    )  # fmt: skip
    model = transformers.MarianMTModel(config)
    return model, {"input_ids": _ids((N, S)), "labels": _labels((N, T))}, "tokens"


def mbart():
    """MBart's decoder inputs start with each row's last label (its language id), not a
    configured start token: the config has none."""
    config = transformers.MBartConfig(
        vocab_size=V, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8,
        max_position_embeddings=16, pad_token_id=1, decoder_start_token_id=None, dropout=0.0,
    )  # fmt: skip
    model = transformers.MBartForConditionalGeneration(config)
    return model, {"input_ids": _ids((N, S)), "labels": _labels((N, T))}, "tokens"


def encoder_decoder():
    """A BERT encoder and a BERT decoder with cross-attention (``EncoderDecoderModel``)."""
    decoder = _bert_config(is_decoder=True, add_cross_attention=True)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(_bert_config(), decoder)
    config.decoder_start_token_id, config.pad_token_id = 2, 1
    model = transformers.EncoderDecoderModel(config=config)
    return model, {"input_ids": _ids((N, S)), "labels": _labels((N, T))}, "tokens"


def bert_generation_decoder():
    config = transformers.BertGenerationConfig(
        vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8, max_position_embeddings=16, is_decoder=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = transformers.BertGenerationDecoder(config)
    return model, {"input_ids": _ids((N, S)), "labels": _labels((N, S))}, "causal"


FAMILIES = [
    t5, bart, whisper, whisper_audio_classification, vit, bert_sequence, bert_sequence_column,
    bert_regression, bert_multi_target_regression, bert_multi_label, bert_tokens,
    bert_masked_lm, llama, opt, marian, mbart, encoder_decoder, bert_generation_decoder,
]  # fmt: skip


def build(family):
    torch.manual_seed(0)
    model, batch, formula = family()
    return model.eval().to(DTYPE), batch, formula


def transformers_formula(formula, logits, labels):
    """The loss from logits as transformers writes it (flattened views, its own squeezes)."""
    f = nn.functional
    if formula == "tokens":
        return f.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    if formula == "causal":
        return f.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
    if formula == "sequence":
        return f.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    if formula == "regression":
        if logits.shape[-1] == 1:
            return f.mse_loss(logits.squeeze(), labels.squeeze())
        return f.mse_loss(logits, labels)
    return f.binary_cross_entropy_with_logits(logits, labels)


def reference_loss(model, params, batch, formula):
    """The brute force: the model called WITH its labels (it builds any decoder inputs itself),
    its float64 logits, the transformers formula."""
    with sdpa_kernel(SDPBackend.MATH):
        outputs = functional_call(model, params, (), dict(batch))
    return transformers_formula(formula, outputs.logits, batch["labels"]), outputs.loss


def some_weights(model, count=2):
    """A few prunable weights (the first and the last), small enough for dense Jacobians."""
    params = {k: v.detach() for k, v in prunable_parameters(model).items()}
    names = list(params)
    return {k: params[k] for k in [*names[: count - 1], names[-1]]}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_every_family_scores_the_loss_the_model_computes_without_loss_fn(family):
    model, batch, formula = build(family)
    params = some_weights(model)
    expected, own = reference_loss(model, params, batch, formula)
    # The brute force is transformers' number (which some families compute in float32).
    torch.testing.assert_close(expected, own.to(DTYPE), rtol=1e-6, atol=1e-6)
    result = loss_and_grad(model, params, batch)
    torch.testing.assert_close(result.loss, expected, rtol=1e-12, atol=1e-12)
    grad = torch.func.grad(lambda p: reference_loss(model, p, batch, formula)[0])(params)
    for k in params:
        torch.testing.assert_close(result.grad[k], grad[k], rtol=1e-10, atol=1e-12)


def dense_ggn_diagonal(model, params, batch, formula):
    r"""diag(Jᵀ H J): J the Jacobian of ALL the batch's logits (dense), H the Hessian of the
    transformers formula with respect to them."""
    flat = bf.flatten(params)

    def logits_of(vector):
        with sdpa_kernel(SDPBackend.MATH):
            return functional_call(model, bf.unflatten(vector, params), (), dict(batch)).logits

    logits = logits_of(flat).detach()
    jac = torch.func.jacrev(logits_of)(flat).reshape(logits.numel(), -1)
    labels = batch["labels"]
    h = torch.func.hessian(lambda o: transformers_formula(formula, o, labels))(logits)
    h = h.reshape(logits.numel(), logits.numel())
    return bf.unflatten(torch.einsum("op,oq,qp->p", jac, h, jac), params)


@pytest.mark.parametrize(
    "family",
    [
        t5, pytest.param(whisper, marks=pytest.mark.slow), vit, bert_sequence_column,
        bert_regression, bert_multi_label, bert_masked_lm, opt, marian, mbart, encoder_decoder,
    ],
    ids=lambda f: getattr(f, "__name__", None),
)  # fmt: skip
def test_statistics_describe_the_models_own_loss(family):
    """The exact Gauss-Newton (Fisher) diagonal, alone and inside a statistics pass over two
    batches, is that of the model's own loss (closed forms for cross-entropy and squared error,
    torch.func for binary cross-entropy)."""
    model, batch, formula = build(family)
    params = some_weights(model)
    expected = dense_ggn_diagonal(model, params, batch, formula)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the exact Fisher's cost warning
        diagonal = fisher_diag(model, params, batch, None)
        stats = compute_statistics(model, params, [batch], None, [Statistic("fisher")])
    # T5's layer norm computes its variance in float32 whatever the model's dtype.
    rtol = 1e-6 if family is t5 else 1e-9
    for k in params:
        torch.testing.assert_close(diagonal[k], expected[k], rtol=rtol, atol=1e-12)
        torch.testing.assert_close(
            stats[Statistic("fisher")][k], expected[k], rtol=rtol, atol=1e-12
        )


def test_encoder_decoder_decoder_inputs_are_built_the_way_the_model_builds_them():
    model, batch, _ = build(bart)
    loss = ModelLoss.for_model(model)
    assert (loss.task, loss.decoder_start_token_id, loss.pad_token_id) == ("seq2seq", 2, 1)
    built = to_batch(batch, loss).inputs.kwargs["decoder_input_ids"]
    expected = transformers.models.bart.modeling_bart.shift_tokens_right(batch["labels"], 1, 2)
    assert torch.equal(built, expected)
    t5_model, t5_batch, _ = build(t5)
    built = to_batch(t5_batch, ModelLoss.for_model(t5_model)).inputs.kwargs["decoder_input_ids"]
    assert torch.equal(built, t5_model.prepare_decoder_input_ids_from_labels(t5_batch["labels"]))
    mbart_model, mbart_batch, _ = build(mbart)  # each row's last label first
    mbart_loss = ModelLoss.for_model(mbart_model)
    assert (mbart_loss.decoder_start, mbart_loss.pad_token_id) == ("last_label", 1)
    built = to_batch(mbart_batch, mbart_loss).inputs.kwargs["decoder_input_ids"]
    own = mbart_model.prepare_decoder_input_ids_from_labels(mbart_batch["labels"].clone())
    assert torch.equal(built, own)
    # decoder inputs in the batch are the model's, used as they are
    given = {**batch, "decoder_input_ids": _ids((N, T), seed=9)}
    assert to_batch(given, loss).inputs.kwargs["decoder_input_ids"] is given["decoder_input_ids"]
    expected_loss = model(**given).loss
    torch.testing.assert_close(loss_and_grad(model, some_weights(model), given).loss, expected_loss)


def _refused_unchanged(model, call, exception, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exception, match=match):
        call()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_whose_own_loss_fails_on_the_labels_is_refused_in_one_line():
    """FSMT builds its decoder inputs from input_ids: labels of another length fail inside its
    own loss, so there is nothing to check ModelLoss against."""
    config = transformers.FSMTConfig(
        langs=["en", "de"], src_vocab_size=V, tgt_vocab_size=V, d_model=8, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=16, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.FSMTForConditionalGeneration(config).eval()
    batch = {"input_ids": _ids((N, S)), "labels": _labels((N, T))}
    _refused_unchanged(
        model, lambda: scores(model, LinearModel(), batch), ValueError,
        "FSMTForConditionalGeneration fails to compute its own loss from the first batch's "
        "labels .*: put decoder_input_ids in each batch",
    )  # fmt: skip


def test_a_token_loss_on_an_encoder_decoder_without_decoder_inputs_is_refused():
    """ModelLoss('tokens') builds no decoder inputs: T5 would crash inside transformers and
    BART would silently decode the shifted input_ids."""
    for family in (t5, bart, whisper):
        model, batch, _ = build(family)
        pruner = Pruner(model, LinearModel(), LinearSchedule(0.5, 1), data=batch,
                        loss_fn=ModelLoss("tokens"))  # fmt: skip
        _refused_unchanged(
            model, pruner.step, ValueError,
            "builds its decoder inputs from the labels, which ModelLoss\\('tokens'\\) does not: "
            "omit loss_fn",
        )  # fmt: skip


def test_a_causal_lm_that_does_not_shift_its_labels_is_refused_with_the_loss_to_pass():
    model = transformers.BartForCausalLM(_bart_config()).eval().to(DTYPE)
    batch = {"input_ids": _ids((N, S)), "labels": _labels((N, S))}
    _refused_unchanged(
        model, lambda: scores(model, LinearModel(), batch), ValueError,
        "does not shift its labels: pass loss_fn=lossprune.ModelLoss\\('tokens'\\)",
    )  # fmt: skip
    params = some_weights(model)
    loss = loss_and_grad(model, params, batch, ModelLoss("tokens")).loss
    torch.testing.assert_close(loss.float(), model(**batch).loss.float())


def test_a_loss_with_terms_beyond_the_cross_entropy_is_refused():
    """Mixtral with output_router_logits adds its router's auxiliary loss to the cross-entropy."""
    config = transformers.MixtralConfig(
        vocab_size=V, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
        num_experts_per_tok=1, output_router_logits=True, router_aux_loss_coef=0.5,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(config).eval()  # its grouped experts: float32
    batch = {"input_ids": _ids((N, S)), "labels": _labels((N, S))}
    _refused_unchanged(
        model, lambda: scores(model, LinearModel(), batch), ValueError,
        "computes a loss of .* but ModelLoss\\('causal_lm'\\) gives .*: pass loss_fn=",
    )  # fmt: skip


def test_float_labels_of_a_classifier_without_problem_type_name_the_multi_label_loss():
    model, batch, _ = build(bert_sequence)
    batch = {**batch, "labels": torch.ones(N, 3, dtype=DTYPE)}
    _refused_unchanged(
        model, lambda: scores(model, LinearModel(), batch), ValueError,
        "needs integer labels, got torch.float64 labels: pass loss_fn=lossprune.ModelLoss\\("
        "'multi_label'\\)",
    )  # fmt: skip
    assert float(scores(model, LinearModel(), batch, loss_fn=ModelLoss("multi_label"))[
        "bert.encoder.layer.0.attention.self.query.weight"].sum()) >= 0  # fmt: skip


def test_labels_outside_the_vocabulary_or_of_the_wrong_length_are_refused():
    model, batch, _ = build(llama)
    wrong = {**batch, "labels": batch["labels"].clone()}
    wrong["labels"][1, 2] = V + 3
    _refused_unchanged(
        model, lambda: scores(model, LinearModel(), wrong), ValueError,
        f"labels hold {V + 3}, outside the {V} classes of the model's logits",
    )  # fmt: skip
    # a later batch too (the probe sees only the first)
    _refused_unchanged(
        model, lambda: scores(model, LinearModel(), [batch, wrong]), ValueError,
        f"labels hold {V + 3}, outside",
    )  # fmt: skip
    short = {**batch, "labels": batch["labels"][:, :-1]}
    _refused_unchanged(
        model, lambda: scores(model, LinearModel(), short), ValueError,
        "reads targets of shape \\(3, 3\\) from the labels, but the model's logits give "
        "\\(3, 4\\): the labels need one entry per position",
    )  # fmt: skip


def test_model_loss_options_are_validated():
    with pytest.raises(ValueError, match="task must be one of"):
        ModelLoss("ranking")
    with pytest.raises(ValueError, match="only for task='seq2seq'"):
        ModelLoss("tokens", pad_token_id=0)
    with pytest.raises(ValueError, match="only for task='seq2seq'"):
        ModelLoss("tokens", decoder_start="last_label")
    with pytest.raises(ValueError, match="decoder_start must be one of"):
        ModelLoss("seq2seq", decoder_start="first")
    with pytest.raises(ValueError, match=r"decoder_start='last_label'\) builds decoder inputs"):
        to_batch({"input_ids": _ids((N, S)), "labels": _labels((N, T))},
                 ModelLoss("seq2seq", decoder_start="last_label"))  # fmt: skip
    with pytest.raises(ValueError, match="builds decoder inputs from labels only with"):
        to_batch({"input_ids": _ids((N, S)), "labels": _labels((N, T))}, ModelLoss("seq2seq"))
    with pytest.raises(ValueError, match="loss_fn is needed for Sequential"):
        ModelLoss.for_model(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="one integer label per example, \\(N,\\) or \\(N, 1\\)"):
        to_batch({"x": torch.ones(2, 3), "labels": torch.ones(2, 2, dtype=torch.long)},
                 ModelLoss("sequence"))  # fmt: skip
    with pytest.raises(ValueError, match="one label per position, \\(N, T\\)"):
        to_batch({"input_ids": torch.ones(4, dtype=torch.long), "labels": torch.ones(4).long()},
                 ModelLoss("causal_lm"))  # fmt: skip


@pytest.mark.parametrize("family", [t5, whisper, vit, bert_multi_label], ids=lambda f: f.__name__)
def test_the_families_run_end_to_end_in_a_pruner_without_loss_fn(family):
    model, batch, _ = build(family)
    pruner = Pruner(model, lossprune.QuadraticModel(lam=1e-3), LinearSchedule(0.5, 1), data=batch)
    with torch.no_grad():
        before = float(model(**batch).loss)
    report = pruner.step()
    assert report.loss_before == pytest.approx(before, rel=1e-5)
    assert abs(pruner.sparsity() - 0.5) < 0.01
