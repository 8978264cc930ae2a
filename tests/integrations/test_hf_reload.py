"""Prune, save_pretrained, reload in ANOTHER process, fine-tune with the Trainer: every zero stays.

The second process has no pruner: only the directory ``save_pretrained`` and
``Pruner.save_masks`` wrote. The real ``transformers.Trainer`` trains with AdamW and weight
decay (which would revive every pruned weight without the masks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lossprune import LinearSchedule, Magnitude, Pruner
from lossprune.selection import MASKS_FILE, load_masks
from tests.hf_models import tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: reloads the model, checks that a new Pruner adopts its zeros,
# fine-tunes it with PruningCallback(<directory>) and prints what it finds as JSON.
SECOND_PROCESS = """
import json, sys, torch, transformers
from lossprune import LinearSchedule, Magnitude, Pruner
from lossprune.integrations.hf import PruningCallback
from lossprune.selection import load_masks
from tests.hf_models import TokenBlocks

directory, train = sys.argv[1], sys.argv[2] == "callback"
model = transformers.AutoModelForCausalLM.from_pretrained(directory)
masks = load_masks(directory, model)
adopting = Pruner(model, Magnitude(), LinearSchedule(0.6, 1))
adopted = all(torch.equal(adopting.masks[k], masks[k]) for k in masks)
before = {k: p.detach().clone() for k, p in adopting.params.items()}
args = transformers.TrainingArguments(
    output_dir=directory + "/run", max_steps=5, per_device_train_batch_size=4,
    learning_rate=1e-2, weight_decay=0.1, use_cpu=True, report_to=[], save_strategy="no",
    disable_tqdm=True,
)
callbacks = [PruningCallback(directory)] if train else []
transformers.Trainer(model=model, args=args, train_dataset=TokenBlocks(),
                     callbacks=callbacks).train()
params = dict(model.named_parameters())
zeros = sum(int((params[k] == 0).sum()) for k in masks)
total = sum(m.numel() for m in masks.values())
print(json.dumps({
    "adopted": adopted,
    "adopted_sparsity": adopting.sparsity(),
    "pruned_entries_zero": all(bool((params[k][~m] == 0).all()) for k, m in masks.items()),
    "kept_entries_trained": all(
        not torch.equal(params[k][m], before[k][m]) for k, m in masks.items()
    ),
    "zero_fraction": zeros / total,
}))
"""


def _second_process(directory: Path, mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", SECOND_PROCESS, str(directory), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_save_pretrained_reload_in_another_process_and_fine_tune_keeps_every_zero(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1))
    pruner.run()
    model.save_pretrained(tmp_path)
    written = pruner.save_masks(tmp_path)
    assert written == tmp_path / MASKS_FILE
    saved = load_masks(tmp_path)
    assert all(torch.equal(saved[k], pruner.masks[k]) for k in pruner.masks)

    found = _second_process(tmp_path, "callback")
    assert found["adopted"] and found["adopted_sparsity"] == pruner.sparsity() == 0.5
    assert found["pruned_entries_zero"] and found["kept_entries_trained"]
    assert found["zero_fraction"] == 0.5
    # The same fine-tuning without the masks revives the pruned weights: the check can fail.
    assert _second_process(tmp_path, "no-callback")["zero_fraction"] < 0.01
