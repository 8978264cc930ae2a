"""Everything a lent GPU should measure, as ONE command (``make gpu-check``), in a few minutes.

    PYTHONPATH=src python benchmarks/gpu_check.py                 # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --smoke --out-dir /tmp/x

Steps, each in its own process with a time limit (a failure is recorded and the next step runs):

1. ``cuda_tests``: the tests that run on CUDA (``-k cuda`` in the test files that have them:
   the curvature cases on every device, the Pruner on CUDA against CPU, 2:4 and CSR/BSR
   exports on CUDA).
2. ``bench_quick``: ``benchmarks/run.py --device cuda --quick`` (core, transformers, public
   path) -> ``results-cuda-quick.json``.
3. ``sparse_speed``: ``benchmarks/sparse_speed.py --device cuda``: 2:4 on a 3072 x 10240 fp16
   Linear against dense -> ``results-sparse-cuda.json``.
4. ``qm140``: ``benchmarks/qm140.py``: QM, exact Fisher, π = 140, 1000 examples, the
   MNIST-sized MLP (target: under 5 s).
5. ``llama1b``: a Pruner run (QM default, 2 stages, the default diagnostics: measured losses)
   of a 1.1B-parameter Llama built from a config (random weights, TinyLlama's shape), with its
   peak memory and one forward+backward of the same batch beside it.

The summary goes to ``results-gpu-check.json`` (each step's status, wall time and output).
The GPU machine has torch, transformers, scipy, accelerate, safetensors and pytest, no package
registry: nothing here installs anything, and ``hypothesis`` (which one test module imports for
its property tests) is replaced by a stub that skips them. ``--smoke`` runs every step at tiny
sizes on any device, so the command is known to work before a GPU is lent
(``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
CUDA_TEST_FILES = (
    "tests/test_curvature.py",
    "tests/test_keyword_layers.py",
    "tests/test_model_coverage.py",
    "tests/test_sparse.py",
)
# Seconds per step on the GPU (the whole check must stay well under 8 minutes).
LIMITS = {"cuda_tests": 150, "bench_quick": 150, "sparse_speed": 60, "qm140": 40, "llama1b": 90}

_HYPOTHESIS_STUB = '''"""Stand-in for hypothesis (not installed here): its tests are skipped."""
import pytest


def given(*args, **kwargs):
    return pytest.mark.skip(reason="hypothesis is not installed")


def settings(*args, **kwargs):
    return lambda test: test


class _Strategies:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


strategies = _Strategies()
'''


def step_commands(device: str, smoke: bool, out_dir: Path) -> dict[str, list[str]]:
    """The command line of every step (module docstring)."""
    python = sys.executable
    smoke_flag = ["--smoke"] if smoke else []
    return {
        "cuda_tests": [
            python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
            "-k", "cuda", *CUDA_TEST_FILES,
        ],
        "bench_quick": [
            python, str(BENCH / "run.py"), "--device", device, "--quick", *smoke_flag,
            "--out", str(out_dir / f"results-{device}-quick{'-smoke' if smoke else ''}.json"),
        ],
        "sparse_speed": [
            python, str(BENCH / "sparse_speed.py"), "--device", device, *smoke_flag,
            "--out", str(out_dir / f"results-sparse-{device}{'-smoke' if smoke else ''}.json"),
        ],
        "qm140": [python, str(BENCH / "qm140.py"), "--device", device, *smoke_flag],
        "llama1b": [python, str(Path(__file__)), "--llama1b", "--device", device, *smoke_flag],
    }  # fmt: skip


def run_step(name: str, command: list[str], limit: float, env: dict[str, str]) -> dict:
    """One step in its own process; its last stdout line is JSON when the step reports one."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit
        )
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stdout or b"")[-2000:]
        output = tail.decode() if isinstance(tail, bytes) else tail
        return {"status": f"timed out after {limit} s", "seconds": limit, "output": output}
    seconds = round(time.perf_counter() - start, 1)
    # pytest exits 5 when no test is selected (no CUDA: the cases are not even parametrized).
    ok = done.returncode == 0 or (name == "cuda_tests" and done.returncode == 5)
    lines = done.stdout.strip().splitlines()
    report: dict = {
        "status": "ok" if ok else f"failed (exit {done.returncode})",
        "seconds": seconds,
        "output": "\n".join(lines[-15:]) + ("" if ok else "\n" + done.stderr[-3000:]),
    }
    if lines:
        try:
            report["result"] = json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    print(f"{name:13s} {report['status']:28s} {seconds:7.1f} s", flush=True)
    return report


def check(device: str, smoke: bool, out_dir: Path) -> dict:
    """Run every step; the summary is also written to ``results-gpu-check.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stub = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = dict(os.environ)
    paths = [str(ROOT / "src"), str(ROOT)]
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        (stub / "hypothesis.py").write_text(_HYPOTHESIS_STUB)
        paths.append(str(stub))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    steps = {}
    for name, command in step_commands(device, smoke, out_dir).items():
        steps[name] = run_step(name, command, LIMITS[name] * (4 if smoke else 1), env)
    summary = {
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "torch": torch.__version__,
        "smoke": smoke,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "steps": steps,
    }
    name = f"results-gpu-check{'-' + device + '-smoke' if smoke else ''}.json"
    (out_dir / name).write_text(json.dumps(summary, indent=1))
    print(f"wrote {out_dir / name} ({summary['wall_seconds']} s)")
    return summary


# ---------------------------------------------------------------------------------------------
# Step 5: a 1B-parameter Llama
# ---------------------------------------------------------------------------------------------

# TinyLlama-1.1B's shape: hidden 2048, MLP 5632, 22 layers, 32 heads, 4 key/value heads.
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
            "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}  # fmt: skip
LLAMA_SMOKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}  # fmt: skip


def llama1b(device: torch.device, smoke: bool) -> dict:
    """Two QM stages of a Pruner on a random 1.1B Llama; time and peak memory of each part."""
    import transformers

    from lossprune import ExponentialSchedule, Pruner, QuadraticModel

    sequences, tokens = (2, 16) if smoke else (4, 256)
    config = transformers.LlamaConfig(
        **(LLAMA_SMOKE if smoke else LLAMA_1B), max_position_embeddings=tokens,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (sequences, tokens), device=device)
    batch = {"input_ids": ids, "labels": ids}
    parameters = sum(p.numel() for p in model.parameters())

    def measured(fn) -> tuple[float, float | None]:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**30
        return time.perf_counter() - start, None

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    forward_backward()  # warm-up
    fb_seconds, fb_peak = measured(forward_backward)
    model.zero_grad(set_to_none=True)
    pruner = Pruner(model, QuadraticModel(lam=1e-3), ExponentialSchedule(0.5, 2), data=batch)
    stages = []
    for _ in range(2):
        seconds, peak = measured(pruner.step)
        report = pruner.reports[-1]
        stages.append({"seconds": seconds, "peak_gib": peak, "sparsity": report.sparsity,
                       "curvature": report.curvature, "loss_before": report.loss_before,
                       "loss_after": report.loss_after})  # fmt: skip
    return {
        "parameters": parameters,
        "sequences": sequences,
        "tokens": tokens,
        "forward_backward_seconds": fb_seconds,
        "forward_backward_peak_gib": fb_peak,
        "weights_gib": parameters * 4 / 2**30,
        "stages": stages,
        "stage_over_forward_backward": [s["seconds"] / fb_seconds for s in stages],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--out-dir", default=str(BENCH), help="where the JSON files go")
    parser.add_argument("--llama1b", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --smoke)")
    if args.llama1b:
        print(json.dumps(llama1b(torch.device(args.device), args.smoke)))
        return
    summary = check(args.device, args.smoke, Path(args.out_dir))
    failed = [name for name, step in summary["steps"].items() if step["status"] != "ok"]
    if failed:
        raise SystemExit(f"steps failed: {failed}")


if __name__ == "__main__":
    main()
