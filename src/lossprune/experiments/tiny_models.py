"""Tiny trained Hugging Face causal language models for layer-wise pruning benchmarks.

Layer-wise pruners (SparseGPT, Frantar & Alistarh 2023; Wanda, Sun et al. 2024; ALPS, Meng et al.
2024) are written against Hugging Face ``LlamaForCausalLM`` / ``OPTForCausalLM``. To compare
them with lossprune on a CPU in minutes, this module builds the same classes from configs
(nothing is downloaded), at byte level (vocabulary 256, no tokenizer), trains them on the
standard library's docstrings (:mod:`lossprune.experiments.text`) with the recipe of
:func:`lossprune.experiments.lm.train_lm` (AdamW, weight decay on matrices only, cosine learning
rate with 5% linear warm-up, gradient clipping, dropout off), and caches each trained model with
``save_pretrained`` together with fixed evaluation data:

* ``calib.pt`` -- ``{"input_ids": (128, 128)}``: calibration sequences, whole blocks drawn
  without replacement from the TRAIN split (seeded);
* ``calib_padded.pt`` -- the same sequences RIGHT-padded after random lengths:
  ``{"input_ids", "attention_mask", "labels", "lengths"}``; padding holds ``PAD_ID``,
  ``attention_mask = 0`` and ``labels = -100`` (to check that padding changes nothing);
* ``heldout.pt`` -- ``{"input_ids": (64, 128)}``: held-out blocks spread evenly over the
  VALIDATION split (the end of the corpus, never seen in training).

Perplexity is :math:`\\exp` of the token mean of the next-byte cross-entropy over all positions of
the held-out blocks that have a next byte (:func:`lossprune.experiments.lm.evaluate_lm`).

The cache folder is ``<root>/<name>/<digest>/``, where ``digest`` hashes the architecture, the
training settings, the corpus fingerprint and the data settings: changing any of them trains a
new model instead of silently reusing an old one. ``<root>/<name>/LATEST`` names the newest.
The default root is ``.cache/tiny-models`` under the working directory (git-ignored), or
``$LOSSPRUNE_TINY_MODELS``.

Command line::

    python -m lossprune.experiments.tiny_models --preset llama-4x64   # train (or load), summary
    python -m lossprune.experiments.tiny_models --list
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .lm import IGNORE_INDEX, evaluate_lm, train_lm
from .text import VOCAB_SIZE, TextSplit, load_text_split

__all__ = [
    "FAMILIES",
    "PAD_ID",
    "PRESETS",
    "DataSettings",
    "ModelSpec",
    "Preset",
    "TinyModel",
    "TrainSettings",
    "build_model",
    "cache_dir",
    "calibration_data",
    "default_root",
    "heldout_data",
    "load",
    "load_cached",
    "load_data",
    "load_or_train",
    "main",
    "pad_right",
    "perplexity",
]

FAMILIES = ("llama", "opt", "gpt2")
PAD_ID = 0
"""Padding token: byte 0 never occurs in the docstring corpus (UTF-8 text)."""


def default_root() -> Path:
    """Where trained models are cached: ``$LOSSPRUNE_TINY_MODELS`` or ``.cache/tiny-models``."""
    return Path(os.environ.get("LOSSPRUNE_TINY_MODELS", ".cache/tiny-models"))


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a tiny byte-level causal LM.

    Attributes:
        family: ``"llama"`` (``LlamaForCausalLM``: RMSNorm, RoPE, SwiGLU MLP, grouped-query
            attention, untied head), ``"opt"`` (``OPTForCausalLM``: pre-LayerNorm, learned
            positions, ReLU MLP, biases, head tied to the embedding) or ``"gpt2"``
            (``GPT2LMHeadModel``: ``Conv1D`` projections, GELU MLP, tied head).
        layers: decoder blocks.
        hidden: model width.
        heads: query heads (``hidden`` must be a multiple).
        kv_heads: key/value heads for grouped-query attention (Llama only; ``None`` = ``heads``).
        intermediate: MLP width (Llama ``intermediate_size``, OPT ``ffn_dim``, GPT-2 ``n_inner``;
            ``None``: 3 x hidden for Llama, 4 x hidden otherwise).
        max_positions: longest sequence the model accepts.

    Raises:
        ValueError: an unknown family, a non-positive size, heads that do not divide ``hidden``,
            ``kv_heads`` that do not divide ``heads`` or given for another family.
    """

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int | None = None
    intermediate: int | None = None
    max_positions: int = 128

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("layers", "hidden", "heads", "max_positions"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.kv_heads is not None:
            if self.family != "llama":
                raise ValueError(f"kv_heads is only supported for llama, got {self.family!r}")
            if not 0 < self.kv_heads <= self.heads or self.heads % self.kv_heads:
                raise ValueError(f"kv_heads must divide heads ({self.heads}), got {self.kv_heads}")
        if self.intermediate is not None and self.intermediate <= 0:
            raise ValueError(f"intermediate must be positive, got {self.intermediate}")

    @property
    def mlp_width(self) -> int:
        """The MLP width (``intermediate``, or its default)."""
        if self.intermediate is not None:
            return self.intermediate
        return 3 * self.hidden if self.family == "llama" else 4 * self.hidden


@dataclass(frozen=True)
class TrainSettings:
    """Options of :func:`lossprune.experiments.lm.train_lm`.

    Raises:
        ValueError: a non-positive number of steps, learning rate, batch size or clipping norm.
    """

    steps: int = 1500
    lr: float = 3e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "lr", "batch_size", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class DataSettings:
    """The corpus, its blocks and the fixed calibration / held-out sets.

    Attributes:
        text_bytes: corpus size passed to ``load_text_split(max_bytes=...)``.
        block_size: tokens per training block and per calibration / held-out sequence.
        val_fraction: the end of the corpus held out for validation.
        calib_sequences: calibration sequences (whole TRAIN blocks, drawn without replacement).
        heldout_sequences: held-out sequences (VALIDATION blocks, evenly spaced).
        pad_min_length: shortest unpadded length in the right-padded calibration set.
        data_seed: seed of the calibration draw and of the padded lengths.
    """

    text_bytes: int = 1_000_000
    block_size: int = 128
    val_fraction: float = 0.1
    calib_sequences: int = 128
    heldout_sequences: int = 64
    pad_min_length: int = 16
    data_seed: int = 0


@dataclass(frozen=True)
class Preset:
    """A named model: its architecture, training and data settings, and why it exists."""

    name: str
    spec: ModelSpec
    train: TrainSettings
    data: DataSettings = DataSettings()
    note: str = ""


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "llama-4x64",
            ModelSpec("llama", layers=4, hidden=64, heads=4, kv_heads=2, intermediate=192),
            TrainSettings(steps=220),  # about one epoch of the 900 kB training text
            note="layer-wise benchmark (dense held-out ppl about 9.1)",
        ),
        Preset(
            "opt-3x64",
            ModelSpec("opt", layers=3, hidden=64, heads=4, intermediate=128),
            TrainSettings(steps=250),
            note="layer-wise benchmark (dense held-out ppl about 14.5)",
        ),
        Preset(
            "llama-gqa-192",
            ModelSpec("llama", layers=4, hidden=192, heads=8, kv_heads=4, intermediate=512),
            TrainSettings(steps=150),
            note="structured removal (KV groups under grouped-query attention)",
        ),
        Preset(
            "gpt2-small",
            ModelSpec("gpt2", layers=4, hidden=128, heads=4, intermediate=512),
            TrainSettings(steps=200),
            note="structured removal on Conv1D projections",
        ),
    )
}
"""Named models; ``--preset NAME`` on the command line."""


class TinyModel(NamedTuple):
    """A trained model in eval mode, the folder it is cached in, and its training log."""

    model: nn.Module
    path: Path
    log: dict[str, Any]


def _transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "tiny models need Hugging Face transformers: pip install 'lossprune[transformers]'"
        ) from error
    return transformers


def hf_config(spec: ModelSpec) -> Any:
    """The Hugging Face config of ``spec``: byte vocabulary, dropout off, ``PAD_ID`` padding."""
    transformers = _transformers()
    common = {
        "vocab_size": VOCAB_SIZE,
        "pad_token_id": PAD_ID,
        "bos_token_id": PAD_ID,
        "eos_token_id": PAD_ID,
    }
    if spec.family == "llama":
        return transformers.LlamaConfig(
            hidden_size=spec.hidden, intermediate_size=spec.mlp_width,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads or spec.heads,
            max_position_embeddings=spec.max_positions, attention_dropout=0.0,
            tie_word_embeddings=False, **common,
        )  # fmt: skip
    if spec.family == "opt":
        return transformers.OPTConfig(
            hidden_size=spec.hidden, ffn_dim=spec.mlp_width, num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads, max_position_embeddings=spec.max_positions,
            word_embed_proj_dim=spec.hidden, do_layer_norm_before=True, dropout=0.0,
            attention_dropout=0.0, layerdrop=0.0, **common,
        )  # fmt: skip
    return transformers.GPT2Config(
        n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads, n_inner=spec.mlp_width,
        n_positions=spec.max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        **common,
    )  # fmt: skip


def build_model(spec: ModelSpec, *, seed: int = 0) -> nn.Module:
    """A freshly initialised model of ``spec`` (initialisation fixed by ``seed``), eval mode."""
    transformers = _transformers()
    classes = {
        "llama": transformers.LlamaForCausalLM,
        "opt": transformers.OPTForCausalLM,
        "gpt2": transformers.GPT2LMHeadModel,
    }
    torch.manual_seed(seed)
    return classes[spec.family](hf_config(spec)).eval()


def text_split(data: DataSettings) -> TextSplit:
    """The docstring corpus of ``data`` cut into training and validation blocks."""
    return load_text_split(
        max_bytes=data.text_bytes, block_size=data.block_size, val_fraction=data.val_fraction
    )


def calibration_data(split: TextSplit, data: DataSettings) -> dict[str, torch.Tensor]:
    """``{"input_ids": (calib_sequences, block_size)}``: TRAIN blocks drawn without replacement.

    Raises:
        ValueError: the training split has fewer blocks than requested.
    """
    blocks = split.train.blocks
    if len(blocks) < data.calib_sequences:
        raise ValueError(f"{len(blocks)} training blocks < {data.calib_sequences} requested")
    generator = torch.Generator().manual_seed(data.data_seed)
    order = torch.randperm(len(blocks), generator=generator)[: data.calib_sequences]
    return {"input_ids": blocks[order].clone()}


def heldout_data(split: TextSplit, data: DataSettings) -> dict[str, torch.Tensor]:
    """``{"input_ids": (heldout_sequences, block_size)}``: VALIDATION blocks, evenly spaced.

    Raises:
        ValueError: the validation split has fewer blocks than requested.
    """
    blocks = split.val.blocks
    if len(blocks) < data.heldout_sequences:
        raise ValueError(f"{len(blocks)} validation blocks < {data.heldout_sequences} requested")
    index = torch.linspace(0, len(blocks) - 1, data.heldout_sequences).round().long()
    return {"input_ids": blocks[index].clone()}


def pad_right(input_ids: torch.Tensor, *, min_length: int, seed: int) -> dict[str, torch.Tensor]:
    """Right-pad each sequence of ``input_ids`` after a random length in ``[min_length, T]``.

    The first sequence keeps its full length, so the padded batch has the same shape.

    Returns:
        ``input_ids`` (``PAD_ID`` after the length), ``attention_mask`` (1 on real tokens, 0 on
        padding), ``labels`` (the ids, ``-100`` on padding) and ``lengths``.

    Raises:
        ValueError: ``min_length`` outside ``[1, T]``.
    """
    n, t = input_ids.shape
    if not 1 <= min_length <= t:
        raise ValueError(f"min_length must be in [1, {t}], got {min_length}")
    generator = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(min_length, t + 1, (n,), generator=generator)
    lengths[0] = t
    real = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    return {
        "input_ids": torch.where(real, input_ids, torch.full_like(input_ids, PAD_ID)),
        "attention_mask": real.long(),
        "labels": torch.where(real, input_ids, torch.full_like(input_ids, IGNORE_INDEX)),
        "lengths": lengths,
    }


def perplexity(model: nn.Module, batch: dict[str, torch.Tensor], *, batch_size: int = 16) -> float:
    """Held-out perplexity of ``batch["input_ids"]`` (:func:`~.lm.evaluate_lm`, eval mode)."""
    ids = batch["input_ids"]
    device = next(model.parameters()).device
    loader = [
        {"input_ids": ids[i : i + batch_size], "labels": ids[i : i + batch_size]}
        for i in range(0, len(ids), batch_size)
    ]
    return evaluate_lm(model, loader, device).perplexity


def _identity(spec: ModelSpec, settings: TrainSettings, data: DataSettings, corpus: str) -> dict:
    return {
        "spec": dataclasses.asdict(spec),
        "train": dataclasses.asdict(settings),
        "data": dataclasses.asdict(data),
        "corpus": corpus,
        "format": 1,
    }


def cache_dir(
    name: str,
    spec: ModelSpec,
    settings: TrainSettings,
    data: DataSettings,
    fingerprint: str,
    root: str | Path | None = None,
) -> Path:
    """``<root>/<name>/<digest>``: the digest hashes everything the trained model depends on."""
    identity = _identity(spec, settings, data, fingerprint)
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return Path(root or default_root()) / name / digest


def load(path: str | Path) -> TinyModel:
    """The model cached in ``path`` (a folder written by :func:`load_or_train`), eval mode."""
    path = Path(path)
    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    log = json.loads((path / "tiny_model.json").read_text())
    return TinyModel(model, path, log)


def load_cached(name: str, root: str | Path | None = None) -> TinyModel:
    """The newest cached model of preset ``name``, without re-reading the corpus (fast).

    It checks that the cached model was trained with the preset's current architecture,
    training and data settings (not the corpus: parsing the standard library takes seconds).

    Raises:
        FileNotFoundError: nothing cached, or the cached model has other settings (train it with
            :func:`load_or_train` or the command line).
    """
    preset = PRESETS[name]
    latest = Path(root or default_root()) / name / "LATEST"
    if not latest.exists():
        raise FileNotFoundError(f"no cached model {name!r} under {latest.parent.parent}")
    path = latest.parent / latest.read_text().strip()
    log = json.loads((path / "tiny_model.json").read_text())
    expected = _identity(preset.spec, preset.train, preset.data, log.get("corpus", ""))
    if any(log.get(key) != value for key, value in expected.items()):
        raise FileNotFoundError(f"{path} was trained with other settings than preset {name!r}")
    return load(path)


def load_or_train(
    name: str, *, root: str | Path | None = None, progress: bool = False
) -> TinyModel:
    """The trained model of preset ``name``: from the cache, or trained and cached now.

    Training saves the model (``save_pretrained``), ``calib.pt``, ``calib_padded.pt``,
    ``heldout.pt`` and ``tiny_model.json`` (settings, history, training time, dense
    perplexities), atomically.

    Raises:
        ValueError: an unknown preset.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    preset = PRESETS[name]
    spec, settings, data = preset.spec, preset.train, preset.data
    split = text_split(data)
    path = cache_dir(name, spec, settings, data, split.fingerprint, root)
    if (path / "tiny_model.json").exists():
        return load(path)
    model = build_model(spec, seed=settings.seed)
    start = time.perf_counter()
    history = train_lm(
        model, split, steps=settings.steps, seed=settings.seed, lr=settings.lr,
        batch_size=settings.batch_size, weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm, progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    calib = calibration_data(split, data)
    heldout = heldout_data(split, data)
    padded = pad_right(calib["input_ids"], min_length=data.pad_min_length, seed=data.data_seed)
    log = {
        "name": name,
        **_identity(spec, settings, data, split.fingerprint),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": seconds,
        "history": history,
        "heldout_ppl": perplexity(model, heldout),
        "calib_ppl": perplexity(model, calib),
        "torch": torch.__version__,
        "transformers": _transformers().__version__,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    torch.save(calib, tmp / "calib.pt")
    torch.save(padded, tmp / "calib_padded.pt")
    torch.save(heldout, tmp / "heldout.pt")
    (tmp / "tiny_model.json").write_text(json.dumps(log, indent=2))
    tmp.replace(path)  # a half-written folder is never mistaken for a cached model
    (path.parent / "LATEST").write_text(path.name + "\n")
    return TinyModel(model, path, log)


def load_data(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"calib", "calib_padded", "heldout"}`` saved beside a cached model."""
    path = Path(path)
    return {key: torch.load(path / f"{key}.pt") for key in ("calib", "calib_padded", "heldout")}


def main(argv: list[str] | None = None) -> int:
    """Command line: train or load a preset and print its summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--root", default=None, help="cache folder (default: default_root())")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.list or args.preset is None:
        for preset in PRESETS.values():
            print(f"{preset.name:16s} {preset.spec} steps={preset.train.steps}  {preset.note}")
        return 0
    tiny = load_or_train(args.preset, root=args.root, progress=True)
    summary = {key: tiny.log[key] for key in ("name", "parameters", "heldout_ppl", "calib_ppl")}
    print(json.dumps({**summary, "path": str(tiny.path)}, indent=2), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
