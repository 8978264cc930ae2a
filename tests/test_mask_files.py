"""Masks live with the model: a pruner adopts a model's zeros; masks save, load and keep zeros
through training without a pruner; a user selection cannot edit the pruner's masks (issue 18)."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lossprune import Global, LayerCollapseError, LinearSchedule, Magnitude, Pruner
from lossprune.selection import (
    MASKS_FILE,
    keep_pruned_at_zero,
    load_masks,
    masks_from_zeros,
    prunable_parameters,
    save_masks,
    select_masks,
)
from lossprune.sparse import to_sparse
from tests.conftest import make_mlp
from tests.hf_models import tiny_gpt2, tiny_llama, transformers
from tests.test_contract import snapshot


def _pruned_llama(sparsity: float = 0.5):
    torch.manual_seed(0)
    model = tiny_llama()
    Pruner(model, Magnitude(), LinearSchedule(sparsity, 1)).run()
    return model


# --- a pruner adopts the zeros a model has ------------------------------------------------------


def test_a_new_pruner_counts_the_models_zeros_as_pruned():
    model = _pruned_llama(0.5)
    params = prunable_parameters(model)
    total = sum(p.numel() for p in params.values())
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.7, 1))
    assert pruner.sparsity() == 0.5 and pruner.adopted == round(0.5 * total)
    for name, param in params.items():
        assert torch.equal(pruner.masks[name], param != 0)
    # A higher target prunes only new weights: the lowest |w| among those still kept.
    adopted = {k: m.clone() for k, m in pruner.masks.items()}
    magnitude = {k: p.detach().abs() for k, p in params.items()}
    report = pruner.step()
    expected = select_masks(magnitude, adopted, sparsity=0.7)
    assert all(torch.equal(pruner.masks[k], expected[k]) for k in params)
    assert report.pruned == round(0.7 * total) - round(0.5 * total)
    assert report.sparsity == pruner.sparsity() == round(0.7 * total) / total


def test_a_target_below_the_models_sparsity_is_refused_before_anything_changes():
    model = _pruned_llama(0.5)
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.3, 1))
    before = snapshot(model, pruner)
    with pytest.raises(ValueError, match=r"stage 1 targets sparsity 0.3 but .* \(0\.5000\) are "
                                         r"already pruned .*adopt_zeros=False"):  # fmt: skip
        pruner.step()
    assert snapshot(model, pruner) == before
    # adopt_zeros=False: the zeros are ordinary weights (the behaviour before issue 18).
    ordinary = Pruner(model, Magnitude(), LinearSchedule(0.3, 1), adopt_zeros=False)
    assert ordinary.sparsity() == 0.0 and ordinary.adopted == 0
    with pytest.raises(TypeError, match="adopt_zeros must be a bool"):
        Pruner(model, Magnitude(), LinearSchedule(0.3, 1), adopt_zeros=1)  # type: ignore[arg-type]


def test_fine_tuning_through_a_new_pruner_keeps_the_adopted_zeros():
    model = _pruned_llama(0.5)
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.6, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = pruner.attach(optimizer)
    ids = torch.randint(0, 64, (4, 8))
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    handle.remove()
    assert sum(int((p == 0).sum()) for p in pruner.params.values()) == pruner.num_pruned()
    assert pruner.sparsity() == 0.5


def test_a_loaded_state_replaces_the_adopted_masks():
    model = make_mlp()
    first = Pruner(model, Magnitude(), LinearSchedule(0.6, 2), on_collapse="ignore")
    first.step()
    state = first.state_dict()
    second = Pruner(model, Magnitude(), LinearSchedule(0.6, 2), on_collapse="ignore")
    assert all(torch.equal(second.masks[k], first.masks[k]) for k in first.masks)  # adopted
    with torch.no_grad():  # a weight of the first stage's kept set happens to be zero now
        next(iter(second.params.values())).view(-1)[
            int(first.masks["0.weight"].view(-1).nonzero()[0])
        ] = 0.0
    second.load_state_dict(state)
    assert second.stage == 1
    assert all(torch.equal(second.masks[k], first.masks[k]) for k in first.masks)


# --- mask files -----------------------------------------------------------------------------


def test_masks_save_beside_save_pretrained_and_load_back(tmp_path):
    model = _pruned_llama(0.5)
    masks = masks_from_zeros(model)
    path = save_masks(masks, tmp_path)
    assert path == tmp_path / MASKS_FILE
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        assert set(file.keys()) == set(masks)
        assert file.get_tensor(next(iter(masks))).dtype == torch.bool
    total = sum(m.numel() for m in masks.values())
    assert metadata["format"] == "lossprune.masks"
    assert (int(metadata["pruned"]), int(metadata["total"])) == (round(0.5 * total), total)
    for source in (tmp_path, path):
        loaded = load_masks(source)
        assert all(torch.equal(loaded[k], masks[k]) for k in masks)
    named = save_masks(masks, tmp_path / "elsewhere" / "run.safetensors")
    assert named.name == "run.safetensors"
    assert torch.equal(load_masks(named, model)[next(iter(masks))], masks[next(iter(masks))])


def test_a_mask_keyed_by_a_tied_weights_other_name_loads_under_the_canonical_name(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    mask = torch.rand(10, 4) > 0.5
    save_masks({"1.weight": mask}, tmp_path)
    loaded = load_masks(tmp_path, model)
    assert list(loaded) == ["0.weight"] and torch.equal(loaded["0.weight"], mask)


def test_bad_mask_files_and_masks_are_refused(tmp_path):
    model = make_mlp()
    with pytest.raises(FileNotFoundError, match="no mask file at .*save_masks"):
        load_masks(tmp_path)
    save_file({"0.weight": torch.ones(5, 6, dtype=torch.bool)}, str(tmp_path / MASKS_FILE))
    with pytest.raises(ValueError, match="is not a lossprune mask file"):
        load_masks(tmp_path)
    with pytest.raises(TypeError, match=r"masks\['0.weight'\] must be a bool tensor"):
        save_masks({"0.weight": torch.ones(5, 6)}, tmp_path)
    with pytest.raises(TypeError, match="masks must be a dict of bool tensors"):
        save_masks([torch.ones(2, dtype=torch.bool)], tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="masks holds no mask"):
        save_masks({}, tmp_path)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        save_masks({"0.weight": torch.ones(5, 6, dtype=torch.bool)}, 3)  # type: ignore[arg-type]
    save_masks({"9.weight": torch.ones(5, 6, dtype=torch.bool)}, tmp_path / "a")
    with pytest.raises(ValueError, match="the mask '9.weight' names no parameter"):
        load_masks(tmp_path / "a", model)
    save_masks({"0.weight": torch.ones(6, 5, dtype=torch.bool)}, tmp_path / "b")
    with pytest.raises(ValueError, match=r"has shape \(6, 5\), the parameter \(5, 6\)"):
        load_masks(tmp_path / "b", model)


def test_masks_in_a_torch_save_checkpoint_keep_zeros_without_a_pruner():
    model = make_mlp()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1), on_collapse="ignore")
    pruner.run()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "masks": pruner.masks}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh = make_mlp()
    fresh.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    handle = keep_pruned_at_zero(optimizer, fresh, checkpoint["masks"])
    inputs = torch.randn(8, 6, dtype=torch.float64)
    for _ in range(3):
        optimizer.zero_grad()
        fresh(inputs).square().mean().backward()
        optimizer.step()
    handle.remove()
    params = dict(fresh.named_parameters())
    for name, mask in pruner.masks.items():
        assert (params[name][~mask] == 0).all() and (params[name][mask] != 0).all()
    with pytest.raises(TypeError, match="a mask file needs the model"):
        keep_pruned_at_zero(optimizer, pruner.params, "masks/")
    with pytest.raises(TypeError, match="with a model as params, masks must be a dict"):
        keep_pruned_at_zero(optimizer, fresh, lambda: pruner.masks)


# --- a user selection gets copies ------------------------------------------------------------


class _EditsInPlace:
    """A user selection: the first stage as Global, then it writes into the masks it is handed
    and returns them."""

    def __init__(self, edit, first_stage_global=False):
        self.edit = edit
        self.stages = 0 if first_stage_global else 1

    def check_schedule(self, layouts, targets, min_density):
        pass

    def select(self, scores, masks, *, sparsity, min_density, layouts):
        self.stages += 1
        if self.stages == 1:
            return Global().select(scores, masks, sparsity=sparsity, min_density=min_density,
                                   layouts=layouts)  # fmt: skip
        self.edit(masks)
        return masks


def test_a_selection_that_edits_its_masks_cannot_unprune_or_hide_a_collapse():
    def unprune(masks):
        for mask in masks.values():
            mask.fill_(True)

    model = make_mlp()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 2), on_collapse="ignore",
                    scope=_EditsInPlace(unprune, first_stage_global=True))  # fmt: skip
    pruner.step()
    before = snapshot(model, pruner)
    with pytest.raises(ValueError, match="un-pruned entries .*masks never shrink"):
        pruner.step()
    assert snapshot(model, pruner) == before

    def empty_last_layer(masks):
        masks["4.weight"].fill_(False)

    model = make_mlp()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1), on_collapse="raise",
                    scope=_EditsInPlace(empty_last_layer))  # fmt: skip
    before = snapshot(model, pruner)
    with pytest.raises(LayerCollapseError, match=r"prunes every weight of \['4.weight'\]"):
        pruner.step()
    assert snapshot(model, pruner) == before


# --- an exported sparse copy: the documented routes to save and reload it -----------------------


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")  # safetensors
def test_a_sparse_export_is_rebuilt_from_the_saved_dense_model_or_pickled_whole(tmp_path):
    torch.manual_seed(0)
    model = tiny_gpt2()  # Conv1D layers: stored (in, out), exported (out, in)
    Pruner(model, Magnitude(), LinearSchedule(0.7, 1)).run()
    export = to_sparse(model)
    with pytest.raises(NotImplementedError):  # safetensors stores no sparse tensor
        export.save_pretrained(tmp_path / "export")
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        expected = export(input_ids=ids).logits
    # Route 1: save the pruned dense model (its zeros are the pattern), export after loading.
    model.save_pretrained(tmp_path / "dense")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    again = to_sparse(reloaded)
    for (name, a), (_, b) in zip(export.state_dict().items(), again.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert a.layout == b.layout and torch.equal(a.to_dense(), b.to_dense()), name
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=0, atol=0)
    # Route 2: torch.save the exported module itself (pickled: load with weights_only=False).
    torch.save(export, tmp_path / "export.pt")
    loaded = torch.load(tmp_path / "export.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
