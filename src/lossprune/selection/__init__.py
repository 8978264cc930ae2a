r"""Which weights a stage prunes, and keeping them pruned (layer 4 of docs/architecture.md).

Everything here turns scores into masks and masks into zeros; nothing computes a statistic or a
score (that is :mod:`lossprune.curvature` and :mod:`lossprune.criteria`, below and beside it)
or runs a stage (:mod:`lossprune.pruning`, above it). Conventions: a mask is a ``bool`` tensor
shaped like its parameter, ``True`` = kept; everything is keyed by the parameter's qualified
name; scores are LOWER = PRUNED FIRST; masks only grow.

Modules, one job each:

- :mod:`~lossprune.selection.prunable` — which parameters pruning may touch
  (:func:`prunable_parameters`), and why each of the others stays dense
  (:func:`describe_prunable`);
- :mod:`~lossprune.selection.masks` — exact-k selection from scores (:func:`select_masks`),
  applying masks (:func:`apply_masks`) and counting them;
- :mod:`~lossprune.selection.layout` — a parameter as the (outputs, inputs) matrix of its linear
  map (:class:`ParameterLayout`);
- :mod:`~lossprune.selection.structures` — the :class:`Selection` protocol, :class:`Global`,
  :class:`Layerwise`, per-group :class:`Targets` and the ``scope=`` shorthands;
- :mod:`~lossprune.selection.per_row` — the same count in every output row (:class:`PerRow`,
  Wanda's comparison group);
- :mod:`~lossprune.selection.nm` — N:M masks (:func:`nm_mask`, :class:`NM`);
- :mod:`~lossprune.selection.blocks` — whole tiles (:class:`Blocks`);
- :mod:`~lossprune.selection.keep_at_zero` — pruned weights stay exactly zero while an
  optimizer trains (:func:`keep_pruned_at_zero`);
- :mod:`~lossprune.selection.mask_files` — masks from a model's zeros (:func:`masks_from_zeros`),
  saved beside ``save_pretrained`` and loaded back (:func:`save_masks`, :func:`load_masks`);
- :mod:`~lossprune.selection.torch_prune` — masks to and from :mod:`torch.nn.utils.prune`;
- ``_dense`` — which weight matrices stay dense by default (embeddings, heads, front-ends,
  routers), from the model's own structure;
- ``_connectivity`` — which units of a pruned Linear/conv chain are cut off.

It imports :mod:`lossprune._common` only.
"""

from .blocks import Blocks
from .keep_at_zero import MaskHandle, keep_pruned_at_zero, unwrap_optimizer
from .layout import ParameterLayout, parameter_layouts
from .mask_files import MASKS_FILE, load_masks, masks_from_zeros, resolve_masks, save_masks
from .masks import (
    apply_masks,
    check_masks_fit,
    count_pruned,
    layer_densities,
    select_masks,
    sparsity_of,
)
from .nm import NM, is_nm, nm_mask
from .per_row import PerRow
from .prunable import ParameterDecision, PrunableSummary, describe_prunable, prunable_parameters
from .structures import Global, Layerwise, Selection, Targets, as_selection
from .torch_prune import from_torch_prune, to_torch_prune

__all__ = [
    "MASKS_FILE",
    "Blocks",
    "Global",
    "Layerwise",
    "MaskHandle",
    "NM",
    "ParameterDecision",
    "ParameterLayout",
    "PerRow",
    "PrunableSummary",
    "Selection",
    "Targets",
    "apply_masks",
    "as_selection",
    "check_masks_fit",
    "count_pruned",
    "describe_prunable",
    "from_torch_prune",
    "is_nm",
    "keep_pruned_at_zero",
    "layer_densities",
    "load_masks",
    "masks_from_zeros",
    "nm_mask",
    "parameter_layouts",
    "prunable_parameters",
    "resolve_masks",
    "save_masks",
    "select_masks",
    "sparsity_of",
    "to_torch_prune",
    "unwrap_optimizer",
]
