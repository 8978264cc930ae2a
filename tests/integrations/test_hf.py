"""The Hugging Face Trainer keeps pruned weights exactly zero through PruningCallback."""

from __future__ import annotations

import pytest
import torch

from lossprune import LinearSchedule, Magnitude, Pruner
from tests.hf_models import TokenBlocks, tiny_gpt2

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from lossprune.integrations.hf import PruningCallback  # noqa: E402

CONV1D_WEIGHTS = r".*\.(c_attn|c_proj|c_fc)\.weight"


def _trainer(model, pruner, output_dir, steps=4):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,  # AdamW's decoupled decay would move pruned weights without the hook
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        warmup_steps=1,
        use_cpu=True,
        bf16=True,  # autocast: the masks must hold for bf16 gradients too
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=TokenBlocks(), callbacks=[PruningCallback(pruner)]
    )


def _hook_count(pruner: Pruner) -> int:
    return sum(len(p._backward_hooks or {}) for p in pruner.params.values())


def test_trainer_keeps_pruned_weights_zero_and_leaves_no_hooks(tmp_path):
    model = tiny_gpt2()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1), include=CONV1D_WEIGHTS)
    pruner.run()
    masks = {k: m.clone() for k, m in pruner.masks.items()}
    before = {k: p.detach().clone() for k, p in pruner.params.items()}
    trainer = _trainer(model, pruner, tmp_path)
    trainer.train()
    for name, param in pruner.params.items():
        assert torch.equal(pruner.masks[name], masks[name])
        assert (param.detach()[~masks[name]] == 0).all(), name
        # the kept weights did train (the hooks mask, they do not freeze)
        assert not torch.equal(param.detach()[masks[name]], before[name][masks[name]]), name
    assert _hook_count(pruner) == 0
    assert not trainer.optimizer.optimizer._optimizer_step_post_hooks


def test_second_train_call_attaches_to_the_new_optimizer(tmp_path):
    model = tiny_gpt2()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1), include=CONV1D_WEIGHTS)
    pruner.run()
    for run in range(2):
        _trainer(model, pruner, tmp_path / str(run), steps=2).train()
        assert _hook_count(pruner) == 0
    for name, param in pruner.params.items():
        assert (param.detach()[~pruner.masks[name]] == 0).all()


def test_callback_needs_a_pruner_masks_or_a_mask_file(tmp_path):
    with pytest.raises(TypeError, match="pruner must be a lossprune.Pruner, a dict of bool masks"):
        PruningCallback(object())  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="no mask file"):
        PruningCallback(tmp_path)
    masks = {"transformer.h.0.mlp.c_fc.weight": torch.ones(32, 128, dtype=torch.bool)}
    with pytest.raises(ValueError, match="needs the Trainer's model"):
        PruningCallback(masks).on_train_begin(None, None, None, optimizer=object())


@pytest.mark.parametrize("form", ["directory", "dict"])
def test_a_reloaded_model_fine_tunes_with_masks_from_a_file_or_a_dict(tmp_path, form):
    model = tiny_gpt2()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1), include=CONV1D_WEIGHTS)
    pruner.run()
    model.save_pretrained(tmp_path)
    pruner.save_masks(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    masks = tmp_path if form == "directory" else {k: m.clone() for k, m in pruner.masks.items()}
    _trainer(reloaded, masks, tmp_path / "run").train()
    params = dict(reloaded.named_parameters())
    for name, mask in pruner.masks.items():
        assert (params[name][~mask] == 0).all() and (params[name][mask] != 0).all(), name


def test_callback_needs_the_trainers_optimizer():
    pruner = Pruner(tiny_gpt2(), Magnitude(), LinearSchedule(0.5, 1), include=CONV1D_WEIGHTS)
    with pytest.raises(ValueError, match="needs the Trainer's optimizer"):
        PruningCallback(pruner).on_train_begin(None, None, None)
