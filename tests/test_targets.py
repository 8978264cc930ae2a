"""Per-layer / per-group targets (``Targets``, ``scope={pattern: sparsity}``), every structure."""

import pytest
import torch
from torch import nn

from lossprune import (
    NM,
    Blocks,
    ExponentialSchedule,
    LinearSchedule,
    Magnitude,
    Pruner,
    QuadraticModel,
    Targets,
)
from lossprune.selection import parameter_layouts, select_masks
from lossprune.sparse import is_nm
from tests.test_contract import raw

CE = nn.CrossEntropyLoss()


def model():
    return nn.Sequential(
        nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)
    ).double()


def data(n=20):
    return torch.randn(n, 8, dtype=torch.float64), torch.randint(0, 4, (n,))


def magnitude(pruner):
    return {k: 0.5 * p.detach() ** 2 for k, p in pruner.params.items()}


def test_each_layer_reaches_its_own_target_on_the_schedules_shape():
    schedule = ExponentialSchedule(0.5, 3)
    pruner = Pruner(model(), Magnitude(), schedule, scope={r"0\.weight": 0.25, r"2\..*": 0.75})
    assert isinstance(pruner.selection, Targets)
    final = list(schedule)[-1]
    for stage, target in enumerate(schedule, start=1):
        expected_scores, before = magnitude(pruner), dict(pruner.masks)
        pruner.step()
        last = stage == len(schedule)
        goals = {"0.weight": 0.25, "2.weight": 0.75, "4.weight": final}
        for name, goal in goals.items():
            if name == "4.weight":  # unmatched: the schedule itself
                group_target = target
            else:
                group_target = goal if last else goal * target / final
            expected = select_masks(
                {name: expected_scores[name]}, {name: before[name]}, sparsity=group_target,
                scope="layerwise",
            )[name]  # fmt: skip
            assert torch.equal(pruner.masks[name], expected), (stage, name)
    pruned = {k: int((~m).sum()) for k, m in pruner.masks.items()}
    assert pruned == {"0.weight": 16, "2.weight": 48, "4.weight": 16}


def test_a_pattern_groups_layers_into_one_global_ranking():
    pruner = Pruner(model(), Magnitude(), LinearSchedule(0.5, 1),
                    scope=Targets({r"[02]\.weight": 0.6}, structure="global"))  # fmt: skip
    scores, before = magnitude(pruner), dict(pruner.masks)
    pruner.step()
    group = ("0.weight", "2.weight")
    expected = select_masks({k: scores[k] for k in group}, {k: before[k] for k in group},
                            sparsity=0.6, scope="global")  # fmt: skip
    assert all(torch.equal(pruner.masks[k], expected[k]) for k in group)
    assert int((~pruner.masks["4.weight"]).sum()) == 16  # unmatched: the schedule's 0.5


def test_first_matching_pattern_wins():
    targets = Targets({r"0\.weight": 0.1, r".*weight": 0.4})
    assert targets.groups(["0.weight", "2.weight"]) == {
        r"0\.weight": ["0.weight"],
        r".*weight": ["2.weight"],
    }


def test_targets_with_nm_and_blocks():
    net = model()
    nm = Targets({r"[02]\.weight": 0.5}, structure=NM(2, 4))
    pruner = Pruner(net, QuadraticModel(lam=1e-3), LinearSchedule(0.5, 2), loss_fn=CE,
                    data=data(), scope=nm)  # fmt: skip
    pruner.run()
    assert all(is_nm(pruner.masks[k], 2, 4, dim=1) for k in ("0.weight", "2.weight"))
    with pytest.raises(ValueError, match="must be 1 - n/m"):
        Pruner(model(), Magnitude(), LinearSchedule(0.5, 2),
               scope=Targets({r"0\.weight": 0.25}, structure=NM(2, 4)))  # fmt: skip
    blocks = Targets({r"0\.weight": 0.75}, structure=Blocks(2, 2, "layerwise"))
    pruner = Pruner(model(), Magnitude(), LinearSchedule(0.5, 2), scope=blocks)
    pruner.run()
    layouts = parameter_layouts(pruner.model, pruner.params)
    assert layouts["0.weight"].input_dims == (1,)
    tiles = pruner.masks["0.weight"].reshape(4, 2, 4, 2)
    assert bool((tiles == tiles[:, :1, :, :1]).all()) and int((~tiles[:, 0, :, 0]).sum()) == 12


@pytest.mark.parametrize(
    "scope, error, match",
    [
        ({r"attn.*": 0.3}, ValueError, "match no pruned parameter"),
        ({r"0\.weight": 1.0}, ValueError, "must satisfy 0 <="),
        ({r"0\.weight": "0.3"}, TypeError, "must be a real number"),
        ({r"(": 0.3}, ValueError, "invalid pattern"),
        ({3: 0.3}, TypeError, "patterns must be strings"),
    ],
)
def test_bad_targets_are_refused_before_anything_changes(scope, error, match):
    net = model()
    before = raw(net.state_dict())
    with pytest.raises(error, match=match):
        Pruner(net, Magnitude(), LinearSchedule(0.5, 2), scope=scope)
    assert raw(net.state_dict()) == before


def test_unbound_targets_and_a_zero_schedule_are_refused():
    with pytest.raises(TypeError, match="must be a mapping"):
        Targets([0.3])
    with pytest.raises(ValueError, match="final sparsity is 0"):
        Pruner(model(), Magnitude(), LinearSchedule(0.0, 1), scope={r"0\.weight": 0.3})
    layout = parameter_layouts(model(), {"0.weight": torch.zeros(8, 8)})
    with pytest.raises(ValueError, match="needs the schedule's final target"):
        Targets({r"0\.weight": 0.3}).select(
            {"0.weight": torch.zeros(8, 8)}, {"0.weight": torch.ones(8, 8, dtype=torch.bool)},
            sparsity=0.3, min_density=0.0, layouts=layout,
        )  # fmt: skip


def test_checkpoints_name_the_bound_targets():
    first = Pruner(model(), Magnitude(), LinearSchedule(0.5, 2), scope={r"0\.weight": 0.3})
    first.step()
    second = Pruner(model(), Magnitude(), LinearSchedule(0.5, 2), scope={r"0\.weight": 0.3})
    second.load_state_dict(first.state_dict())
    assert all(torch.equal(first.masks[k], second.masks[k]) for k in first.masks)
    other = Pruner(model(), Magnitude(), LinearSchedule(0.5, 2), scope={r"0\.weight": 0.4})
    with pytest.raises(ValueError):
        other.load_state_dict(first.state_dict())
