"""Structured removal: heads, neurons, channels and experts removed, leaving a smaller dense model.

Layer 5'' of docs/architecture.md: above :mod:`lossprune.layerwise` (whose calibration,
statistics and solvers the refit uses) and below :mod:`lossprune.sparse`. Users write::

    from lossprune.structured import GroupOBS, StructuredPruner
    report = StructuredPruner(model, "neurons", 0.5, choice=GroupOBS(), data=batches).run()
    small = report.model          # smaller matrices, updated counts and config

Modules, one job each:

- :mod:`~lossprune.structured.groups` — the data model: a :class:`GroupSet` is one place where
  whole units can be removed, each group owning slices of several tensors; masking, counting;
- :mod:`~lossprune.structured.find` — :func:`find_groups`: heads, neurons and experts of
  Hugging Face transformers by layout (``_transformer_groups``), channels by tracing
  (:mod:`~lossprune.structured.tracing`);
- :mod:`~lossprune.structured.scores` — group scores at the network's scale (any criterion at
  group level; :class:`GroupQuadratic`, the exact within-group quadratic form);
- :mod:`~lossprune.structured.obs` — :class:`GroupOBS`, the layer-scale choice: the cost of a
  group to its consumers' reconstruction error with the rest refitted, greedy;
- :mod:`~lossprune.structured.measured` — :class:`MeasuredLoss`, the calibration loss measured
  per candidate;
- :mod:`~lossprune.structured.refit` — the consumers' exact least-squares refit;
- :mod:`~lossprune.structured.calibration` — their input statistics, set after set, block by
  block where the model allows;
- :mod:`~lossprune.structured.pruner` — :class:`StructuredPruner`: choose, refit, remove;
- :mod:`~lossprune.structured.removal` — :func:`remove`: the smaller model, counts and the
  Hugging Face config updated; :mod:`~lossprune.structured.saving` — :func:`load_removed`.
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
