r"""The network's loss measured exactly, for sets with few groups (heads, KV groups, experts).

Where a set has few groups, the loss change of removing each one — with its consumers refitted
(:mod:`~lossprune.structured.refit`) — can simply be MEASURED on the calibration data instead
of modelled: one pass over the data per candidate, no Taylor expansion, no layer-local proxy.
:class:`MeasuredLoss` removes, one group at a time, the candidate whose removal leaves the lowest
mean loss :math:`L(\theta_{-G})` (the loss the statistics pass uses: the model's own for a
Hugging Face model), in the order the pruner visits the sets, so later sets are measured on the
model with the earlier ones removed. The candidates are evaluated functionally
(:func:`torch.func.functional_call` with the candidate's tensors): the model is never modified
while they are compared.

It is the limit the loss models approximate (the layer's reconstruction error of
:class:`~lossprune.structured.GroupOBS` ignores what happens downstream of the consumer; the
network-scale criteria are second-order expansions around the dense weights), at the price of
:math:`\text{groups} \times \text{removed}` passes per set.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._common.checks import check_positive_int

__all__ = ["MeasuredLoss"]


@dataclass(frozen=True)
class MeasuredLoss:
    """Choose groups by the measured calibration loss after removal and refit (module docstring).

    Args:
        max_groups: the largest set it accepts (a set of 512 neurons would cost 512 passes per
            removed neuron: use :class:`~lossprune.structured.GroupOBS` there).

    Raises:
        TypeError: ``max_groups`` is not an int.
        ValueError: ``max_groups`` below 1.
    """

    max_groups: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_groups", check_positive_int("max_groups", self.max_groups))
