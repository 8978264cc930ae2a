"""lossprune: unstructured pruning with loss models and step-size constraints.

A reproduction of, and a library beyond, Laurent et al., "Revisiting Loss Modelling for
Unstructured Pruning" (arXiv:2006.12279)::

    from lossprune import Pruner, QuadraticModel, ExponentialSchedule
    pruner = Pruner(model, QuadraticModel(lam=1e-3), ExponentialSchedule(0.956, stages=14),
                    loss_fn=torch.nn.CrossEntropyLoss(), data=train_loader)
    reports = pruner.run()
"""

from importlib.metadata import PackageNotFoundError, version

from ._common.model_loss import ModelLoss
from .criteria import (
    OBD,
    Criterion,
    GraSP,
    LinearModel,
    Magnitude,
    QuadraticModel,
    ScoringContext,
    SynFlow,
    Wanda,
)
from .curvature import NonFiniteError
from .layerwise import LayerwisePruner, LayerwiseReport
from .pruning import (
    Compensation,
    LayerCollapseError,
    LayerCollapseWarning,
    Pruner,
    StageReport,
    scores,
)
from .schedules import ExponentialSchedule, LinearSchedule, Schedule
from .selection import (
    NM,
    Blocks,
    Global,
    Layerwise,
    MaskHandle,
    PerRow,
    Selection,
    Targets,
    keep_pruned_at_zero,
)

try:
    __version__ = version("lossprune")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "OBD",
    "Blocks",
    "Compensation",
    "Criterion",
    "ExponentialSchedule",
    "Global",
    "GraSP",
    "LayerCollapseError",
    "LayerCollapseWarning",
    "Layerwise",
    "LayerwisePruner",
    "LayerwiseReport",
    "LinearModel",
    "LinearSchedule",
    "Magnitude",
    "MaskHandle",
    "NM",
    "PerRow",
    "ModelLoss",
    "NonFiniteError",
    "Pruner",
    "QuadraticModel",
    "Schedule",
    "ScoringContext",
    "StageReport",
    "Selection",
    "SynFlow",
    "Targets",
    "Wanda",
    "__version__",
    "keep_pruned_at_zero",
    "scores",
]
