"""Side-by-side benchmark of the curvature core against the usual ways of computing the same thing.

Usage::

    python benchmarks/run.py [--quick] [--smoke] [--device cpu|cuda] [--sections ...] --out FILE

Every method of a bench runs in this one process on the same model, batch and vectors. Each
result is first checked against a reference (the double-backward loop, or the generic
``torch.func`` path), then timed: warm-up calls, then ``repeats`` rounds in which every method
(and the plain gradient it is compared with) runs once, interleaved so that a change of machine
load hits all of them alike, in an order that rotates from round to round; the median is
reported. ``ratio_to_grad`` is the median time over
the median time of ONE plain gradient (forward + backward, ``torch.autograd.grad``) of the same
model and batch; for ``hvp_batch`` it is per vector. ``peak_mb`` is the peak memory of one call
above what existed before it: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the growth of
the peak resident set size (VmHWM, reset after the model and data are built) of a fresh child
process that runs the call once (``--quick``: the plain gradient and lossprune's rows only);
``peak_ratio`` is it over the plain gradient's.

Sections: ``core`` (MLP and CNN), ``transformers`` (GPT-2 and a Llama with grouped-query
attention: lossprune on the Hugging Face model itself with dict batches and no ``loss_fn``, the
path users take, beside the common tensor adapter every method shares) and ``public`` (the
public API on a 28.8M Llama, a 14.4M Mixtral and the README's usage on a 23M GPT-2,
:mod:`public_path`).
``--smoke``: tiny sizes and one round, to check that everything runs (the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import public_path
import torch
from torch import nn
from torch.func import grad_and_value, jvp, vmap

from lossprune import curvature

CE = nn.CrossEntropyLoss()
QUICK = False
SMOKE = False
MINIMA: dict[str, float] = {}  # fastest round of the last side-by-side timing, by method


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """784-300-100-10 with tanh (Laurent et al. 2020, MNIST), written like the experiments' MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(
            nn.Linear(784, 300), nn.Tanh(), nn.Linear(300, 100), nn.Tanh(), nn.Linear(100, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.flatten(x))


def cnn() -> nn.Module:
    """Three 3x3 convolutions with ReLU and pooling on 32x32x3 inputs, then a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(8),
        nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


# The causal transformers: (architecture, layers, width, heads, key/value heads, vocabulary,
# tokens T, sequences N, N quick).
TRANSFORMERS = {
    "transformer": ("gpt2", 2, 128, 4, 4, 2048, 64, 16, 8),
    # Grouped-query attention: two query heads per key/value head.
    "transformer_llama": ("llama", 2, 128, 4, 2, 2048, 64, 16, 8),
    # ~25M parameters (with the tied 8192 x 512 embedding): the statistics-pass memory rows.
    "transformer25m": ("gpt2", 6, 512, 8, 8, 8192, 128, 4, 4),
}
SMOKE_TRANSFORMER = (2, 16, 2, 1, 64, 8, 2, 2)  # layers ... N quick, for --smoke


def transformer(name: str, quick: bool):
    """A causal LM built from a ``transformers`` config, random tokens, as a next-token classifier.

    The adapter of the reproduction (``NextTokenLogits``: ``(N, V, T - 1)`` logits, attention
    under the math SDPA backend) is the common tensor-in, tensor-out interface of every method;
    lossprune's own rows take the Hugging Face model inside it directly (:func:`hf_view`). The
    targets are the next tokens, so the cross-entropy is the model's own shifted loss.
    """
    import transformers

    from lossprune.experiments.lm_run import NextTokenLogits

    kind, *size = TRANSFORMERS[name]
    if SMOKE:
        size = list(SMOKE_TRANSFORMER)
    layers, width, heads, kv_heads, vocab, tokens, sequences, quick_sequences = size
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=tokens, n_embd=width, n_layer=layers, n_head=heads,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        lm = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=tokens, tie_word_embeddings=True, bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
        lm = transformers.LlamaForCausalLM(config)
    model = NextTokenLogits(lm)
    ids = torch.randint(0, vocab, (quick_sequences if quick else sequences, tokens))
    return model, ids, ids[:, 1:]


class HFView(NamedTuple):
    """The Hugging Face model inside the adapter, its parameters and the same batch as a dict."""

    model: nn.Module
    params: dict[str, torch.Tensor]
    batch: dict[str, torch.Tensor]


def hf_view(model, params, batch) -> HFView:
    """What a user passes: the model itself, ``{"input_ids", "labels"}``, no ``loss_fn``."""
    ids = batch[0]
    return HFView(model.lm, to_hf(params), {"input_ids": ids, "labels": ids})


def to_hf(tensors: dict) -> dict:
    """Adapter names (``lm.transformer...``) to the Hugging Face model's own."""
    return {k.removeprefix("lm."): v for k, v in tensors.items()}


def from_hf(tensors: dict) -> dict:
    return {f"lm.{k}": v for k, v in tensors.items()}


def workload(name: str, device: torch.device, seed: int = 0, quick: bool = False):
    """MLP, batch 1000; CNN, 128 CIFAR-sized images (64 quick); causal transformers."""
    torch.manual_seed(seed)
    if name in TRANSFORMERS:
        model, x, y = transformer(name, quick)
        model = model.to(device).eval()
        params = {k: p.detach() for k, p in model.named_parameters()}
        return model, params, (x.to(device), y.to(device))
    if name == "mlp":
        model, x = MLP(), torch.randn(50 if SMOKE else 1000, 1, 28, 28)
    else:
        model, x = cnn(), torch.randn(8 if SMOKE else 64 if quick else 128, 3, 32, 32)
    model = model.to(device).eval()
    y = torch.randint(0, 10, (len(x),))
    params = {k: p.detach() for k, p in model.named_parameters()}
    return model, params, (x.to(device), y.to(device))


def random_vectors(params, k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn((k, *p.shape), generator=gen).to(p.device) for n, p in params.items()}


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


def plain_grad(model, params, batch):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = torch.func.functional_call(model, leaves, (batch[0],))
    return torch.autograd.grad(CE(out, batch[1]), list(leaves.values()))


def double_backward(model, params, batch, vectors):
    """Reverse-over-reverse with ``is_grads_batched`` for k > 1 (vmap over the second backward)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = torch.func.functional_call(model, leaves, (batch[0],))
    grads = torch.autograd.grad(CE(out, batch[1]), list(leaves.values()), create_graph=True)
    k = next(iter(vectors.values())).shape[0]
    v = [vectors[n] for n in leaves]
    if k == 1:
        hv = torch.autograd.grad(grads, list(leaves.values()), [t[0] for t in v])
        return {n: h.unsqueeze(0) for n, h in zip(leaves, hv, strict=True)}
    hv = torch.autograd.grad(grads, list(leaves.values()), v, is_grads_batched=True)
    return dict(zip(leaves, hv, strict=True))


def double_backward_loop(model, params, batch, vectors):
    """Reverse-over-reverse as most hand-written code does it: one backward per vector through
    the retained gradient graph (no ``is_grads_batched``)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = torch.func.functional_call(model, leaves, (batch[0],))
    grads = torch.autograd.grad(CE(out, batch[1]), list(leaves.values()), create_graph=True)
    k = next(iter(vectors.values())).shape[0]
    columns = [
        torch.autograd.grad(
            grads, list(leaves.values()), [vectors[n][j] for n in leaves], retain_graph=j < k - 1
        )
        for j in range(k)
    ]
    return {n: torch.stack([c[i] for c in columns]) for i, n in enumerate(leaves)}


def naive_fused(model, params, batch, vectors):
    """``jvp(grad(f))`` from torch.func, vmapped over the k vectors (k = 1: no vmap)."""
    x, y = batch

    def loss(p):
        return CE(torch.func.functional_call(model, p, (x,)), y)

    def one(v):
        return jvp(grad_and_value(loss), (params,), (v,), has_aux=True)[1]

    k = next(iter(vectors.values())).shape[0]
    if k == 1:
        return {n: t.unsqueeze(0) for n, t in one({n: v[0] for n, v in vectors.items()}).items()}
    return vmap(one)(vectors)


def lossprune_hvp(model, params, batch, vectors, chunk_size=None):
    """lossprune as users call it: a transformer's Hugging Face model itself, a dict batch."""
    if hasattr(model, "lm"):
        view = hf_view(model, params, batch)
        products = curvature.hvp(
            view.model, view.params, view.batch, None, to_hf(vectors), chunk_size=chunk_size
        ).products
        return from_hf(products)
    return curvature.hvp(model, params, batch, CE, vectors, chunk_size=chunk_size).products


def prepared_hvp(model, params, batch, vectors):
    """The public call with its batch checked once beforehand (``curvature.products.prepare``),
    as a loop of products on one batch (Lanczos, conjugate gradients) does: the call without
    the first-batch probe."""
    view = hf_view(model, params, batch)
    loss, ready = curvature.products.prepare(view.model, None, view.batch)
    vectors = to_hf(vectors)
    return lambda: from_hf(curvature.hvp(view.model, view.params, ready, loss, vectors).products)


def adapter_hvp(model, params, batch, vectors):
    """lossprune through the tensor adapter (the interface the other methods need)."""
    return curvature.hvp(model, params, batch, CE, vectors).products


# ---------------------------------------------------------------------------------------------
# Optional baselines (extra ``bench``)
# ---------------------------------------------------------------------------------------------


def curvlinops_methods(model, params, batch, vectors):
    """curvlinops' HessianLinearOperator / GGNLinearOperator applied to the k vectors."""
    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator
    except ImportError:
        return {}
    plist = [p for p in model.parameters()]
    k = next(iter(vectors.values())).shape[0]
    names = list(params)
    mat = torch.cat([vectors[n].reshape(k, -1) for n in names], 1).T.contiguous()
    methods = {}
    for label, cls in (("hessian", HessianLinearOperator), ("ggn", GGNLinearOperator)):
        try:
            op = cls(model, CE, plist, [batch], progressbar=False, check_deterministic=False)
        except TypeError:
            op = cls(model, CE, plist, [batch])

        def apply(op=op):
            return op @ mat

        methods[label] = apply
    return methods


def backpack_fisher(model, batch):
    """BackPACK's DiagGGNExact on the same model and batch, or None when not installed."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact
    except ImportError:
        return None
    import copy

    # BackPACK only extends nn.Sequential containers: both workloads are chains of leaf modules,
    # so the same layers (same parameter order) are handed to it as one Sequential.
    leaves = [m for m in model.modules() if not list(m.children())]
    extended = extend(copy.deepcopy(nn.Sequential(*leaves)))
    loss_fn = extend(nn.CrossEntropyLoss())
    names = [n for n, _ in model.named_parameters()]

    def run():
        extended.zero_grad()
        loss = loss_fn(extended(batch[0]), batch[1])
        with backpack(DiagGGNExact()):
            loss.backward()
        return {n: p.diag_ggn_exact for n, p in zip(names, extended.parameters(), strict=True)}

    return run


# ---------------------------------------------------------------------------------------------
# Timing, checking, memory
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_side_by_side(methods: dict[str, Callable], device, warmup: int, repeats: int):
    """Median seconds of each method; rounds interleave all methods.

    The order rotates by one method per round, so that no method always runs in the same
    position (right after the plain gradient, or after the method that frees the most memory).
    """
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods.items())
    for round_ in range(repeats):
        shift = round_ % len(order)
        for name, fn in order[shift:] + order[:shift]:
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    MINIMA.update({name: min(t) for name, t in times.items()})
    return {name: statistics.median(t) for name, t in times.items()}


def check(result, reference, name, rtol=2e-3, atol=1e-5):
    """Relative error in the norm of all entries; raise when a fast result is wrong.

    ``--smoke``'s tiny float32 models round more, relative to their small numbers: 1e-2.
    """
    rtol = max(rtol, 1e-2) if SMOKE else rtol
    if isinstance(result, dict):
        keys = list(reference)
        result = torch.cat([result[k].reshape(-1) for k in keys])
        reference = torch.cat([reference[k].reshape(-1) for k in keys])
    error = float((result - reference).norm() / reference.norm().clamp_min(1e-30))
    if error > rtol:
        raise AssertionError(f"{name}: relative error {error:.2e} against the reference")
    return error


def cuda_peak_mb(fn, device) -> float:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def child_peak_mb(
    bench: str,
    model: str,
    method: str,
    k: int,
    chunk: int | None,
    timeout: float | None = None,
    memory_limit: int | None = None,
) -> float:
    """Peak RSS growth of one call in a fresh process (CPU has no allocator peak counter).

    ``memory_limit`` (bytes of address space) makes a runaway call fail in the child instead of
    taking the memory of a shared machine.
    """
    args = [sys.executable, __file__, "--child", bench, model, method, str(k), str(chunk or 0)]
    args.append("smoke" if SMOKE else "quick" if QUICK else "full")

    def limit() -> None:
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    out = subprocess.run(
        args, capture_output=True, text=True, check=True, env=os.environ.copy(),
        timeout=timeout, preexec_fn=limit,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def child_main(bench, model_name, method, k, chunk, mode):
    global SMOKE
    SMOKE = mode == "smoke"
    device = torch.device("cpu")
    if bench == "public":
        fn = public_path.public_calls(model_name, device, SMOKE).calls[method]
    else:
        model, params, batch = workload(model_name, device, quick=mode != "full")
        vectors = random_vectors(params, int(k))
        fn = build_call(bench, method, model, params, batch, vectors, int(chunk) or None)
    # No warm-up call: the one measured call is the first (a warm-up would leave freed memory
    # resident in the allocator and hide the next call's peak). What is imported once per
    # process is imported first: the first-batch probe's dispatch mode imports torch._dynamo
    # (817 modules, about 75 MB resident), a one-time cost, not a call's memory. The peak of
    # building the model and the data (imports, initialisation) is forgotten next: Linux resets
    # the high-water mark of the resident set (VmHWM) to the current one when 5 is written to
    # clear_refs.
    importlib.import_module("torch._dynamo")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status_kb("VmRSS")
    fn()
    print((_status_kb("VmHWM") - before) / 1024)


def _status_kb(field: str) -> int:
    """A field of /proc/self/status, in kB (VmRSS: resident now, VmHWM: the peak since reset)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def build_call(bench, method, model, params, batch, vectors, chunk):
    if bench == "grad":
        return lambda: plain_grad(model, params, batch)
    if bench in ("grad_hvp", "hvp_batch", "hvp_memory"):
        if method == "lossprune":
            return lambda: lossprune_hvp(model, params, batch, vectors, chunk)
        if method == "lossprune_adapter":
            return lambda: adapter_hvp(model, params, batch, vectors)
        if method == "double_backward":
            return lambda: double_backward(model, params, batch, vectors)
        if method == "double_backward_loop":
            return lambda: double_backward_loop(model, params, batch, vectors)
        if method == "lossprune_prepared":
            return prepared_hvp(model, params, batch, vectors)
        if method == "torch_func_naive":
            return lambda: naive_fused(model, params, batch, vectors)
        raise ValueError(f"{bench}: no call for method {method!r}")
    if bench == "fisher_diag":
        fast = method == "lossprune"
        return lambda: curvature.fisher_diag(model, params, batch, CE, fast=fast)
    if bench == "fisher_mc":
        if method == "lossprune" and hasattr(model, "lm"):
            return lambda: fisher_mc_hf(hf_view(model, params, batch))
        return lambda: fisher_mc(model, params, batch, fast=method != "torch_func_naive")
    if bench == "statistics":
        # A whole statistics pass of a criterion: loss, gradient and its curvature diagonal.
        requests = _criterion(method).requests()
        return lambda: curvature.compute_statistics(model, params, batch, CE, requests)
    raise ValueError(bench)


def _criterion(name: str):
    from lossprune import QuadraticModel

    if name == "qm_default":
        return QuadraticModel(curvature="fisher")  # the paper's exact Fisher (the old default)
    return QuadraticModel(curvature="fisher_mc")


def fisher_mc(model, params, batch, fast=True, seed=0):
    """One sampled label per token (``samples=1``): the Monte-Carlo Fisher diagonal."""
    gen = torch.Generator(device=batch[0].device).manual_seed(seed)
    return curvature.fisher_diag_mc(model, params, batch, CE, generator=gen, fast=fast)


def fisher_mc_hf(view: HFView, seed=0):
    """The same statistic on the Hugging Face model itself, dict batch, no ``loss_fn``."""
    gen = torch.Generator(device=view.batch["labels"].device).manual_seed(seed)
    return curvature.fisher_diag_mc(view.model, view.params, view.batch, None, generator=gen)


# ---------------------------------------------------------------------------------------------
# Benches
# ---------------------------------------------------------------------------------------------

SECTIONS = ("core", "transformers", "public")


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        # float32 everywhere (cuDNN would use TF32 for convolutions): the checks of every
        # method against double-backward are then meaningful, and all methods run alike.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    quick = args.quick or SMOKE
    warmup, repeats = (0, 1) if SMOKE else (1, 3) if quick else (2, 9)
    sections = args.sections.split(",")
    results: list[dict] = []
    grad_peak: dict[str, float | None] = {}

    def record(bench, model_name, method, k, seconds, grad_seconds, per=1, keys=None, **extra):
        fast, base = keys or (method, "grad")
        peak = extra.pop("peak_mb", None)
        reference_peak = extra.pop("reference_peak_mb", grad_peak.get(model_name))
        row = {
            "bench": bench, "model": model_name, "method": method, "k": k,
            "ratio_to_grad": seconds / per / grad_seconds, "seconds": seconds,
            "ratio_of_minima": MINIMA[fast] / per / MINIMA[base], "peak_mb": peak,
            "peak_ratio": None if peak is None or not reference_peak else peak / reference_peak,
            **extra,
        }  # fmt: skip
        results.append(row)
        print(
            f"{bench:12s} {model_name:4s} {method:18s} k={k:<3d} "
            f"ratio={row['ratio_to_grad']:.3f} (min {row['ratio_of_minima']:.3f}) "
            f"t={seconds * 1e3:.1f}ms"
            + (f" peak={peak:.0f}MB" if peak is not None else "")
            + (f" ({row['peak_ratio']:.2f}x)" if row["peak_ratio"] is not None else ""),
            flush=True,
        )

    def memory(bench, model_name, method, model, params, batch, vectors, k, chunk=None):
        if device.type == "cuda":
            fn = build_call(bench, method, model, params, batch, vectors, chunk)
            return cuda_peak_mb(fn, device)
        if SMOKE or method in ("backpack", "curvlinops"):
            return None
        measured_when_quick = ("grad", "lossprune", "lossprune_adapter", "double_backward_loop")
        if quick and method not in measured_when_quick:
            return None
        return child_peak_mb(bench, model_name, method, k, chunk)

    def timing(methods, warm=None, reps=None):
        return time_side_by_side(
            methods, device, warmup if warm is None else warm, repeats if reps is None else reps
        )

    def reference(model_name, model, params, batch):
        grad_peak[model_name] = memory("grad", model_name, "grad", model, params, batch, None, 0)

    if "core" in sections:
        for model_name in ("mlp", "cnn"):
            model, params, batch = workload(model_name, device, quick=quick)
            reference(model_name, model, params, batch)
            for bench, k in (("grad_hvp", 1), ("hvp_batch", 16)):
                bench_hvp(bench, k, model_name, model, params, batch, record, memory, timing)
            if (model_name == "cnn" or not quick) and not SMOKE:
                for k, chunk in ((16, 4), (64, 4), (16, 16)):
                    bench_memory(k, chunk, model_name, model, params, batch, record, memory, timing)
            bench_fisher(model_name, model, params, batch, record, memory, timing)
            if model_name == "mlp":
                pruner_step(model_name, device, record, quick)
    if "transformers" in sections and transformers_available():
        for model_name in ("transformer", "transformer_llama"):
            model, params, batch = workload(model_name, device, quick=quick)
            reference(model_name, model, params, batch)
            for bench, k in (("grad_hvp", 1), ("hvp_batch", 16)):
                bench_hvp(bench, k, model_name, model, params, batch, record, memory, timing)
            bench_fisher_mc(model_name, model, params, batch, record, memory, timing)
            pruner_step(model_name, device, record, quick, fisher="fisher_mc")
        if device.type == "cpu" and not SMOKE:
            statistics_memory(results)
    if "public" in sections and transformers_available():
        for model_name in public_path.SIZES:
            bench_public(model_name, device, record, timing)
    return {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "quick": quick,
        "smoke": SMOKE,
        "sections": sections,
        "load_average": os.getloadavg(),
        "results": results,
    }


def bench_hvp(bench, k, model_name, model, params, batch, record, memory, timing):
    """Gradient + k HVPs: correctness against double-backward, then interleaved timing.

    For a transformer, ``lossprune`` is the Hugging Face model itself with a dict batch and no
    ``loss_fn``; ``lossprune_adapter`` the same library call through the tensor adapter.
    """
    vectors = random_vectors(params, k)
    reference = double_backward(model, params, batch, vectors)
    methods = {
        "grad": lambda: plain_grad(model, params, batch),
        "lossprune": lambda: lossprune_hvp(model, params, batch, vectors),
        "double_backward": lambda: double_backward(model, params, batch, vectors),
        "torch_func_naive": lambda: naive_fused(model, params, batch, vectors),
    }
    if k > 1:  # for one vector it is double_backward
        methods["double_backward_loop"] = lambda: double_backward_loop(
            model, params, batch, vectors
        )
    if hasattr(model, "lm"):
        methods["lossprune_adapter"] = lambda: adapter_hvp(model, params, batch, vectors)
        methods["lossprune_prepared"] = prepared_hvp(model, params, batch, vectors)
    for name in [m for m in methods if m not in ("grad", "double_backward")]:
        check(methods[name](), reference, f"{bench}/{model_name}/{name}")
    for label, fn in curvlinops_methods(model, params, batch, vectors).items():
        try:
            result = fn()
        except (RuntimeError, NotImplementedError) as error:  # e.g. no forward-mode rule
            print(f"{bench:12s} {model_name} curvlinops {label}: fails ({error})"[:200])
            continue
        if label == "hessian":
            flat = torch.cat([reference[n].reshape(k, -1) for n in params], 1).T
            check(result, flat, f"{bench}/{model_name}/curvlinops")
        methods[f"curvlinops_{label}"] = fn
    times = timing(methods)
    for name, seconds in times.items():
        if name == "grad":
            continue
        method = "curvlinops" if name.startswith("curvlinops") else name
        curv = "ggn" if name.endswith("ggn") else "hessian"
        peak = memory(bench, model_name, method, model, params, batch, vectors, k)
        record(
            bench, model_name, method, k, seconds, times["grad"], per=k, keys=(name, "grad"),
            peak_mb=peak, curvature=curv, examples=len(batch[0]),
        )  # fmt: skip


def bench_memory(k, chunk, model_name, model, params, batch, record, memory, timing):
    """Peak memory of k HVPs does not grow with k (on a GPU: with ``chunk_size``, not with k)."""
    vectors = random_vectors(params, k)
    peak = memory("hvp_memory", model_name, "lossprune", model, params, batch, vectors, k, chunk)
    seconds = timing(
        {
            "grad": lambda: plain_grad(model, params, batch),
            "lp": lambda: lossprune_hvp(model, params, batch, vectors, chunk),
        },
        0, 1,  # this bench is about memory; hvp_batch measures the time of k products
    )  # fmt: skip
    record(
        "hvp_memory", model_name, "lossprune", k, seconds["lp"], seconds["grad"], per=k,
        keys=("lp", "grad"),
        peak_mb=peak, chunk_size=chunk, examples=len(batch[0]),
    )  # fmt: skip


def bench_fisher(model_name, model, params, batch, record, memory, timing):
    """Exact Fisher diagonal over C = 10 classes; the generic path on a tenth of the batch."""
    fisher = curvature.fisher_diag(model, params, batch, CE)
    sub = (batch[0][: max(2, len(batch[0]) // 10)], batch[1][: max(2, len(batch[1]) // 10)])
    check(
        curvature.fisher_diag(model, params, sub, CE),
        curvature.fisher_diag(model, params, sub, CE, fast=False),
        f"fisher/{model_name}",
    )
    methods = {
        "grad": lambda: plain_grad(model, params, batch),
        "lossprune": lambda: curvature.fisher_diag(model, params, batch, CE),
    }
    bp = backpack_fisher(model, batch)
    if bp is not None:
        check(bp(), fisher, f"fisher/{model_name}/backpack")
        methods["backpack"] = bp
    times = timing(methods)
    for name in ("lossprune", "backpack"):
        if name in times:
            peak = memory("fisher_diag", model_name, name, model, params, batch, None, 0)
            record("fisher_diag", model_name, name, 10, times[name], times["grad"],
                   peak_mb=peak, examples=len(batch[0]))  # fmt: skip
    times = timing(
        {
            "grad": lambda: plain_grad(model, params, sub),
            "naive": lambda: curvature.fisher_diag(model, params, sub, CE, fast=False),
        },
        0, 1,
    )  # fmt: skip
    record("fisher_diag", model_name, "torch_func_naive", 10, times["naive"], times["grad"],
           keys=("naive", "grad"),
           examples=len(sub[0]))  # fmt: skip


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformer workloads skipped: transformers is not installed")
        return False
    return True


def bench_fisher_mc(model_name, model, params, batch, record, memory, timing):
    """Monte-Carlo Fisher diagonal, one sampled label per token (target: <= 4 gradients).

    ``lossprune``: the Hugging Face model with a dict batch: its linear maps from one batched
    pass, checked on the batch, the embeddings and norms one example at a time (float64 checks
    against per-example loops in ``tests/test_per_example.py`` and
    ``tests/test_keyword_layers.py``); ``lossprune_adapter``: through the tensor adapter, checked
    against the generic per-example path with the SAME sampled labels (same seed), which is
    also the naive method timed beside it, on a quarter of the batch.
    """
    sub = (batch[0][: max(1, len(batch[0]) // 4)], batch[1][: max(1, len(batch[1]) // 4)])
    check(
        fisher_mc(model, params, sub), fisher_mc(model, params, sub, fast=False),
        f"fisher_mc/{model_name}",
    )  # fmt: skip
    view = hf_view(model, params, batch)
    times = timing(
        {
            "grad": lambda: plain_grad(model, params, batch),
            "lossprune": lambda: fisher_mc_hf(view),
            "lossprune_adapter": lambda: fisher_mc(model, params, batch),
        }
    )
    for method in ("lossprune", "lossprune_adapter"):
        peak = memory("fisher_mc", model_name, method, model, params, batch, None, 1)
        record("fisher_mc", model_name, method, 1, times[method], times["grad"], peak_mb=peak,
               examples=len(batch[0]), tokens=batch[1].numel())  # fmt: skip
    times = timing(
        {
            "grad": lambda: plain_grad(model, params, sub),
            "naive": lambda: fisher_mc(model, params, sub, fast=False),
        },
        0, 1,
    )  # fmt: skip
    record("fisher_mc", model_name, "torch_func_naive", 1, times["naive"], times["grad"],
           keys=("naive", "grad"), examples=len(sub[0]), tokens=sub[1].numel())  # fmt: skip


def bench_public(model_name, device, record, timing):
    """The public API on Hugging Face models (:mod:`public_path`), ratios to a forward+backward.

    Time: interleaved rounds with the forward+backward; memory: each call's peak over the
    forward+backward's (one fresh child process each on CPU).
    """
    public = public_path.public_calls(model_name, device, SMOKE)
    times = timing(public.calls)
    peaks: dict[str, float | None] = {}
    for method, fn in public.calls.items():
        if device.type == "cuda":
            peaks[method] = cuda_peak_mb(fn, device)
        elif not SMOKE and not method.endswith("_no_diagnostics"):
            peaks[method] = child_peak_mb("public", model_name, method, 0, None)
    base = "forward_backward"
    for method, seconds in times.items():
        if method == base:
            continue
        record(
            "public", model_name, method, 0, seconds, times[base], per=public.batches,
            keys=(method, base), peak_mb=peaks.get(method), reference_peak_mb=peaks.get(base),
            relative_to="forward+backward per batch", parameters=public.parameters,
        )  # fmt: skip


STATISTICS_TIMEOUT = 300  # seconds for one statistics pass of the 25M-parameter model
STATISTICS_MEMORY_LIMIT = 24 * 2**30  # bytes of address space of that child process


def statistics_memory(results: list[dict]) -> None:
    """Peak RSS growth of one statistics pass on the ~25M-parameter transformer (child process).

    QM with the Monte-Carlo Fisher (one sampled label per token), and the exact Fisher (the
    paper's, the old default): on an 8192-way softmax over 127 coupled tokens it needs T·V
    backward columns per sequence, so it is recorded with its error where it does not finish
    within the time and address-space limits.
    """
    parameters = sum(p.numel() for p in workload("transformer25m", torch.device("cpu"))[1].values())
    # The exact Fisher does not finish (it is recorded as such in full runs only).
    for method in ("qm_fisher_mc",) if QUICK else ("qm_fisher_mc", "qm_default"):
        start = time.perf_counter()
        peak, error = None, None
        try:
            peak = child_peak_mb(
                "statistics", "transformer25m", method, 0, None,
                timeout=STATISTICS_TIMEOUT, memory_limit=STATISTICS_MEMORY_LIMIT,
            )  # fmt: skip
        except subprocess.CalledProcessError as failure:
            lines = (failure.stderr or "").strip().splitlines()
            error = lines[-1][:300] if lines else f"exit status {failure.returncode}"
        except subprocess.TimeoutExpired:
            error = f"did not finish in {STATISTICS_TIMEOUT} s"
        seconds = time.perf_counter() - start
        results.append(
            {
                "bench": "statistics_memory", "model": "transformer25m", "method": method,
                "k": 0, "peak_mb": peak, "seconds": seconds, "parameters": parameters,
                "examples": TRANSFORMERS["transformer25m"][7],
                "tokens": TRANSFORMERS["transformer25m"][6], "error": error,
            }
        )  # fmt: skip
        print(
            f"statistics   transformer25m {method:14s} {parameters / 1e6:.1f}M parameters "
            f"peak={peak if peak is None else round(peak)} MB t={seconds:.0f}s {error or ''}",
            flush=True,
        )


def pruner_step(model_name, device, record, quick, fisher="fisher"):
    """One QM stage of the Pruner against its statistics pass alone (target: <= 1.25x).

    A transformer's pruner and statistics pass take the Hugging Face model with a dict batch.
    """
    from lossprune import ExponentialSchedule, Pruner, QuadraticModel
    from lossprune.selection import prunable_parameters

    model, params, batch = workload(model_name, device, quick=quick)
    loss_fn = CE
    if hasattr(model, "lm"):
        view = hf_view(model, params, batch)
        model, batch, loss_fn = view.model, view.batch, None
    prunable = {k: p.detach() for k, p in prunable_parameters(model).items()}
    requests = QuadraticModel(curvature=fisher).requests()
    generator = torch.Generator(device=device).manual_seed(0)

    def stats():
        return curvature.compute_statistics(
            model, prunable, batch, loss_fn, requests, generator=generator
        )

    rounds = 1 if SMOKE else 3 if quick else 7
    for diagnostics in (False, True):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        pruner = Pruner(
            model, QuadraticModel(lam=1e-3, curvature=fisher),
            ExponentialSchedule(0.9, rounds + 2), loss_fn=loss_fn, data=batch,
            diagnostics=diagnostics, generator=0,
        )  # fmt: skip
        pruner.step()  # warm-up
        times = time_side_by_side({"stats": stats, "step": pruner.step}, device, 0, rounds)
        model.load_state_dict(state)
        record("pruner_step", model_name, "lossprune", 0, times["step"], times["stats"],
               keys=("step", "stats"),
               relative_to="statistics pass", diagnostics=diagnostics)  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        child_main(*sys.argv[2:8])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: it runs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}"
    )
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; expected some of {SECTIONS}")
    global QUICK, SMOKE
    QUICK, SMOKE = args.quick, args.smoke
    start = time.perf_counter()
    report = run(args)
    report["wall_seconds"] = time.perf_counter() - start
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out} ({report['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
