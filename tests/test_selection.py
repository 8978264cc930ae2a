"""Selection objects: one protocol, the scope shorthands, layouts, schedules checked up front."""

import pytest
import torch
from torch import nn

from lossprune import Global, Layerwise, LinearSchedule, Magnitude, Pruner, Selection
from lossprune.selection import ParameterLayout, as_selection, parameter_layouts, select_masks
from tests.conftest import make_cnn, make_mlp
from tests.hf_models import tiny_gpt2


def test_shorthands_are_the_selection_objects():
    assert as_selection("global") == Global() and as_selection("layerwise") == Layerwise()
    assert isinstance(Global(), Selection) and isinstance(Layerwise(), Selection)
    with pytest.raises(ValueError, match="scope must be one of"):
        as_selection("per-layer")
    with pytest.raises(TypeError, match="check_schedule and select"):
        as_selection(3)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_objects_and_shorthands_select_the_same_masks_as_select_masks(scope):
    model = make_mlp()
    by_name = Pruner(make_mlp(), Magnitude(), LinearSchedule(0.6, 1), scope=scope)
    by_object = Pruner(model, Magnitude(), LinearSchedule(0.6, 1), scope=as_selection(scope))
    expected = select_masks(
        {k: 0.5 * p.detach() ** 2 for k, p in by_object.params.items()},
        dict(by_object.masks),
        sparsity=0.6,
        scope=scope,
    )
    by_object.step()
    assert all(torch.equal(by_object.masks[k], expected[k]) for k in expected)
    assert repr(by_name.selection) == repr(by_object.selection)


def test_layouts_name_the_input_dimension():
    layouts = parameter_layouts(make_cnn(), dict(make_cnn().named_parameters()))
    assert layouts["0.weight"] == ParameterLayout((3, 2, 3, 3), "Conv2d", (1, 2, 3))
    assert layouts["5.weight"] == ParameterLayout((3, 16), "Linear", (1,))
    assert layouts["5.bias"].input_dims is None

    conv1d = tiny_gpt2().transformer.h[0].attn.c_attn  # Hugging Face's Conv1D: (in, out)
    layout = parameter_layouts(conv1d, {"weight": conv1d.weight})["weight"]
    assert layout.input_dims == (0,)
    transposed = nn.ConvTranspose2d(3, 2, 3)
    layout = parameter_layouts(transposed, {"weight": transposed.weight})["weight"]
    assert layout.input_dims == (0, 2, 3)  # (in, out, kh, kw): one output sums over in·kh·kw


def test_a_user_selection_plugs_in_and_validates_the_whole_schedule_first():
    class EvenRowsOnly:
        """Prunes only even output rows (a structure the Pruner knows nothing about)."""

        def __init__(self):
            self.checked = None

        def check_schedule(self, layouts, targets, min_density):
            self.checked = (dict(layouts), tuple(targets))
            if targets[-1] > 0.5:
                raise ValueError("EvenRowsOnly reaches at most 50% sparsity")

        def select(self, scores, masks, *, sparsity, min_density, layouts):
            new = {}
            for name, score in scores.items():
                even = masks[name][::2]
                chosen = select_masks({name: score[::2]}, {name: even}, sparsity=2 * sparsity)
                new[name] = masks[name].clone()
                new[name][::2] = chosen[name]
            return new

    model = make_mlp()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="at most 50%"):
        Pruner(model, Magnitude(), LinearSchedule(0.6, 2), scope=EvenRowsOnly())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    selection = EvenRowsOnly()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.4, 2), scope=selection,
                    on_collapse="ignore")  # fmt: skip
    assert selection.checked[1] == (0.2, 0.4) and "0.weight" in selection.checked[0]
    pruner.run()
    for mask in pruner.masks.values():
        assert mask[1::2].all()  # odd rows untouched
        assert not mask[::2].all()


def test_min_density_that_the_final_target_cannot_meet_is_refused_up_front():
    with pytest.raises(ValueError, match="final sparsity 0.9 asks for .* min_density=0.2"):
        Pruner(make_mlp(), Magnitude(), LinearSchedule(0.9, 3), min_density=0.2)
    with pytest.raises(ValueError, match="tensor '0.weight'"):
        Pruner(make_mlp(), Magnitude(), LinearSchedule(0.9, 3), min_density=0.2,
               scope="layerwise")  # fmt: skip
