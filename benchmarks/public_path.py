"""The paths users take, measured: Hugging Face models, dict batches, no ``loss_fn``.

Imported by ``run.py`` (section ``public``). Every ratio is to ONE forward+backward of the same
model and batch, the way a user trains it (``model(**batch).loss.backward()``), timed in the same
interleaved rounds; peak memory is the peak-RSS growth of one call in a fresh child process (CPU)
or the CUDA allocator's peak, over the same for the forward+backward.

* ``llama29m``: a Llama of 28.8M parameters (6 layers of width 512, MLP 1536, 8 heads,
  vocabulary 8192), 8 sequences of 128 random tokens. Rows: ``lossprune.scores`` with
  ``QuadraticModel(lam=1e-3, curvature="fisher_mc", mc_samples=1)``, with the default
  ``QuadraticModel(lam=1e-3)`` (``curvature="auto"``, which samples one label per token here),
  and one ``Pruner.step`` of the former with each level of per-stage diagnostics
  (:data:`DIAGNOSTICS`).
* ``mixtral14m``: a Mixtral of 14.4M parameters (4 layers of width 256, 8 experts of width 512,
  2 per token, 4 heads over 2 key-value heads, vocabulary 2048), 8 sequences of 64 random
  tokens, the default (``grouped_mm``) experts kernel. Row: ``lossprune.scores`` with
  ``QuadraticModel(lam=1e-3, curvature="fisher_mc", mc_samples=1)``.
* ``gpt2_23m``: the README's usage on a GPT-2 of 23.2M parameters (6 layers of width 512, 8
  heads, vocabulary 8192, tied head): ``Pruner(model, QuadraticModel(lam=1e-3),
  ExponentialSchedule(sparsity=0.9, stages=14), data=loader, examples=16)`` on a DataLoader of
  32 dict batches of 128 tokens, 8 per batch; one stage over its 2 batches, as a ratio to one
  forward+backward per batch, with each level of per-stage diagnostics.

``--smoke`` sizes (2 layers of width 32, vocabulary 64, 2 sequences of 16 tokens) check that
the code runs; their ratios mean nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

#: name -> (layers, width, MLP width, heads, vocabulary, tokens, sequences)
SIZES = {
    "llama29m": (6, 512, 1536, 8, 8192, 128, 8),
    "mixtral14m": (4, 256, 512, 4, 2048, 64, 8),
    "gpt2_23m": (6, 512, 2048, 8, 8192, 128, 8),
}
SMOKE = (2, 32, 64, 2, 64, 16, 2)
README_EXAMPLES = 2  # batches per README stage: examples = 2 x the loader's batch size
MIXTRAL_EXPERTS = (8, 2)  # experts, experts per token


class PublicCalls(NamedTuple):
    """One model and batch; the calls to time, by method; what one ratio is per."""

    calls: dict[str, Callable[[], object]]
    batches: int  # forward+backward passes one call stands for
    parameters: int


def build(name: str, device: torch.device, smoke: bool):
    """The model (eval mode) and its data: a dict batch, or a DataLoader of them."""
    import transformers

    layers, width, mlp, heads, vocab, tokens, sequences = SMOKE if smoke else SIZES[name]
    torch.manual_seed(0)
    if name == "llama29m":
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=tokens,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    elif name == "mixtral14m":
        experts, per_token = MIXTRAL_EXPERTS
        config = transformers.MixtralConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            num_local_experts=experts, num_experts_per_tok=per_token,
            max_position_embeddings=tokens, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )  # fmt: skip
        model = transformers.MixtralForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=tokens, n_embd=width, n_inner=mlp, n_layer=layers,
            n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    model = model.to(device).eval()
    ids = torch.randint(0, vocab, (sequences * 4, tokens)).to(device)
    batch = {"input_ids": ids[:sequences], "labels": ids[:sequences]}
    loader = DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=sequences)
    return model, batch, loader


def forward_backward(model: torch.nn.Module, batch: dict) -> None:
    """What a user's training step computes: the model's own loss and every gradient."""
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


#: ``Pruner(diagnostics=...)`` -> the suffix of its rows: the default (the measured losses), with
#: the exact Hessian's prediction, without diagnostics.
DIAGNOSTICS = {None: "", True: "_with_prediction", False: "_no_diagnostics"}


def public_calls(name: str, device: torch.device, smoke: bool = False) -> PublicCalls:
    """The methods of workload ``name`` (module docstring), ``"forward_backward"`` first."""
    from lossprune import ExponentialSchedule, Pruner, QuadraticModel, scores

    model, batch, loader = build(name, device, smoke)
    parameters = sum(p.numel() for p in model.parameters())
    generator = torch.Generator(device=device).manual_seed(0)
    calls: dict[str, Callable[[], object]] = {
        "forward_backward": lambda: forward_backward(model, batch)
    }
    warnings.filterwarnings("ignore", "curvature 'auto'", UserWarning)  # announced: it samples
    default = QuadraticModel(lam=1e-3)
    # Before issue 21 the default was the exact Fisher: T·V (about 10^6) gradients per pass
    # here, which never finishes; those rows are left out when measuring such a version.
    samples_by_default = default.curvature != "fisher"
    mc = QuadraticModel(lam=1e-3, curvature="fisher_mc", mc_samples=1)
    if name == "mixtral14m":
        calls["scores_qm_fisher_mc"] = lambda: scores(model, mc, batch, generator=generator)
        return PublicCalls(calls, 1, parameters)
    if name == "llama29m":
        calls["scores_qm_fisher_mc"] = lambda: scores(model, mc, batch, generator=generator)
        if samples_by_default:
            calls["scores_qm_default"] = lambda: scores(model, default, batch, generator=generator)
        for diagnostics, suffix in DIAGNOSTICS.items():
            pruner = Pruner(
                model, mc, ExponentialSchedule(0.9, 1000), data=batch, generator=0,
                diagnostics=diagnostics,
            )  # fmt: skip
            calls[f"pruner_step{suffix}"] = pruner.step
        return PublicCalls(calls, 1, parameters)
    sequences = len(batch["labels"])
    for diagnostics, suffix in DIAGNOSTICS.items() if samples_by_default else ():
        readme = Pruner(
            model, QuadraticModel(lam=1e-3), ExponentialSchedule(sparsity=0.9, stages=1000),
            data=loader, examples=README_EXAMPLES * sequences, diagnostics=diagnostics,
            generator=0,
        )  # fmt: skip
        calls[f"readme_stage{suffix}"] = readme.step
    return PublicCalls(calls, README_EXAMPLES, parameters)
