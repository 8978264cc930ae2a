"""Sequential calibration against a naive loop over the blocks, pruned in order, every family.

The naive loop knows nothing of lossprune: for block i it runs the WHOLE model (blocks before i
already pruned by the loop itself) on every batch, reads the inputs of block i's Linear /
Conv1D layers with forward hooks at the counted positions (attention mask 1, label not -100),
forms G = Σ x xᵀ / n, and prunes each matrix by the formula written out (Wanda: |W| ·
sqrt(G_jj), lowest per row; the exact refit: a dense solve per row).
"""

import pytest
import torch
from torch import nn

from lossprune import NM, Wanda
from lossprune.layerwise import LayerwisePruner, Refit
from lossprune.selection import prunable_parameters
from tests.layerwise.models import FAMILIES, batches, tiny, transformers

Conv1D = transformers.pytorch_utils.Conv1D


def matrix_modules(block):
    return {
        name: module
        for name, module in block.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    }


def inputs_of(model, modules, data):
    """Σ x xᵀ and n at counted positions, for each module, by hooks on a full forward."""
    grams = {name: 0.0 for name in modules}
    rows = dict.fromkeys(modules, 0)
    captured = {}

    def hook(name):
        def record(module, args):
            captured[name] = args[0].detach()

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for batch in data:
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            counted = (batch["attention_mask"] == 1) & (batch["labels"] != -100)
            for name in modules:
                x = captured[name]
                x = x.reshape(-1, x.shape[-1])[counted.reshape(-1)]  # OPT's MLP: (N·T, in)
                grams[name] = grams[name] + x.T @ x
                rows[name] += len(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: grams[name] / rows[name] for name in modules}


def wanda_rows(weight, gram, sparsity):
    scores = weight.abs() * gram.diagonal().sqrt()
    pruned = round(weight.shape[1] * sparsity)
    order = torch.sort(scores, dim=1, stable=True).indices[:, :pruned]
    return torch.ones_like(weight, dtype=torch.bool).scatter_(1, order, False)


def wanda_two_of_four(weight, gram, _):
    scores = (weight.abs() * gram.diagonal().sqrt()).reshape(weight.shape[0], -1, 4)
    order = torch.sort(scores, dim=-1, stable=True).indices[..., :2]
    return (
        torch.ones_like(scores, dtype=torch.bool).scatter_(-1, order, False).reshape(weight.shape)
    )


def dense_refit(weight, gram, mask, relative=0.01):
    """min (w0 - w)ᵀ (G + δI) (w0 - w) with w = 0 off the mask, one row at a time, densely."""
    damped = gram + relative * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    out = torch.zeros_like(weight)
    for i in range(weight.shape[0]):
        kept = mask[i].nonzero().squeeze(1)
        pruned = (~mask[i]).nonzero().squeeze(1)
        correction = torch.linalg.solve(
            damped[kept][:, kept], gram[kept][:, pruned] @ weight[i, pruned]
        )
        out[i, kept] = weight[i, kept] + correction
    return out


def naive(model, layers, data, choose_mask, sparsity, refit=False):
    """The loop of the module docstring; returns each pruned matrix's mask by parameter name."""
    masks = {}
    for prefix, block in layers:
        modules = matrix_modules(block)
        grams = inputs_of(model, modules, data)
        for name, module in modules.items():
            transposed = isinstance(module, Conv1D)
            weight = module.weight.detach()
            weight = weight.T if transposed else weight
            mask = choose_mask(weight, grams[name], sparsity)
            new = dense_refit(weight, grams[name], mask) if refit else weight * mask
            with torch.no_grad():
                module.weight.copy_(new.T if transposed else new)
            masks[f"{prefix}.{name}.weight"] = mask.T if transposed else mask
    return masks


def layer_list(model):
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        try:
            container = model.get_submodule(path)
        except AttributeError:
            continue
        return [(f"{path}.{i}", block) for i, block in enumerate(container)]
    raise AssertionError("no layer list")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_wanda_layer_by_layer_equals_the_naive_loop_on_every_family(family):
    data = batches(ignore_first=2) if family != "gemma2" else batches(((12, 12), (12,)))
    model, twin = tiny(family), tiny(family)
    expected = naive(twin, layer_list(twin), data, wanda_rows, 0.5)
    pruner = LayerwisePruner(model, Wanda(), 0.5, data=data)
    pruner.run()
    assert set(pruner.masks) == set(expected) == set(prunable_parameters(model))
    for name, mask in expected.items():
        assert torch.equal(pruner.masks[name], mask), name
    for (name, param), (_, reference) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(param, reference, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_two_of_four_with_the_exact_refit_equals_the_naive_loop(family):
    data = batches(ignore_first=1)
    model, twin = tiny(family), tiny(family)
    expected = naive(twin, layer_list(twin), data, wanda_two_of_four, 0.5, refit=True)
    pruner = LayerwisePruner(model, Wanda(), data=data, selection=NM(2, 4), update=Refit())
    pruner.run()
    for name, mask in expected.items():
        assert torch.equal(pruner.masks[name], mask), name
    for (name, param), (_, reference) in zip(model.named_parameters(), twin.named_parameters()):
        # CG stops at a relative excess objective of 1e-10: weights agree to about 1e-5.
        torch.testing.assert_close(param, reference, rtol=0, atol=1e-5, msg=name)
