"""Running pruning stages: the :class:`~lossprune.Pruner` and what it orchestrates (layer 5).

A stage is statistics → scores → selection → update → checks, planned without side effects and
then committed at once, so that an error leaves the model and the pruner as they were (Laurent
et al., arXiv:2006.12279, Sec. 3-4: scores recomputed before each of the π stages).

Modules, one job each:

- :mod:`~lossprune.pruning.pruner` — :class:`~lossprune.Pruner`: the schedule's stages, masks,
  ``attach`` for fine-tuning, ``state_dict``;
- ``_stage`` — planning one stage without side effects;
- :mod:`~lossprune.pruning.scoring` — :func:`~lossprune.scores`: one statistics pass, then the
  criterion's formula;
- :mod:`~lossprune.pruning.updates` — the weight update of a stage: zeroing, or
  step-size-constrained :class:`~lossprune.Compensation`;
- :mod:`~lossprune.pruning.reports` — :class:`~lossprune.StageReport` and the layer-collapse
  policy;
- ``_diagnostics`` — predicted and measured loss change of a stage;
- ``_checkpoint`` — validating a pruner's ``state_dict`` completely before restoring it.

It imports the layers below it (:mod:`lossprune.selection`, :mod:`lossprune.criteria`,
:mod:`lossprune.curvature`, :mod:`lossprune.schedules`, :mod:`lossprune._common`), never one
above.
"""

from .pruner import Pruner
from .reports import LayerCollapseError, LayerCollapseWarning, StageReport
from .scoring import scores
from .updates import Compensation

__all__ = [
    "Compensation",
    "LayerCollapseError",
    "LayerCollapseWarning",
    "Pruner",
    "StageReport",
    "scores",
]
