"""Layer-wise pruning holds one block at a time: peak memory flat in depth, models above a cap.

Each measurement runs in a fresh process (:mod:`tests.layerwise.memory_probe`) with glibc's
``malloc`` told to return every large block to the system at once
(``MALLOC_MMAP_THRESHOLD_=65536``): otherwise its adaptive threshold keeps freed blocks in the
heap, and the resident set measures the allocator's history instead of what is alive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
ROOT = Path(__file__).resolve().parents[2]
linux = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


def probe(*args: str) -> dict:
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.layerwise.memory_probe", *args],
        cwd=ROOT, env=environment, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@linux
@pytest.mark.slow
@pytest.mark.parametrize("held", ["memory", "disk"])
def test_peak_memory_is_flat_in_depth(held, tmp_path):
    growth = {}
    for blocks in (4, 8, 16, 32):
        folder = tmp_path / f"{held}-{blocks}"
        folder.mkdir()
        disk = ["--disk", str(folder)] if held == "disk" else []
        growth[blocks] = probe("depth", str(blocks), "256", *disk)["growth_mb"]
    assert max(growth.values()) <= 1.10 * min(growth.values()), growth


@linux
@pytest.mark.slow
def test_a_model_larger_than_the_memory_cap_prunes_with_disk_offload(tmp_path):
    result = probe("cap", "16", "1024", str(tmp_path))
    assert result["weights_mb"] > result["cap_mb"] - result["virtual_mb"]  # the premise
    assert result["growth_mb"] < result["weights_mb"] / 2
