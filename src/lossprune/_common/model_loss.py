r"""The loss a Hugging Face model computes itself from ``labels``, written as outputs + a loss.

A model called ``model(**inputs, labels=labels)`` returns ``.loss``; the library needs the same
number as ``loss_fn(outputs, targets)`` so that the closed forms of
:mod:`lossprune.curvature.outputs` apply (softmax cross-entropy per token, never a
:math:`(T V)^2` output Hessian). :class:`ModelLoss` is that split, one ``task`` per way
``transformers`` computes its loss (``transformers.loss.loss_utils`` and the models that keep
their own):

========================  =====================================================================
task                      the model's loss
========================  =====================================================================
``"causal_lm"``           cross-entropy of logits ``[:, :-1]`` against labels ``[:, 1:]``
``"tokens"``              cross-entropy, one label per position (masked LM, token classes)
``"seq2seq"``             ``"tokens"`` on the decoder's logits, the decoder inputs built from
                          the labels when the batch has none: labels shifted one position to
                          the right, ``decoder_start_token_id`` first, ``-100`` replaced by
                          ``pad_token_id`` (``shift_tokens_right``; T5's ``_shift_right``);
                          MBart's and PLBart's put each row's last label first instead
                          (``decoder_start="last_label"``)
``"sequence"``            cross-entropy, one integer label per example (``(N,)`` or ``(N, 1)``)
``"regression"``          mean squared error of the logits and float labels (``num_labels`` = 1
                          or ``problem_type="regression"``)
``"multi_label"``         binary cross-entropy with logits (``problem_type=
                          "multi_label_classification"``)
========================  =====================================================================

Cross-entropies are means over the labels that are not ``ignore_index`` (``-100``). A task is
picked by :func:`model_loss` from the class name and the config; the pick is then checked
against ``model(**batch).loss`` on the first batch of every statistics pass
(:func:`lossprune._common.probe.probe_first_batch`), so a model that computes its loss some other
way (a causal LM that does not shift, an auxiliary router loss) is refused, never mis-scored.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModelLoss", "model_loss", "model_loss_in", "resolve_loss", "CROSS_ENTROPY_TASKS"]

TASKS = ("causal_lm", "tokens", "seq2seq", "sequence", "regression", "multi_label")
CROSS_ENTROPY_TASKS = ("causal_lm", "tokens", "seq2seq", "sequence")
# Names of the model inputs that hold an encoder-decoder's decoder inputs.
DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")
# What decoder inputs built from labels start with (ModelLoss.decoder_start).
DECODER_STARTS = ("token", "last_label")


@dataclass(frozen=True)
class ModelLoss:
    r"""The loss a Hugging Face model computes itself, as logits + a standard loss.

    ``task`` says how logits and labels line up (module docstring): ``"causal_lm"``,
    ``"tokens"``, ``"seq2seq"``, ``"sequence"``, ``"regression"`` or ``"multi_label"``.
    :meth:`read` takes the logits from the model's outputs (classes moved to dim 1, PyTorch's
    layout) and :meth:`targets` the matching labels, so that ``loss(read(outputs),
    targets(labels))`` is exactly the model's ``.loss``: :func:`torch.nn.functional.cross_entropy`
    with ``ignore_index``, :func:`~torch.nn.functional.mse_loss` or
    :func:`~torch.nn.functional.binary_cross_entropy_with_logits`, each a mean.
    :meth:`for_model` picks the task of a model.

    Args:
        task: one of the tasks above.
        reduction: ``"mean"`` (the only one the statistics accept).
        ignore_index: the label of positions without a loss.
        decoder_start_token_id, pad_token_id: ``"seq2seq"`` only: the first decoder input and
            the id that replaces ``-100`` when the decoder inputs are built from the labels
            (the model's ``config`` values).
        decoder_start: ``"seq2seq"`` only: what the decoder inputs built from the labels start
            with: ``"token"``, ``decoder_start_token_id``; ``"last_label"``, each row's last
            label that is not padding (MBart's and PLBart's ``shift_tokens_right``: their
            language id).
    """

    task: str
    reduction: str = "mean"
    ignore_index: int = -100
    decoder_start_token_id: int | None = None
    pad_token_id: int | None = None
    decoder_start: str = "token"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        ids = (self.decoder_start_token_id, self.pad_token_id)
        if self.task != "seq2seq" and (ids != (None, None) or self.decoder_start != "token"):
            raise ValueError(
                "decoder_start_token_id, pad_token_id and decoder_start build decoder inputs: "
                f"only for task='seq2seq', got task={self.task!r}"
            )
        if self.decoder_start not in DECODER_STARTS:
            raise ValueError(
                f"decoder_start must be one of {DECODER_STARTS}, got {self.decoder_start!r}"
            )

    @classmethod
    def for_model(cls, model: nn.Module) -> ModelLoss:
        """The loss ``model`` computes from ``labels`` (:func:`model_loss`).

        Raises:
            ValueError: the model follows no known Hugging Face convention.
        """
        return resolve_loss(model, None)

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.task == "regression":
            return nn.functional.mse_loss(logits, targets.to(logits.dtype))
        if self.task == "multi_label":
            return nn.functional.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
        return nn.functional.cross_entropy(logits, targets, ignore_index=self.ignore_index)

    def read(self, outputs: Any) -> Tensor:
        """The logits of ``outputs`` (``.logits`` of a ``ModelOutput``), shifted, classes dim 1."""
        logits = getattr(outputs, "logits", outputs)
        if not isinstance(logits, Tensor):
            raise TypeError(
                "loss_fn=None reads the logits of the model's outputs (a tensor or an object "
                f"with .logits), got {type(outputs).__name__}; pass loss_fn=..."
            )
        if self.task == "causal_lm":
            logits = logits[:, :-1]
        if self.task in ("causal_lm", "tokens", "seq2seq") and logits.dim() > 2:
            return logits.movedim(-1, 1)
        return logits

    def targets(self, labels: Tensor) -> Tensor:
        """The labels the logits of :meth:`read` predict.

        Raises:
            ValueError: labels of a kind or shape this task cannot score: float labels for a
                cross-entropy, one example's labels (a row, not a batch).
        """
        if self.task in CROSS_ENTROPY_TASKS and labels.is_floating_point():
            hint = (
                "loss_fn=lossprune.ModelLoss('multi_label') (what the model computes for float "
                "labels) or loss_fn=lossprune.ModelLoss('regression')"
                if self.task == "sequence"
                else "loss_fn=..."
            )
            raise ValueError(
                f"ModelLoss({self.task!r}) is a cross-entropy, which needs integer labels, got "
                f"{labels.dtype} labels: pass {hint}"
            )
        if self.task in ("causal_lm", "tokens", "seq2seq") and labels.dim() < 2:
            raise ValueError(
                f"ModelLoss({self.task!r}) reads one label per position, (N, T), got labels of "
                f"shape {tuple(labels.shape)}: batch single examples (rows) with a DataLoader "
                "and a collator; a classifier's loss is ModelLoss('sequence')"
            )
        if self.task == "causal_lm":
            return labels[:, 1:]
        if self.task == "sequence":
            if labels.dim() == 2 and labels.shape[1] == 1:  # (N, 1): transformers reads view(-1)
                return labels[:, 0]
            if labels.dim() != 1:
                raise ValueError(
                    "ModelLoss('sequence') reads one integer label per example, (N,) or (N, 1), "
                    f"got labels of shape {tuple(labels.shape)}; for several labels per example "
                    "pass loss_fn=lossprune.ModelLoss('multi_label') with float labels"
                )
        if self.task in ("regression", "multi_label"):
            # (N,) regression labels against the (N, 1) logits of num_labels=1: transformers
            # squeezes both, the same mean of squares.
            return labels.reshape(len(labels), -1)
        return labels

    def check_targets(self, logits: Tensor, targets: Tensor, examples: int | None = None) -> None:
        """``targets`` (of :meth:`targets`) shaped and valued for ``logits`` (of :meth:`read`).

        ``examples``: the logits are those of some of the examples of ``targets`` (the first
        batch's probe); each example's targets are then checked against their shape, and
        ``targets`` must hold ``examples`` examples.

        Raises:
            ValueError: labels of another length than the logits, or outside their classes.
        """
        per_position = self.task in ("causal_lm", "tokens", "seq2seq")
        if self.task in CROSS_ENTROPY_TASKS:
            expected = logits.shape[:1] + logits.shape[2:]
        else:
            expected = logits.shape
        if examples is not None:
            expected = torch.Size((examples, *expected[1:]))
        if targets.shape != expected:
            what = "position of the inputs" if per_position else "output of the model"
            raise ValueError(
                f"ModelLoss({self.task!r}) reads targets of shape {tuple(targets.shape)} from "
                f"the labels, but the model's logits give {tuple(expected)}: the labels need "
                f"one entry per {what}"
            )
        if self.task in CROSS_ENTROPY_TASKS:
            self.check_label_range(targets, logits.shape[1])

    def check_label_range(self, targets: Tensor, classes: int) -> None:
        """Every label is a class of the logits, ``0 <= y < classes``, or ``ignore_index``.

        Raises:
            ValueError: naming a label outside (a tokenizer of another vocabulary, padding
                labelled with a pad id instead of ``-100``).
        """
        kept = targets[targets != self.ignore_index]
        if not kept.numel():
            return
        low, high = (int(v) for v in kept.aminmax())
        if low < 0 or high >= classes:
            raise ValueError(
                f"labels hold {low if low < 0 else high}, outside the {classes} classes of the "
                f"model's logits (0 to {classes - 1}, or {self.ignore_index} to ignore a "
                "position): use the model's own tokenizer and label padding with "
                f"{self.ignore_index}"
            )

    def decoder_inputs(self, labels: Tensor) -> Tensor:
        """The decoder input ids an encoder-decoder builds from ``labels`` (``"seq2seq"``).

        ``shift_tokens_right``: labels shifted one position right, ``decoder_start_token_id``
        first, ``-100`` (any ``ignore_index``) replaced by ``pad_token_id``. With
        ``decoder_start="last_label"`` (MBart, PLBart) each row starts with its own last label
        that is not padding instead.

        Raises:
            ValueError: the ids to build them with are unknown.
        """
        if self.decoder_start == "last_label":
            if self.pad_token_id is None:
                raise ValueError(
                    "ModelLoss('seq2seq', decoder_start='last_label') builds decoder inputs "
                    "from labels only with pad_token_id (the model's config value): set it, or "
                    "put decoder_input_ids in each batch"
                )
            padded = labels.masked_fill(labels == self.ignore_index, self.pad_token_id)
            last = (padded != self.pad_token_id).sum(1, keepdim=True) - 1
            shifted = padded.new_empty(padded.shape)
            shifted[:, 1:] = padded[:, :-1]
            shifted[:, 0] = padded.gather(1, last.clamp_min(0)).squeeze(1)
            return shifted
        if self.decoder_start_token_id is None or self.pad_token_id is None:
            raise ValueError(
                "ModelLoss('seq2seq') builds decoder inputs from labels only with "
                "decoder_start_token_id and pad_token_id (the model's config values): set "
                "them, or put decoder_input_ids in each batch"
            )
        shifted = labels.new_empty(labels.shape)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = self.decoder_start_token_id
        return shifted.masked_fill(shifted == self.ignore_index, self.pad_token_id)


_CLASSIFIERS = (
    "ForSequenceClassification",
    "ForImageClassification",
    "ForAudioClassification",
    "ForVideoClassification",
)


def model_loss(model: nn.Module) -> ModelLoss | None:
    """The :class:`ModelLoss` of a Hugging Face model, by class name and config; else ``None``.

    ``*ForCausalLM``, ``*LMHeadModel`` and decoder-only ``*ForConditionalGeneration``:
    ``"causal_lm"``; encoder-decoder ``*ForConditionalGeneration`` (``config.is_encoder_decoder``,
    T5, BART, Whisper): ``"seq2seq"`` with the config's ``decoder_start_token_id`` and
    ``pad_token_id``; the same for the generating classes that ``transformers``' auto tables
    list under other names (:func:`_generation_task`: ``MarianMTModel``,
    ``EncoderDecoderModel``, ``BertGenerationDecoder``); ``*ForMaskedLM``,
    ``*ForTokenClassification``: ``"tokens"``; sequence, image, audio and video classifiers: by
    ``config.problem_type`` as ``transformers`` decides it (``"regression"`` also for
    ``num_labels == 1``, ``"multi_label"``, else ``"sequence"``).
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    name = type(model).__name__
    generates = _generation_task(model)
    if name.endswith(("ForCausalLM", "LMHeadModel")) or generates == "causal_lm":
        return ModelLoss("causal_lm")
    if name.endswith("ForConditionalGeneration") or generates == "seq2seq":
        if not getattr(config, "is_encoder_decoder", False):
            return ModelLoss("causal_lm")  # decoder-only, e.g. a vision-language model
        if _starts_with_last_label(model):
            return ModelLoss(
                "seq2seq", pad_token_id=_config_id(config, "pad_token_id"),
                decoder_start="last_label",
            )  # fmt: skip
        return ModelLoss(
            "seq2seq",
            decoder_start_token_id=_config_id(config, "decoder_start_token_id"),
            pad_token_id=_config_id(config, "pad_token_id"),
        )
    if name.endswith(("ForMaskedLM", "ForTokenClassification")):
        return ModelLoss("tokens")
    if name.endswith(_CLASSIFIERS):
        problem = getattr(config, "problem_type", None)
        if problem == "regression" or (problem is None and getattr(config, "num_labels", 2) == 1):
            return ModelLoss("regression")
        if problem == "multi_label_classification":
            return ModelLoss("multi_label")
        return ModelLoss("sequence")
    return None


#: ``transformers``' auto-class tables (``models.auto.modeling_auto``) of the generating models,
#: by the task their loss is: they name the classes that the suffixes above miss
#: (``MarianMTModel``, ``EncoderDecoderModel``, ``SpeechEncoderDecoderModel``,
#: ``VisionEncoderDecoderModel``, ``ReformerModelWithLMHead``, ``BertGenerationDecoder``).
_GENERATION_TABLES = {
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "causal_lm",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": "seq2seq",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES": "seq2seq",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "seq2seq",
}


def _generation_task(model: nn.Module) -> str | None:
    """The task of a generating model that ``transformers``' auto tables list, else ``None``.

    ``"causal_lm"`` or ``"seq2seq"`` when the model's class (or a ``transformers`` class it
    derives from) is in :data:`_GENERATION_TABLES`. ``"seq2seq"`` stands for the
    conditional-generation tables, whose decoder-only members (vision-language models)
    :func:`model_loss` then treats as causal LMs, as it does a decoder-only
    ``*ForConditionalGeneration``.
    """
    own = [c for c in type(model).__mro__ if c.__module__.startswith("transformers.")]
    if not own:  # not a transformers model: its tables need not be imported
        return None
    tables = _generation_tables()
    return next((tables[c.__name__] for c in own if c.__name__ in tables), None)


@functools.cache
def _generation_tables() -> dict[str, str]:
    """Class name -> task, from :data:`_GENERATION_TABLES` (empty without ``transformers``)."""
    tables: dict[str, str] = {}
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # only transformers' own classes are looked up here
        return tables
    for table, task in _GENERATION_TABLES.items():
        for value in getattr(modeling_auto, table, {}).values():
            for cls_name in value if isinstance(value, (tuple, list)) else (value,):
                tables.setdefault(cls_name, task)
    return tables


def _starts_with_last_label(model: nn.Module) -> bool:
    """Whether the model's own code builds decoder inputs MBart's way.

    transformers' ``shift_tokens_right(input_ids, pad_token_id)`` of MBart and PLBart (and
    FSMT's; no ``decoder_start_token_id``) puts each row's last label that is not padding
    first; the function is read from the module that defines the model's class (or a class it
    derives from). The first batch's check against the model's own loss confirms the pick.
    """
    for cls in type(model).__mro__:
        if not cls.__module__.startswith("transformers."):
            continue
        shift = getattr(sys.modules.get(cls.__module__), "shift_tokens_right", None)
        if callable(shift):
            try:
                names = list(inspect.signature(shift).parameters)
            except (TypeError, ValueError):
                return False
            return names == ["input_ids", "pad_token_id"]
    return False


def _config_id(config: Any, name: str) -> int | None:
    """A token id of the config or of its decoder's sub-config (an int), else ``None``."""
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(decoder=True), name, None)
    return int(value) if isinstance(value, int) else None


def resolve_loss(model: nn.Module, loss_fn: Any) -> Any:
    """``loss_fn``, or when it is ``None`` the model's own loss (:func:`model_loss`).

    Raises:
        ValueError: ``loss_fn`` is ``None`` and the model follows no known convention.
    """
    if loss_fn is not None:
        return loss_fn
    loss = model_loss(model)
    if loss is None:
        raise ValueError(
            f"loss_fn is needed for {type(model).__name__}: only Hugging Face models "
            "(*ForCausalLM, *LMHeadModel, *ForConditionalGeneration, *ForMaskedLM, "
            "*ForTokenClassification, *ForSequenceClassification, *ForImageClassification, "
            "*ForAudioClassification, and the generating models transformers' auto classes "
            "list: MarianMTModel, EncoderDecoderModel) computing their loss from labels may "
            "omit it"
        )
    return loss


def model_loss_in(loss_fn: Any) -> ModelLoss | None:
    """The :class:`ModelLoss` that ``loss_fn`` is or wraps, else ``None``.

    A wrapper keeps the loss it wraps in ``.loss_fn``, as GraSP's tempered loss does.
    """
    while loss_fn is not None and not isinstance(loss_fn, ModelLoss):
        loss_fn = getattr(loss_fn, "loss_fn", None)
    return loss_fn
