"""Calling a module as a pure function of a subset of its parameters.

Every curvature routine differentiates the loss with respect to a dict of tensors keyed by
qualified parameter names. The module's other parameters and its buffers are held fixed; buffers
are cloned so that nothing the functional call does (e.g. batch-norm running statistics) can leak
into the user's model.

Every call runs under the math kernel of :func:`~torch.nn.functional.scaled_dot_product_attention`
and without the fused fast path of :class:`~torch.nn.MultiheadAttention`
(:func:`math_attention`): the fused kernels PyTorch picks by default (flash, memory-efficient,
the transformer fast path) lack second or forward-mode derivatives, so Hessian-vector products,
Gauss-Newton products and Fisher diagonals of a transformer would fail. The math kernel computes
the same attention with ordinary differentiable operations; the previous kernel choice is
restored when the call returns.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from .batches import ModelInputs

_T = TypeVar("_T")

__all__ = [
    "FunctionalModel",
    "at_least_float32",
    "check_deterministic",
    "default_generator_states",
    "math_attention",
    "no_random_draws",
    "refuse_random_draws",
    "statistics_dtype",
]


@contextmanager
def math_attention() -> Iterator[None]:
    """Attention by differentiable operations inside; the previous settings restored.

    Scaled dot-product attention runs its math kernel, and the fused C++ fast path of
    :class:`~torch.nn.MultiheadAttention` / :class:`~torch.nn.TransformerEncoderLayer` (taken
    in eval mode when no parameter requires a gradient, as under :func:`torch.func.jvp`, and
    without forward-mode derivatives) is switched off.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class FunctionalModel:
    """``model`` as a pure function ``(params, inputs) -> outputs``.

    Args:
        model: the module; it is never modified.
        names: qualified names of the parameters passed explicitly at call time; every other
            parameter is detached and every buffer cloned once, here.
    """

    def __init__(self, model: nn.Module, names: Mapping[str, object] | list[str]) -> None:
        self.model = model
        explicit = set(names)
        # remove_duplicate=True: a tied parameter appears once; functional_call ties it back.
        named = dict(model.named_parameters())
        unknown = explicit - named.keys()
        if unknown:
            raise ValueError(
                f"params has names that are not parameters of the model: {sorted(unknown)}"
            )
        self.constants: dict[str, Tensor] = {
            k: v.detach() for k, v in named.items() if k not in explicit
        }
        self.constants.update({k: b.detach().clone() for k, b in model.named_buffers()})

    def __call__(self, params: Mapping[str, Tensor], inputs: Tensor | ModelInputs) -> Any:
        """The outputs at ``params``.

        ``model(inputs)``, or for :class:`ModelInputs` what its ``read`` takes from
        ``model(*args, **kwargs)``.
        """
        tensors = {**self.constants, **params}
        with math_attention():
            if not isinstance(inputs, ModelInputs):
                return functional_call(self.model, tensors, (inputs,))
            outputs = functional_call(self.model, tensors, inputs.args, inputs.kwargs)
        return outputs if inputs.read is None else inputs.read(outputs)

    def single(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Output for ONE example ``x`` (no batch dimension); used under ``vmap``."""
        return self(params, x.unsqueeze(0)).squeeze(0)

    def loss_fn_of(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor]
    ) -> Callable[[Mapping[str, Tensor], Tensor, Tensor], Tensor]:
        """``(params, inputs, targets) -> loss`` for a batch."""

        def batch_loss(params: Mapping[str, Tensor], inputs: Any, targets: Tensor) -> Tensor:
            return loss_fn(self(params, inputs), targets)

        return batch_loss


# AlphaDropout and FeatureAlphaDropout derive from _DropoutNd too.
_DROPOUT = (nn.modules.dropout._DropoutNd,)


def check_deterministic(model: nn.Module) -> None:
    """Refuse models whose forward pass is random or updates state.

    Scores must be computed at fixed weights with a deterministic function of them (Laurent et al.
    2020 score in eval mode). Batch norm in training mode normalises with batch statistics and
    dropout samples masks, so curvature computed that way is silently not the curvature of the
    model that gets pruned.

    Raises:
        ValueError: naming the first offending module.
    """
    for name, module in model.named_modules():
        batch_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if batch_norm and (module.running_mean is None or not module.track_running_stats):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) has track_running_stats=False: it "
                "normalises with the statistics of each batch even in eval mode, so every "
                "example's output depends on the others and no per-example curvature exists. "
                "Use running statistics (track_running_stats=True) or another normalisation."
            )
        if not module.training:
            continue
        if batch_norm:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) is in training mode: its batch "
                "statistics would change the scores and its running statistics would be "
                "updated. Call model.eval() before scoring (or pass eval_mode=True to Pruner)."
            )
        if isinstance(module, _DROPOUT) and getattr(module, "p", 0.0) > 0:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) is in training mode and drops units "
                "at random, so the scores would be random. Call model.eval() before scoring "
                "(or pass eval_mode=True to Pruner)."
            )


class _RandomDraws(TorchDispatchMode):
    """Records the operators that draw from a random generator, and the module running each.

    Every ATen operator that consumes random numbers carries ``torch.Tag.nondeterministic_seeded``
    (``bernoulli_`` behind every dropout, ``rand``, ``randn_like``, the fused attention kernels);
    one told to draw nothing (``dropout_p=0``, ``train=False``) is not counted. The module is
    found only when something drew (:meth:`_innermost_module`), so a pass that draws nothing pays
    for the dispatch alone, not for hooks on every module.
    """

    def __init__(self, names: Mapping[int, str]) -> None:
        super().__init__()
        self.names = names  # id(module) -> qualified name, for the model's modules
        self.draws: list[tuple[str, str]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags and _draws(func, args, kwargs):
            self.draws.append((str(func), "" if self.draws else self._innermost_module()))
        return func(*args, **kwargs)

    def _innermost_module(self) -> str:
        """The innermost of the model's modules with a method on the Python stack.

        That is the module whose forward runs (or a helper its forward called): the ``self`` of
        the innermost frame that has one of the model's modules as ``self``.
        """
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if owner is not None and id(owner) in self.names:
                return self.names[id(owner)]
            frame = frame.f_back
        return ""


def _draws(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    for index, argument in enumerate(func._schema.arguments):
        default = argument.default_value if argument.has_default_value() else None
        value = args[index] if index < len(args) else kwargs.get(argument.name, default)
        if (argument.name == "dropout_p" and value == 0) or (
            argument.name == "train" and value is False
        ):
            return False
    return True


@contextmanager
def no_random_draws(model: nn.Module) -> Iterator[None]:
    """Run a forward pass of ``model`` inside; raise if it drew random numbers.

    :func:`check_deterministic` sees dropout modules; this sees every random draw, also dropout
    written as a function call (``nn.functional.dropout(x, p, training=self.training)``, the
    ``dropout_p`` of attention, as in OPT or Llama with ``attention_dropout``), by watching the
    operators the pass runs.

    Raises:
        ValueError: naming the innermost module that drew, after the block.
    """
    recorder = _RandomDraws({id(module): name for name, module in model.named_modules()})
    with recorder:
        yield
    if recorder.draws:
        op, name = recorder.draws[0]
        where = f"module {name!r} ({type(model.get_submodule(name)).__name__})" if name else "it"
        fix = (
            "Call model.eval() before scoring (or pass eval_mode=True to Pruner)"
            if any(m.training for m in model.modules())
            else "Make its forward pass deterministic"
        )
        raise ValueError(
            f"the model's forward pass draws random numbers ({op} in {where}, e.g. dropout "
            "written as nn.functional.dropout(..., training=self.training) or attention "
            f"dropout), so the scores would be random. {fix}."
        )


def at_least_float32(outputs: Any) -> Any:
    """Every floating-point tensor of ``outputs`` (a tensor or a pytree) in float32 or better.

    A loss of half-precision outputs is then computed with float32 arithmetic: a bfloat16 mean
    of thousands of token losses keeps about two significant digits.
    """

    def promote(leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            return leaf.to(torch.promote_types(leaf.dtype, torch.float32))
        return leaf

    return tree_map(promote, outputs)


def statistics_dtype(params: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype statistics are accumulated in: at least float32 (half types are too coarse)."""
    dtype = next(iter(params.values())).dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def default_generator_states(model: nn.Module) -> list[Tensor] | None:
    """The states of the random generators a forward pass of ``model`` can draw from.

    Those are the default generators, the CPU's and that of each CUDA device the model is on,
    unless a module holds a :class:`torch.Generator` of its own or the model lives on another
    kind of device: then ``None``, and only :func:`no_random_draws` sees every draw. Unchanged
    states around a pass mean it drew nothing, at the cost of a copy of a few kilobytes instead
    of a Python call for every operator (a third of a gradient on a small GPT-2).
    """
    if any(isinstance(v, torch.Generator) for m in model.modules() for v in vars(m).values()):
        return None
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if any(device.type not in ("cpu", "cuda") for device in devices):
        return None
    # Only the CUDA devices the model is on: another device's generator would start its context.
    cuda = sorted(
        torch.cuda.current_device() if d.index is None else d.index
        for d in devices
        if d.type == "cuda"
    )  # fmt: skip
    return [torch.default_generator.get_state()] + [
        torch.cuda.default_generators[index].get_state() for index in cuda
    ]


def refuse_random_draws(
    model: nn.Module, run: Callable[[], _T], rerun: Callable[[], object] | None = None
) -> _T:
    """``run()``, a forward pass of ``model``, refused if it drew a random number.

    Where :func:`default_generator_states` sees every draw, they are compared around the pass;
    only if they changed does ``rerun()`` (default: ``run()`` again; a smaller pass that draws
    the same way) run under :func:`no_random_draws`, which names the module. Otherwise the pass
    itself runs under :func:`no_random_draws`.

    Raises:
        ValueError: the pass drew (naming the module where the rerun finds it).
    """
    before = default_generator_states(model)
    if before is None:
        with no_random_draws(model):
            return run()
    result = run()
    after = default_generator_states(model)
    if after is not None and all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
        return result
    with no_random_draws(model):
        (rerun or run)()
    raise ValueError(
        "the model's forward pass draws random numbers (the default random generator advanced "
        "during the pass), so the scores would be random. Call model.eval() before scoring, "
        "or make its forward pass deterministic."
    )
