"""Layer problems for the solver tests, and the brute-force references they are checked against.

- :func:`random_problem`: inputs with correlated features (a random mixing of a few latent
  factors plus noise, as real activations), optionally fewer tokens than inputs (rank-deficient
  Gram matrix) or dead inputs (always zero).
- :func:`digits_problems`: REAL layers: the inputs of each Linear of a small MLP trained on
  scikit-learn's digits (pixels, some of them always zero; ReLU activations, some dead).
- :func:`lstsq_refit`: the constrained least squares solved densely by ``numpy.linalg.lstsq``,
  one row at a time (no lossprune code).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor, nn

from lossprune.layerwise.solvers import LayerProblem

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_inputs(
    inputs: int, tokens: int, *, seed: int = 0, dead: int = 0, dtype=torch.float64
) -> Tensor:
    """(inputs, tokens): a few latent factors mixed, plus noise; ``dead`` inputs always zero."""
    generator = torch.Generator().manual_seed(seed)
    factors = max(2, inputs // 3)
    mixing = torch.randn(inputs, factors, generator=generator, dtype=dtype)
    scales = torch.logspace(0, 1, inputs, dtype=dtype)[:, None]  # features of unequal size
    x = scales * (mixing @ torch.randn(factors, tokens, generator=generator, dtype=dtype))
    x += 0.1 * torch.randn(inputs, tokens, generator=generator, dtype=dtype)
    x[inputs - dead :] = 0
    return x


def random_problem(
    out: int = 7, inputs: int = 12, tokens: int = 64, *, seed: int = 0, dead: int = 0,
    dtype=torch.float64, device="cpu",
) -> tuple[LayerProblem, Tensor]:  # fmt: skip
    """A problem with everything kept, and its inputs X (in, tokens)."""
    generator = torch.Generator().manual_seed(seed + 1)
    x = random_inputs(inputs, tokens, seed=seed, dead=dead, dtype=dtype)
    reference = torch.randn(out, inputs, generator=generator, dtype=dtype)
    gram = x @ x.T / tokens
    kept = torch.ones(out, inputs, dtype=torch.bool)
    return LayerProblem(reference.to(device), gram.to(device), kept.to(device)), x


def random_mask(problem: LayerProblem, density: float, *, seed: int = 0) -> Tensor:
    """A random subset of ``problem.kept`` with about ``density`` of it, one row all pruned and
    one row all kept."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(problem.kept.shape, generator=generator) < density
    mask[0] = False
    if mask.shape[0] > 1:
        mask[1] = True
    return mask.to(problem.kept.device) & problem.kept


@functools.cache
def _digits_mlp() -> tuple[nn.Module, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):  # 97% training accuracy: weights shaped by the data, in a second
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.double(), x.double()


def digits_problems() -> list[LayerProblem]:
    """The (W0, G) of each Linear of a digits MLP on the whole data set (float64, real)."""
    model, x = _digits_mlp()
    problems = []
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                gram = x.T @ x / x.shape[0]
                weight = module.weight.detach().clone()
                problems.append(
                    LayerProblem(weight, gram, torch.ones_like(weight, dtype=torch.bool))
                )
            x = module(x)
    return problems


def lstsq_refit(problem: LayerProblem, mask: Tensor, delta: float) -> Tensor:
    """argmin over w (w_P = 0) of (w0 - w)^T G (w0 - w) + delta ||w0 - w||^2, row by row, as a
    dense least-squares problem on the stacked design [R; sqrt(delta) I] with R^T R = G (numpy's
    eigendecomposition)."""
    gram = problem.gram.double().cpu().numpy()
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    root = np.sqrt(np.clip(values, 0, None))[:, None] * vectors.T
    design = np.vstack([root, np.sqrt(delta) * np.eye(gram.shape[0])])
    reference = problem.reference.double().cpu().numpy()
    keep = mask.cpu().numpy()
    out = np.zeros_like(reference)
    for row in range(reference.shape[0]):
        kept = keep[row]
        if kept.any():
            target = design @ reference[row]
            out[row, kept] = np.linalg.lstsq(design[:, kept], target, rcond=None)[0]
    return torch.from_numpy(out)
