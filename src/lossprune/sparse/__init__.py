r"""Sparse export of pruned models, and measured (never assumed) speed (layer 6 of the tree).

A pruned weight full of zeros is as slow as a dense one until its zeros are skipped. This package
turns the pruned linear layers of a model into layers that skip them, and measures whether that
pays off on the machine at hand:

- :func:`to_sparse` (CPU and CUDA): each pruned :class:`torch.nn.Linear` (and Hugging Face
  ``Conv1D``) becomes a :class:`SparseLinear` holding a ``torch.sparse_csr`` or
  ``torch.sparse_bsr`` weight. Unstructured sparsity pays off on a CPU only when it is high
  (for a 4096 × 4096 layer at batch 128 on 2 cores this project measured the break-even between
  80 and 85 %, and 2.4× at 95 %; see ``benchmarks/README.md``).
- :func:`to_semi_structured` (CUDA, float16/bfloat16, Ampere or newer): 2:4-sparse weights
  become :func:`torch.sparse.to_sparse_semi_structured` tensors, which sparse tensor cores
  multiply at up to twice the dense rate (Mishra et al., arXiv:2104.08378; PyTorch measured
  1.1-1.4× on large fp16 layers).
- :func:`speed_report` times dense against each sparse form, layer by layer, after checking
  that they compute the same numbers, and says where sparsity pays off.
- :func:`nm_mask` and :func:`is_nm` make and check N:M masks (e.g. the 2:4 that
  :func:`to_semi_structured` needs).

Both converters return a converted copy and leave the model they are given untouched. They read
the pattern from the weights' exact zeros, which is where :class:`~lossprune.Pruner` puts its
masks. The converted layers are for inference: their weights do not train.

Modules: :mod:`~lossprune.sparse.export` (the converters), ``_linear`` (the
:class:`SparseLinear` layer and which modules may become one), ``_semi_structured`` (what
:func:`torch.sparse.to_sparse_semi_structured` needs), ``_timing`` (:func:`speed_report`). It
imports the selection layer (N:M masks) and the bottom package, nothing above.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lossprune.sparse import to_sparse
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    >>> with torch.no_grad():
    ...     _ = model[0].weight.masked_fill_(torch.rand(8, 8) < 0.9, 0.0)
    >>> sparse = to_sparse(model, "csr")
    >>> sparse[0]
    SparseLinear(in_features=8, out_features=8, bias=True, layout=torch.sparse_csr, stored=...)
    >>> x = torch.randn(4, 8, dtype=torch.float64)
    >>> torch.allclose(sparse(x), model(x), rtol=0, atol=1e-12)
    True
"""

from ..selection import is_nm, nm_mask
from ._linear import SparseLinear
from ._timing import FormTiming, LayerTiming, SpeedReport, speed_report
from .export import to_semi_structured, to_sparse

__all__ = [
    "to_sparse",
    "to_semi_structured",
    "speed_report",
    "SparseLinear",
    "SpeedReport",
    "LayerTiming",
    "FormTiming",
    "nm_mask",
    "is_nm",
]
