"""Models held by accelerate (CPU and disk offload) prune exactly like models in memory."""

import pytest
import torch
from torch import nn

from lossprune import NM, Wanda
from lossprune.layerwise import LayerwisePruner, Refit
from lossprune.layerwise.offload import is_dispatched, write_weight
from tests.layerwise.models import batches, tiny

accelerate = pytest.importorskip("accelerate")
from accelerate.hooks import remove_hook_from_submodules  # noqa: E402
from accelerate.utils import OffloadedWeightsLoader  # noqa: E402


def pruned(model, **options):
    LayerwisePruner(model, Wanda(), data=batches(), **options).run()
    return model


@pytest.mark.parametrize("offload", ["cpu", "disk"])
@pytest.mark.parametrize("options", [{"sparsity": 0.5}, {"selection": NM(2, 4), "update": Refit()}])
def test_an_offloaded_model_prunes_like_one_in_memory(offload, options, tmp_path):
    expected = pruned(tiny("llama", torch.float32), **options).state_dict()
    model = tiny("llama", torch.float32)
    if offload == "cpu":
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        accelerate.disk_offload(model, tmp_path, execution_device=torch.device("cpu"))
    assert is_dispatched(model)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    pruned(model, **options)
    if offload == "disk":  # the weights stayed on disk: read them back into the model
        for name, _ in list(model.named_parameters()):
            module_name, _, attribute = name.rpartition(".")
            module = model.get_submodule(module_name)
            value = module._hf_hook.weights_map[attribute]
            module._parameters[attribute] = nn.Parameter(value.clone(), requires_grad=False)
        remove_hook_from_submodules(model)
    else:
        remove_hook_from_submodules(model)  # accelerate puts the (pruned) CPU weights back
    got = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)


def test_offloaded_weights_that_cannot_be_written_are_refused():
    class Hook:
        offload = True

        def __init__(self, weights_map):
            self.weights_map = weights_map

    layer = nn.Linear(2, 2)
    loader = OffloadedWeightsLoader(index={"weight": {"safetensors_file": "model.safetensors"}})
    layer._hf_hook = Hook(loader)
    with pytest.raises(TypeError, match="read from a checkpoint file"):
        write_weight(layer, "weight", torch.zeros(2, 2))
    before = layer.weight.detach().clone()
    layer._hf_hook = Hook(FrozenMap())
    with pytest.raises(TypeError, match="does not know how to update"):
        write_weight(layer, "weight", torch.zeros(2, 2))
    assert torch.equal(layer.weight, before)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(TypeError, match="does not know how to update"):  # before any block
        LayerwisePruner(model, Wanda(), 0.5, data=torch.randn(4, 2))


class FrozenMap(dict):
    """A mapping accelerate might use that is not a dict of tensors."""

    def get(self, key, default=None):
        return "not a tensor"
