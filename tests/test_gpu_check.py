"""``make gpu-check`` works end to end before a GPU is lent: every step at tiny sizes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_every_step_at_smoke_sizes_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke",
         "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "results-gpu-check-cpu-smoke.json").read_text())
    steps = summary["steps"]
    assert list(steps) == ["cuda_tests", "bench_quick", "sparse_speed", "qm140", "llama1b"]
    assert all(step["status"] == "ok" for step in steps.values()), steps
    bench = json.loads((tmp_path / "results-cpu-quick-smoke.json").read_text())
    rows = {(row["bench"], row["model"], row["method"]) for row in bench["results"]}
    for expected in [
        ("hvp_batch", "transformer_llama", "lossprune"),
        ("fisher_mc", "transformer", "lossprune_adapter"),
        ("public", "llama29m", "scores_qm_fisher_mc"),
        ("public", "gpt2_23m", "readme_stage"),
    ]:
        assert expected in rows
    sparse = json.loads((tmp_path / "results-sparse-cpu-smoke.json").read_text())
    assert sparse["rows"] and all(row["agrees"] for row in sparse["rows"])
    assert steps["qm140"]["result"]["sparsity"] > 0.98
    llama = steps["llama1b"]["result"]
    assert [stage["curvature"] for stage in llama["stages"]] == ["fisher_mc(samples=1)"] * 2
    assert llama["stages"][-1]["sparsity"] > 0.49
