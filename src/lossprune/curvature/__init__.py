r"""Curvature core: gradients, curvature-vector products and curvature diagonals.

Layer 2 of docs/architecture.md. Pure functions of a model called functionally
(:func:`torch.func.functional_call`) at a dict ``params`` of tensors keyed by qualified parameter
name; derivatives are taken with respect to ``params`` only, every other parameter and buffer of
the model is held fixed (buffers are cloned, never mutated).

Conventions: ``loss_fn(outputs, targets)`` is a MEAN over the units it averages (examples for a
classifier; every position of ``(N, C, d1, ...)`` logits; the non-ignored targets, weighted by
their class weights, for cross-entropy with ``ignore_index`` or ``weight``). Every statistic is
the one of exactly that loss :math:`L`. With :math:`J_n` the Jacobian of the outputs of example
:math:`n` and :math:`M_n = S_n S_n^\top` the output-space curvature of :math:`L`
(:mod:`lossprune.curvature.outputs`):

* gradient :math:`g = \nabla L`;
* Hessian-vector products :math:`Hv` (Pearlmutter 1994);
* GGN-vector products :math:`Gv`, :math:`G = \sum_n J_n^\top M_n J_n` (Schraudolph 2002);
* the exact GGN/Fisher diagonal :math:`\operatorname{diag}G = \sum_n\sum_r (J_n^\top S_n e_r)^2`;
  for softmax cross-entropy :math:`S_n e_c = \sqrt{p_{nc}/N}(e_c - p_n)`, which gives the Fisher
  of Laurent et al. (2020, Sec. 3): :math:`D_q = \frac1N \sum_n \sum_c p_{nc} (\partial \log
  p_c(x_n) / \partial\theta_q)^2`;
* its Monte-Carlo estimate from labels sampled from the model (Martens 2014);
* Hutchinson's estimate of the Hessian diagonal :math:`\mathbb E_z[z \odot Hz]` with Rademacher
  probes :math:`z` (Bekas et al. 2007).

:func:`compute_statistics` evaluates any set of these over many batches in one pass, as means
over all the units of the data (all-reduced across ranks when :mod:`torch.distributed` is
initialised).

Its parts, one module each: :mod:`~lossprune.curvature.outputs` (output-space closed forms),
:mod:`~lossprune.curvature.products` (gradient and curvature-vector products, the choice of
algorithm), :mod:`~lossprune.curvature.quadratic_form` (loss, slope and curvature along one
direction), :mod:`~lossprune.curvature.diagonals` with :mod:`~lossprune.curvature.per_example` (one
example at a time where vmap cannot batch them), :mod:`~lossprune.curvature.statistics` (the
dataset-mean loop), :mod:`~lossprune.curvature.layers` (the table of per-layer rules) with the
two fast paths that read it, :mod:`~lossprune.curvature.chain` and
:mod:`~lossprune.curvature.contractions`, and :mod:`~lossprune.curvature.layout` (the proof that
a layer's input is laid out per example).

It imports :mod:`lossprune._common` only: it knows nothing of criteria, masks or pruners.
"""

from .diagonals import fisher_diag, fisher_diag_mc, hutchinson_diag
from .errors import NonFiniteError
from .outputs import LossFn as LossFn  # the loss type of the modules above this package
from .outputs import output_hessian_sqrt
from .products import ggn_vp, hvp, loss_and_grad
from .statistics import Statistic, Statistics, compute_statistics

__all__ = [
    "Statistic",
    "Statistics",
    "NonFiniteError",
    "compute_statistics",
    "loss_and_grad",
    "hvp",
    "ggn_vp",
    "fisher_diag",
    "fisher_diag_mc",
    "hutchinson_diag",
    "output_hessian_sqrt",
]
