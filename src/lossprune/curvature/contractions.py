r"""Exact Gauss-Newton diagonals of rule-covered layers without per-example gradients.

For a layer :math:`z = W a + b` inside the model, the pull-back of an output cotangent
:math:`c` to the weight of example :math:`n` is :math:`\delta_n a_n^\top` (summed over positions
for a convolution or a Linear applied to a sequence), with :math:`\delta = \partial
(c^\top f)/\partial z`. The GGN diagonal of Dangel et al. (2020, "BackPACK: packing more into
backprop", ICLR, DiagGGN) is therefore :math:`\sum_n \sum_r (\delta_{nr} a_n^\top)^{\odot 2}`,
the squared contraction of the layer's rule (:mod:`.layers`). The ``R`` output cotangent
columns are back-propagated from the model's outputs to the layer outputs captured by forward
hooks (one backward pass per column on a CPU, one batched pass on a GPU:
:func:`_batched_output_grads`); the weight gradients of that pass are never formed.

A layer is covered only when the result is the per-example definition: its rule is eligible
(:func:`~.layers.rule_for`), no hook is registered anywhere in the model, it is called exactly
once, its parameters are used by no other operation of the graph (counted on the autograd graph),
its input and output are not modified in place afterwards, and its input rows are its examples:

* one tensor of inputs: the layer's input and the model's output are proven per-example on the
  traced graph (:func:`~.layout.proven_layers`);
* keyword inputs (a Hugging Face model, which does not trace): the model's output has the
  batch's examples in dim 0, the layer's input and output have them too, or ``k`` consecutive
  rows each (tokens flattened to ``(N·T, D)``, as a mixture of experts routes them: a Linear
  then sums over its ``k`` rows like over positions), and the LAST example of the batch run
  alone gives the same outputs and the same inputs at every covered module as its rows of the
  batch (to rounding: :func:`~.alone_check.alone_matches`), on every batch. That is what the
  slow twin computes (one example at a time, :mod:`.per_example`); it catches what couples
  examples (batch statistics, capacity-limited expert routing that drops the last tokens of a
  batch, a sequence-first layout), at the cost of one example's forward pass without a graph.

With keyword inputs, modules without a rule that own a differentiated parameter (norms,
embedding tables, heads tied to them, routers, fused experts called with their routing) are
recorded in the same pass and get their squared per-example gradients from
:mod:`.module_grads`: each example's rows pulled back through that module's own call, with the
outputs the rest of the model reads (:func:`_outputs_read_outside`). A table called on a
``(1, T)`` tensor that the model broadcasts over the batch (GPT-2's and BERT's positions) has
its output expanded to the batch's examples in that pass, so that each example's cotangent
reaches it (:mod:`.broadcast_tables`: kept only when every use of the expanded output is
elementwise with the examples' rows). Every other parameter is left to the caller's generic
per-example path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._common.batches import ModelInputs
from .._common.functional import FunctionalModel
from . import alone_check, broadcast_tables
from .layers import (
    HFConv1DRule,
    LayerRule,
    LinearRule,
    fast_paths_allowed,
    parameter_uses,
    rule_for,
)
from .layout import proven_layers
from .module_grads import (
    CallInputs,
    ModuleCall,
    consumers,
    holders_of,
    leaf_edges,
    reaches_only_through,
    sequence_now,
    squared_module_grads,
)

__all__ = ["LayerDiagonal", "layer_ggn_diag"]

Params = dict[str, Tensor]

# Bound on the back-propagated layer-output gradients that exist at once (columns x entries).
_COLUMN_ELEMENTS = 1 << 26


class LayerDiagonal(NamedTuple):
    """The detached model outputs and the squared sums of the covered parameters only.

    ``loss`` and ``grad`` (of every differentiated parameter): the batch loss and its gradient
    from the same forward pass, when :func:`layer_ggn_diag` was given the loss; else ``None``.
    """

    outputs: Any
    sums: Params
    loss: Tensor | None = None
    grad: Params | None = None


def _candidates(model: nn.Module, params: Mapping[str, Tensor], inputs: Any, keyword: bool):
    """Eligible parametric rules whose module owns a differentiated parameter, by module name.

    A model called on one tensor of inputs keeps the layers with a layout proof
    (:mod:`.layout`); with ``keyword``, a model called on :class:`ModelInputs` keeps every
    eligible layer, each checked on the batch after the forward pass (module docstring).
    """
    if isinstance(inputs, ModelInputs):
        if not keyword:
            return {}
    elif not isinstance(inputs, Tensor):
        return {}
    if not fast_paths_allowed(model):
        return {}
    uses = parameter_uses(model)
    proven = None
    found: dict[str, LayerRule] = {}
    for name, module in model.named_modules():
        rule = rule_for(module, name, dict(params), uses)
        if rule is None or not rule.parametric or not rule.names:
            continue
        if isinstance(inputs, Tensor):
            if proven is None:
                proven = proven_layers(model, inputs)
            if name not in proven:
                continue
        found[name] = rule
    return found


def covered_parameters(model: nn.Module, params: Mapping[str, Tensor], inputs: Any) -> set[str]:
    """The parameters whose layer has a proven rule (the most :func:`layer_ggn_diag` covers).

    Keyword inputs: none before a batch has been run (their layers are checked on the batch).
    """
    rules = _candidates(model, params, inputs, keyword=False)
    return {q for rule in rules.values() for q in rule.names.values()}


def layer_ggn_diag(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    cotangents_of: Callable[[Tensor], Tensor | None],
    elements: int | None = None,
    *,
    examples: int | None = None,
    loss_of: Callable[[Tensor], Tensor] | None = None,
) -> LayerDiagonal:
    r""":math:`\sum_n\sum_r (J_n^\top c_{nr})^2` for every parameter of a covered layer.

    Args:
        model: the module (hooks are attached during the call and removed).
        params: all differentiated tensors by qualified name.
        inputs: one batch of inputs: a tensor, or :class:`ModelInputs` when ``examples`` is
            given (keyword inputs, checked on the batch: module docstring).
        cotangents_of: maps the detached outputs ``(N, *out)`` to cotangents ``(N, O, R)``,
            or to ``None`` to cover nothing (columns that would not fit in memory).
        elements: the most back-propagated layer-output gradients and per-example weight
            gradients that exist at once, in numbers (``None``: ``2**26`` and ``2**24``); the
            statistics' ``chunk_size`` times the number of parameters.
        examples: the number of examples of a :class:`ModelInputs` batch.
        loss_of: the batch loss of the outputs: when given and a layer is covered, the loss
            and its gradient come from the same forward pass (``LayerDiagonal.loss``/``grad``).
    """
    keyword = isinstance(inputs, ModelInputs)
    assert examples is not None or not keyword, "keyword inputs need the number of examples"
    rules = _candidates(model, params, inputs, keyword=True)
    holders: dict[str, dict[str, str]] = {}
    if keyword and fast_paths_allowed(model):
        holders = {n: h for n, h in holders_of(model, params).items() if n not in rules}
    if not (rules or holders) or (keyword and alone_check.coupled(model, inputs)):
        return LayerDiagonal(None, {})
    calls: dict[str, list[_Call]] = {name: [] for name in (*rules, *holders)}
    # Tables called on a (1, T) tensor broadcast over the batch (GPT-2's and BERT's positions):
    # their outputs are expanded to the batch's examples, so that the backward pass gives each
    # example's cotangent instead of their sum (:func:`~.broadcast_tables.expand_broadcast_output`).
    expandable = (
        set(holders) - broadcast_tables.UNEXPANDABLE.get(model, set())
        if keyword and examples is not None and examples > 1
        else set()
    )
    expanded: dict[str, list[Tensor]] = {}

    def opener(name: str):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[name].append(_Call(args, kwargs, sequence_now()))

        return pre_hook

    def closer(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
            replaced = None
            if name in expandable:
                assert examples is not None
                replaced = broadcast_tables.expand_broadcast_output(args, kwargs, output, examples)
            if replaced is not None:
                args, output = replaced
                expanded.setdefault(name, []).append(output)
            # checked after the forward pass: an input or output modified in place is refused
            calls[name][-1] = calls[name][-1]._replace(
                args=args, output=output, end=sequence_now(),
                versions=_versions(args, output, kwargs),
            )  # fmt: skip
            return None if replaced is None else output

        return hook

    handles = []
    for name in calls:
        module = rules[name].module if name in rules else model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(opener(name), with_kwargs=True))
        handles.append(module.register_forward_hook(closer(name), with_kwargs=True))
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    try:
        with torch.enable_grad():
            outputs = FunctionalModel(model, params)(leaves, inputs)
    except RuntimeError:
        if not expanded:
            raise
        outputs = None  # an expanded output written in place: run again without expanding
    finally:
        for handle in handles:
            handle.remove()
    if expanded and not (
        isinstance(outputs, Tensor) and broadcast_tables.only_rowwise_consumers(outputs, expanded)
    ):
        # The expansion may have changed what the model computed: forget it for this model
        # and compute the batch again with the table's own output.
        broadcast_tables.UNEXPANDABLE.setdefault(model, set()).update(expanded)
        return layer_ggn_diag(
            model, params, inputs, cotangents_of, elements, examples=examples, loss_of=loss_of
        )
    if not isinstance(outputs, Tensor):
        return LayerDiagonal(outputs, {})
    uses = leaf_edges(outputs.grad_fn)
    rows = examples if keyword else None
    generic = _generic_calls(model, holders, calls, leaves, uses, rows, outputs)
    covered: list[tuple[str, LayerRule, Tensor, Tensor, int]] = []
    for name, rule in rules.items():
        found = _one_tensor_call(calls[name], rows, len(outputs))
        if found is None or any(uses.get(id(leaves[q]), 0) != 1 for q in rule.names.values()):
            continue
        a, z, k = found
        if k > 1 and not isinstance(rule, _TOKEN_ROW_RULES):
            continue
        covered.append((name, rule, a.detach(), z, k))
    detached = outputs.detach()
    if keyword and (covered or generic) and examples is not None and examples > 1:
        layer_inputs: dict[str, tuple[nn.Module, tuple[Tensor, ...], int, tuple]] = {
            name: (rule.module, (a,), examples, CallInputs.of((a,), {}).constants)  # type: ignore[union-attr]
            for name, rule, a, *_ in covered
        }
        layer_inputs.update({
            name: (c.module, c.args, examples, c.inputs.constants if c.inputs else ())
            for name, c in generic.items()
        })  # fmt: skip
        misread = alone_check.alone_matches(model, params, inputs, examples, detached, layer_inputs)
        if misread is None:
            alone_check.COUPLED.setdefault(model, set()).add(alone_check.signature(inputs))
            covered, generic = [], {}
        elif misread:
            covered = [c for c in covered if c[0] not in misread]
            generic = _without(generic, misread)
    if not (covered or generic):
        return LayerDiagonal(detached, {})
    cotangents = cotangents_of(detached)  # (N, O, R)
    if cotangents is None:
        return LayerDiagonal(detached, {})
    loss = grad = None
    if loss_of is not None:
        with torch.enable_grad():
            value = loss_of(outputs)
        raw = torch.autograd.grad(
            value, list(leaves.values()), retain_graph=True, allow_unused=True
        )
        loss = value.detach()
        grad = {
            k: (torch.zeros_like(v) if g is None else g.detach())
            for (k, v), g in zip(leaves.items(), raw, strict=True)
        }
    zs = [z for *_, z, _ in covered] + [z for c in generic.values() for z in c.outputs]
    deltas = _batched_output_grads(outputs, zs, cotangents, elements or _COLUMN_ELEMENTS)
    sums: Params = {}
    for (_, rule, a, _, k), delta in zip(covered, deltas[: len(covered)], strict=True):
        if k > 1:  # k token rows per example: (N·k, in) -> (N, k, in), summed over positions
            a, delta = a.unflatten(0, (-1, k)), delta.unflatten(1, (-1, k))
        local = rule.squared_contraction(a, delta.detach(), list(rule.names), elements)
        sums.update({rule.names[q]: v for q, v in local.items()})
    if generic:
        per_call, rest = [], deltas[len(covered) :]
        for held in generic.values():
            per_call.append(tuple(rest[: len(held.outputs)]))
            rest = rest[len(held.outputs) :]
        sums.update(_generic_sums(list(generic.values()), per_call, elements))
    return LayerDiagonal(detached, sums, loss, grad)


def _generic_sums(
    calls: list[ModuleCall], deltas: list[tuple[Tensor, ...]], elements: int | None
) -> Params:
    """:func:`~.module_grads.squared_module_grads` per group of calls sharing a parameter.

    A group whose module fails on one example's rows alone is left out (its parameters go one
    example at a time through the whole model); the other groups keep their sums.
    """
    pairs = [
        (c._replace(outputs=tuple(z.detach() for z in c.outputs)), tuple(x.detach() for x in d))
        for c, d in zip(calls, deltas, strict=True)
    ]
    groups: list[list[tuple[ModuleCall, tuple[Tensor, ...]]]] = []
    for pair in pairs:
        names = set(pair[0].names.values())
        joined = [g for g in groups if names & {q for c, _ in g for q in c.names.values()}]
        merged = [pair] + [p for g in joined for p in g]
        groups = [g for g in groups if not any(g is j for j in joined)] + [merged]
    sums: Params = {}
    for group in groups:
        try:
            sums.update(
                squared_module_grads([c for c, _ in group], [d for _, d in group], elements)
            )
        except (RuntimeError, ValueError, TypeError, IndexError):
            # The module's own code refuses one example's rows alone (a reshape to the batch's
            # shape, say): its parameters take the exact one-example-at-a-time path instead.
            continue
    return sums


class _Call(NamedTuple):
    """One call of a recorded module, as its hooks saw it.

    ``start``/``end``: the autograd sequence numbers before and after it
    (:func:`~.module_grads.sequence_now`).
    """

    args: tuple
    kwargs: dict
    start: int
    output: Any = None
    end: int = -1
    versions: tuple = ()


def _versions(args: tuple, output: Any, kwargs: dict | None = None) -> tuple[int, ...]:
    """The version counters of a call's tensor inputs and outputs (in-place writes bump them)."""
    outs = output if isinstance(output, (tuple, list)) else (output,)
    values = (*args, *(kwargs or {}).values(), *outs)
    return tuple(t._version for t in values if isinstance(t, Tensor))


def _laid_out_by_example(tensors: tuple[Tensor, ...], examples: int, outputs: int) -> bool:
    """Whether each tensor's dim 0 holds ``k`` consecutive rows per example of the batch.

    ``k`` may differ between tensors and be more than one: the model flattened its
    ``(N, T, ...)`` tokens to ``(N·T, ...)`` (a mixture of experts before routing). The model
    must have one output row per example; :func:`~.alone_check.alone_matches` confirms the last
    example's rows on every batch.
    """
    if outputs != examples:
        return False
    return all(t.dim() > 0 and len(t) > 0 and len(t) % examples == 0 for t in tensors)


def _one_tensor_call(
    seen: list[_Call], examples: int | None, outputs: int
) -> tuple[Tensor, Tensor, int] | None:
    """``(input, output, rows per example)`` of a module called once on one positional tensor.

    ``None`` unless the output is a tensor in the graph and neither was modified in place
    afterwards; with ``examples`` (keyword inputs), both are laid out by example in dim 0 with
    the same number of rows (:func:`_laid_out_by_example`). Tensor inputs: one row per example
    (proven by the layout).
    """
    if len(seen) != 1 or seen[0].kwargs or len(seen[0].args) != 1:
        return None
    a, z = seen[0].args[0], seen[0].output
    if not (isinstance(a, Tensor) and isinstance(z, Tensor) and z.requires_grad):
        return None
    if _versions((a,), z) != seen[0].versions:
        return None
    if examples is None:
        return a, z, 1
    if not _laid_out_by_example((a, z), examples, outputs) or len(a) != len(z):
        return None
    return a, z, len(a) // examples


def _module_call(seen: list[_Call], examples: int | None, outputs: int) -> ModuleCall | None:
    """A module's one call on tensors, returning a tensor or a tuple of tensors.

    Its inputs are tensors, positional or keyword, and plain constants passed to every example
    as they are (OPT's position table takes the attention mask and a cache length); its
    differentiable outputs are kept (a router's logits and routing weights, not its expert
    indices). ``None`` unless something was differentiable, nothing was modified in place
    afterwards and every tensor input and output is laid out by example in dim 0
    (:func:`_laid_out_by_example`; tensor inputs: one row per example, proven by the layout).
    ``module`` and ``names`` are filled in by the caller.
    """
    if len(seen) != 1:
        return None
    call = seen[0]
    split = CallInputs.of(call.args, call.kwargs)
    if split is None or not split.tensors:
        return None
    picks: tuple[int, ...] | None = None
    if isinstance(call.output, Tensor):
        outs: tuple[Tensor, ...] = (call.output,) if call.output.requires_grad else ()
    elif isinstance(call.output, (tuple, list)) and all(isinstance(t, Tensor) for t in call.output):
        picks = tuple(i for i, t in enumerate(call.output) if t.requires_grad)
        outs = tuple(call.output[i] for i in picks)
    else:
        return None
    if not outs or _versions(call.args, call.output, call.kwargs) != call.versions:
        return None
    if examples is not None and not _laid_out_by_example(
        (*split.tensors, *outs), examples, outputs
    ):
        return None
    args = tuple(a.detach() for a in split.tensors)
    return ModuleCall(nn.Module(), {}, args, outs, picks, call.start, call.end, outputs, split)


def _generic_calls(
    model: nn.Module,
    holders: dict[str, dict[str, str]],
    calls: dict[str, list[_Call]],
    leaves: Params,
    uses: dict[int, int],
    examples: int | None,
    outputs: Tensor,
) -> dict[str, ModuleCall]:
    """The modules whose parameters :func:`~.module_grads.squared_module_grads` may compute.

    A module's call qualifies when it was called once, on positional tensors laid out by
    example, returning differentiable tensors likewise (:func:`_module_call`) that the rest
    of the model reads (:func:`_outputs_read_outside`); a parameter is kept when every module
    holding it qualifies and it reaches the loss through those calls only
    (:func:`~.module_grads.reaches_only_through`).
    """
    usable: dict[str, ModuleCall] = {}
    for name in holders:
        found = _module_call(calls[name], examples, len(outputs))
        if found is not None:
            usable[name] = found._replace(module=model.get_submodule(name), names=holders[name])
    usable = _outputs_read_outside(usable, outputs.grad_fn)
    held: dict[str, list[str]] = {}
    for name, names in holders.items():
        for q in names.values():
            held.setdefault(q, []).append(name)
    kept = {
        q for q, names in held.items()
        if all(n in usable for n in names)
        and reaches_only_through(leaves[q], [usable[n] for n in names], uses.get(id(leaves[q]), 0))
    }  # fmt: skip
    result: dict[str, ModuleCall] = {}
    for name, call in usable.items():
        names = {local: q for local, q in call.names.items() if q in kept}
        if names:
            result[name] = call._replace(names=names)
    return result


def _outputs_read_outside(calls: dict[str, ModuleCall], root: Any) -> dict[str, ModuleCall]:
    """Each call with only the outputs that the rest of the model reads (or without the call).

    A call is dropped when an output is read both inside and outside it, or when none is read
    outside. A router returns its logits and the routing weights computed from them: the
    backward pass gives the logits the TOTAL cotangent (through the weights too), so pulling
    both back through the router would count the weights' path twice. An output read only
    inside the call is dropped (its path is the other outputs'); one read on both sides cannot
    be split. Read from the autograd graph: a reader created during the call (its
    sequence-number window) is inside.
    """
    several = {name: call for name, call in calls.items() if len(call.outputs) > 1}
    if not several:
        return calls
    targets = {(z.grad_fn, z.output_nr) for call in several.values() for z in call.outputs}
    found = consumers(root, targets)
    result = dict(calls)
    for name, call in several.items():
        assert call.picks is not None
        kept: list[int] = []
        for position, z in enumerate(call.outputs):
            readers = found.get((z.grad_fn, z.output_nr), [])
            inside = sum(call.start < node._sequence_nr() < call.end for node in readers)
            if inside and inside < len(readers):
                kept = []
                break
            if readers and not inside:
                kept.append(position)
        if not kept:
            del result[name]
            continue
        result[name] = call._replace(
            outputs=tuple(call.outputs[i] for i in kept),
            picks=tuple(call.picks[i] for i in kept),
        )
    return result


# Rules whose squared contraction sums over positions: the only ones a module called on
# flattened tokens ``(N·k, in)`` may take, reshaped to ``(N, k, in)``.
_TOKEN_ROW_RULES = (LinearRule, HFConv1DRule)


def _without(calls: dict[str, ModuleCall], dropped: set[str]) -> dict[str, ModuleCall]:
    """``calls`` without the modules ``dropped`` and every parameter they hold.

    A tied parameter needs all its holders: it leaves the other holders' calls too.
    """
    lost = {q for name in dropped if name in calls for q in calls[name].names.values()}
    kept: dict[str, ModuleCall] = {}
    for name, call in calls.items():
        names = {local: q for local, q in call.names.items() if q not in lost}
        if name not in dropped and names:
            kept[name] = call._replace(names=names)
    return kept


def _batched_output_grads(
    outputs: Tensor, zs: list[Tensor], cotangents: Tensor, elements: int
) -> list[Tensor]:
    r""":math:`\partial (c_r^\top f)/\partial z` for every column ``r``: ``(R, *z.shape)``.

    Columns go through the graph in chunks bounding ``R' x |z|`` by ``elements``: on a CPU one
    backward pass per column (measured faster than the vmapped backward: the exact Fisher of the
    benchmark's CNN took 7.2-8.0 gradients against 8.8-9.3, the same on the MLP), elsewhere one
    vmapped backward per chunk (``is_grads_batched``), column by column for an operation
    without a batching rule.
    """
    columns = cotangents.shape[2]
    grad_outputs = cotangents.permute(2, 0, 1).reshape(columns, *outputs.shape)
    activations = sum(z.numel() for z in zs)
    step = max(1, min(columns, elements // max(1, activations)))
    deltas = [z.new_empty(columns, *z.shape) for z in zs] if step < columns else None
    for start in range(0, columns, step):
        chunk = grad_outputs[start : start + step]
        last = start + step >= columns
        if _one_backward_per_column(outputs.device):
            grads = _column_by_column(outputs, zs, chunk, retain_last=not last)
        else:
            try:
                grads = torch.autograd.grad(
                    outputs, zs, chunk, retain_graph=not last, is_grads_batched=True,
                    allow_unused=True,
                )  # fmt: skip
            except RuntimeError:
                # An op without a batching rule for its backward: one column at a time.
                grads = _column_by_column(outputs, zs, chunk, retain_last=not last)
        full = [
            g if g is not None else z.new_zeros(len(chunk), *z.shape)
            for g, z in zip(grads, zs, strict=True)
        ]
        if deltas is None:
            return full
        for delta, g in zip(deltas, full, strict=True):
            delta[start : start + len(chunk)] = g
    assert deltas is not None
    return deltas


def _one_backward_per_column(device: torch.device) -> bool:
    """On a CPU (measured, :func:`_batched_output_grads`); a GPU takes the vmapped backward."""
    return device.type == "cpu"


def _column_by_column(outputs: Tensor, zs: list[Tensor], chunk: Tensor, retain_last: bool):
    per_column = []
    for j in range(len(chunk)):
        keep = retain_last or j < len(chunk) - 1
        grads = torch.autograd.grad(outputs, zs, chunk[j], retain_graph=keep, allow_unused=True)
        per_column.append(
            [g if g is not None else torch.zeros_like(z) for g, z in zip(grads, zs, strict=True)]
        )
    return [torch.stack([c[i] for c in per_column]) for i in range(len(zs))]
