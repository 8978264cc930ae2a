"""Structured removal: heads, neurons, channels and experts removed, leaving a smaller dense model.

Layer 5'' of docs/architecture.md (above :mod:`lossprune.layerwise`, whose calibration and
statistics the refit uses; below :mod:`lossprune.sparse`).

- :mod:`~lossprune.structured.groups` — the data model: a :class:`GroupSet` is one place where
  whole units can be removed, each group owning slices of several tensors;
- :mod:`~lossprune.structured.find` — :func:`find_groups`: heads, neurons and experts of
  Hugging Face transformers by layout (``_transformer_groups``), channels by tracing
  (:mod:`~lossprune.structured.tracing`);
- :mod:`~lossprune.structured.removal` — :func:`remove`: the smaller model, counts and the
  Hugging Face config updated.
"""

from .find import find_groups
from .groups import (
    AttributeUpdate,
    ConfigUpdate,
    Consumer,
    GroupSet,
    Slice,
    kept_positions,
    masked_state,
    parameters_removed,
)
from .measured import MeasuredLoss
from .obs import GroupOBS, GroupOBSResult
from .pruner import SetReport, StructuredPruner, StructuredReport
from .refit import ConsumerProblem, column_refit
from .removal import parameter_count, remove
from .saving import load_removed
from .scores import GroupQuadratic, group_scores
from .tracing import ChannelTrace, trace_channels

__all__ = [
    "AttributeUpdate",
    "ConsumerProblem",
    "GroupOBS",
    "GroupOBSResult",
    "GroupQuadratic",
    "MeasuredLoss",
    "SetReport",
    "StructuredPruner",
    "StructuredReport",
    "column_refit",
    "group_scores",
    "ChannelTrace",
    "ConfigUpdate",
    "Consumer",
    "GroupSet",
    "Slice",
    "find_groups",
    "kept_positions",
    "load_removed",
    "masked_state",
    "parameter_count",
    "parameters_removed",
    "remove",
    "trace_channels",
]
