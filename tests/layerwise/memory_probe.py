"""Peak memory of layer-wise pruning, measured in a fresh process (``python -m`` this module).

    python -m tests.layerwise.memory_probe depth BLOCKS WIDTH [--disk FOLDER]
    python -m tests.layerwise.memory_probe cap BLOCKS WIDTH FOLDER

``depth``: builds a stack of ``BLOCKS`` residual MLP blocks (``WIDTH`` -> 2·``WIDTH`` ->
``WIDTH``) in memory (or, with ``--disk``, offloaded to disk by accelerate), resets the peak
resident set (``/proc/self/clear_refs``), prunes it (Wanda + exact refit, masks not kept), and
prints the growth of the peak over the resident set before pruning, in MB, as JSON.

``cap``: writes a model's weights to an offload folder one block at a time (never the whole model
in memory), dispatches the model with accelerate's disk offload, caps the process's address
space (``RLIMIT_AS``) at what it uses after that plus HALF the model's float32 weights, then prunes
it (Wanda). Prints the weights' size, the cap and the peak growth.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
from torch import nn

from lossprune import LayerwisePruner, Wanda
from lossprune.layerwise import Refit

BATCHES, TOKENS = 8, (16, 64)  # calibration: 8 batches of 16 sequences of 64 positions


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _data(width: int, batches: int = BATCHES, shape: tuple[int, int] = TOKENS) -> list:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, width, generator=generator) for _ in range(batches)]


def _write_offloaded(blocks: int, width: int, folder: Path) -> Stack:
    """A meta-device model whose weights are written to ``folder`` one block at a time."""
    from accelerate.utils import offload_weight

    with torch.device("meta"):
        model = Stack(blocks, width)
    index: dict = {}
    for i in range(blocks):
        block = Block(width)  # materialised one block at a time
        for name, tensor in block.state_dict().items():
            offload_weight(tensor, f"layers.{i}.{name}", folder, index=index)
        del block
    (folder / "index.json").write_text(json.dumps(index))
    return model


def _dispatch(model: nn.Module, folder: Path) -> None:
    import accelerate

    accelerate.disk_offload(model, folder, execution_device=torch.device("cpu"))


def _warm_up(width: int, data: list[torch.Tensor], folder: Path | None = None) -> None:
    """Libraries that load on first use (LAPACK for the refit, accelerate's compiler guards)
    count in the resident set and the address space: one block of the same width, held the
    same way (``folder``: disk offload), is pruned first so that they load before anything is
    measured."""
    model = Stack(1, width)
    if folder is not None:
        folder.mkdir()
        model = _write_offloaded(1, width, folder)
        _dispatch(model, folder)
    LayerwisePruner(model, Wanda(), 0.5, data=data, update=Refit()).run()


def _prune(model: nn.Module, data: list[torch.Tensor], refit: bool = True) -> float:
    """Peak resident-set growth (MB) of pruning ``model`` (masks not kept)."""
    update = Refit() if refit else None
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    LayerwisePruner(model, Wanda(), 0.5, data=data, update=update, keep_masks=False).run()
    return _status_mb("VmHWM") - before


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    mode, blocks, width = argv[0], int(argv[1]), int(argv[2])
    torch.manual_seed(0)
    if mode == "depth":
        data = _data(width)
        disk = Path(argv[4]) if len(argv) > 3 else None  # --disk FOLDER
        _warm_up(width, data, None if disk is None else disk / "warm-up")
        if disk is not None:
            folder = disk
            model = _write_offloaded(blocks, width, folder)
            _dispatch(model, folder)
        else:
            model = Stack(blocks, width)
        print(json.dumps({"growth_mb": _prune(model, data)}))
        return
    folder = Path(argv[3])
    data = _data(width, batches=2, shape=(4, 32))
    _warm_up(width, data, folder / "warm-up")
    model = _write_offloaded(blocks, width, folder)
    _dispatch(model, folder)
    weights_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    virtual = _status_mb("VmSize")
    cap = (virtual + weights_mb / 2) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (int(cap), int(cap)))
    growth = _prune(model, data, refit=False)  # Wanda alone: the memory, not the solver, on test
    print(json.dumps({"weights_mb": weights_mb, "cap_mb": cap / 2**20, "virtual_mb": virtual,
                      "growth_mb": growth}))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
