r"""Heads, MLP neurons and experts of Hugging Face transformers, found by module layout.

Each finder recognises a layout by its submodules and the attributes its ``forward`` reads,
checks every shape it relies on, and describes the groups as :class:`~.groups.GroupSet`.

Heads (config fields that count them, when the config can):

- ``q/k/v/o_proj`` (Phi: ``q/k/v_proj``/``dense``) with ``head_dim`` and
  ``num_key_value_groups`` (Llama, Qwen2/3, Mistral, Mixtral, Qwen3-MoE, Phi; ViT, DeiT and
  BEiT have ``num_attention_heads`` instead, one query head per key head): group j is
  key/value head j with its ``r = num_key_value_groups`` query heads ``j·r … (j+1)·r − 1`` and
  their ``o_proj`` columns; ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``.
  Qwen3's ``q_norm``/``k_norm`` (Phi's ``q_layernorm``/``k_layernorm``) and the rotary
  embedding act on each head's ``head_dim``: removing whole heads keeps both consistent.
- ``q/k/v/out_proj`` with ``num_heads`` (OPT) or ``num_attention_heads`` (GPT-J), the fused
  ``c_attn``/``c_proj`` (GPT-2: a head owns its q, k and v columns of ``c_attn``), GPT-NeoX's
  fused ``query_key_value``/``dense`` (its forward views the fused outputs as
  ``(..., heads, 3·head_size)``: head h owns rows ``3·h·d … 3·(h+1)·d − 1``, its q, k and v),
  ``self``/``output`` (BERT): head h. Falcon's fused ``query_key_value``/``dense`` in each of
  its three layouts: per head ``(q, k, v)`` (like GPT-NeoX; head h), multi-query (the query
  heads' rows, then ONE key and value every head reads: group h is query head h alone, the
  key and value stay), and the new decoder architecture (per key/value group its ``r`` query
  heads, then its key and value: group g is that whole run, like grouped-query attention).
  GPT-BigCode's (StarCoder's) ``c_attn``/``c_proj`` (``nn.Linear``), multi-query (the query
  heads' rows, then one key and value: group h is query head h) or per head ``(q, k, v)``.
  These configs derive ``head_dim = hidden_size / num_attention_heads``, so they cannot
  express fewer heads. ALiBi models (BLOOM, MPT, Falcon with ``alibi=True``) are not covered
  and are refused with the reason: the model computes each head's slope from its head count,
  so the kept heads would get other slopes.

Neurons: ``gate/up/down_proj`` (``intermediate_size``), GPT-2's ``c_fc``/``c_proj`` (weights
stored (in, out); ``n_inner``, StarCoder2's ``intermediate_size``), OPT's ``fc1``/``fc2``
(``ffn_dim``; Phi's, DeiT's and BEiT's ``intermediate_size``), BERT's
``intermediate``/``output`` (``intermediate_size``), GPT-NeoX's, Falcon's and BLOOM's
``dense_h_to_4h``/``dense_4h_to_h`` (``intermediate_size``, ``ffn_hidden_size``), GPT-J's and
CodeGen's ``fc_in``/``fc_out`` (``n_inner``), DistilBERT's ``lin1``/``lin2``
(``hidden_dim``): neuron i is row i of the producers and column i of the consumer. The
config field is the first of the layout's that holds the MLP's width; with none (BART's
``encoder_ffn_dim``/``decoder_ffn_dim``, BLOOM's 4 x hidden), removal needs
``hf_config="record"``.

Experts: a block with a ``gate`` router (one weight row per expert) and an ``experts`` module
holding one slice per expert of each of its tensors (Mixtral, Qwen3-MoE): expert e is slice e
of every expert tensor and router row e (``num_local_experts`` or ``num_experts``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .._common.linear_maps import is_hf_conv1d
from .groups import AttributeUpdate, ConfigUpdate, Consumer, GroupSet, Slice

__all__ = ["transformer_groups"]


def _blocks(groups: int, width: int, offset: int = 0) -> Tensor:
    """``(groups, width)``: group g owns ``offset + g·width … offset + (g+1)·width − 1``."""
    return offset + torch.arange(groups * width).reshape(groups, width)


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def _config(model: nn.Module) -> object | None:
    return getattr(model, "config", None)


def _config_value(model: nn.Module, key: str) -> object:
    return getattr(_config(model), key, None)


def _rows(prefix: str, module: nn.Module, index: Tensor, axis: int = 0) -> list[Slice]:
    """Slices of a map's OUTPUT units: its weight along ``axis`` and its bias."""
    slices = [Slice(f"{prefix}.weight", axis, index)]
    if getattr(module, "bias", None) is not None:
        slices.append(Slice(f"{prefix}.bias", 0, index))
    return slices


def _llama_attention(model: nn.Module, name: str, module: nn.Module) -> GroupSet | None:
    q, k, v = (_linear(module, n) for n in ("q_proj", "k_proj", "v_proj"))
    # the output projection: Llama's o_proj, Phi's dense
    out_name = next((n for n in ("o_proj", "dense") if _linear(module, n) is not None), "o_proj")
    o = _linear(module, out_name)
    head_dim = getattr(module, "head_dim", None)
    ratio = getattr(module, "num_key_value_groups", None)
    if ratio is None and isinstance(getattr(module, "num_attention_heads", None), int):
        ratio = 1  # ViT's (DeiT's, BEiT's) multi-head attention: one query head per key head
    if None in (q, k, v, o) or not isinstance(head_dim, int) or not isinstance(ratio, int):
        return None
    assert q is not None and k is not None and v is not None and o is not None
    kv_heads, remainder = divmod(k.out_features, head_dim)
    if (
        remainder
        or v.out_features != k.out_features
        or q.out_features != kv_heads * ratio * head_dim
        or o.in_features != q.out_features
    ):
        raise TypeError(
            f"find_groups: the attention {name!r} has q/k/v/o_proj shapes "
            f"{q.out_features}/{k.out_features}/{v.out_features}/{o.in_features} that do not "
            f"match head_dim={head_dim} and num_key_value_groups={ratio}; its heads cannot be "
            "removed safely"
        )
    for norm in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
        found = getattr(module, norm, None)
        if not isinstance(found, nn.Module):
            continue
        weight = getattr(found, "weight", None)
        if isinstance(weight, Tensor) and weight.numel() != head_dim:
            raise TypeError(
                f"find_groups: {name}.{norm} normalises {weight.numel()} features, not one "
                f"head's {head_dim}; removing heads would change what it normalises"
            )
        if not isinstance(weight, Tensor) and any(True for _ in found.parameters()):
            # StableLM's per-head norms: one module per head, paired with the heads by position.
            raise TypeError(
                f"find_groups: {name}.{norm} ({type(found).__name__}) holds parameters of its "
                "own per head, which removing heads would pair with other heads"
            )
    query = _blocks(kv_heads, ratio * head_dim)
    kv = _blocks(kv_heads, head_dim)
    slices = [
        *_rows(f"{name}.q_proj", q, query),
        *_rows(f"{name}.k_proj", k, kv),
        *_rows(f"{name}.v_proj", v, kv),
        Slice(f"{name}.{out_name}.weight", 1, query),
    ]
    # Head counts some of these modules read in their forward (StableLM views its projections
    # as (..., num_heads, head_dim)); Llama's views by -1 and has none.
    counts = (("num_heads", ratio), ("num_attention_heads", ratio), ("num_key_value_heads", 1))
    attributes = tuple(
        AttributeUpdate(name, attribute, per_group)
        for attribute, per_group in counts
        if isinstance(getattr(module, attribute, None), int)
    )
    config: tuple[ConfigUpdate, ...] = ()
    if _config_value(model, "num_key_value_heads") is not None:
        config = (
            ConfigUpdate("num_attention_heads", ratio),
            ConfigUpdate("num_key_value_heads", 1),
            ConfigUpdate("head_dim", 0, head_dim),
        )
    elif ratio == 1 and _config_value(model, "num_attention_heads") is not None:
        # ViT reads config.head_dim when there is one; a model that derives its head size
        # instead is caught by removal's rebuild of the model from the updated config.
        config = (ConfigUpdate("num_attention_heads", 1), ConfigUpdate("head_dim", 0, head_dim))
    return GroupSet(
        name,
        "heads",
        kv_heads,
        tuple(slices),
        consumers=(Consumer(f"{name}.{out_name}", query),),
        attributes=attributes,
        config=config,
        note="" if config else "the model's config has no num_key_value_heads field",
        heads_per_group=ratio,
    )


_DERIVED = (
    "its config derives head_dim = hidden_size / num_attention_heads, so no config with fewer "
    "heads keeps the same head size"
)


def _separate_heads(
    name: str,
    projections: dict[str, nn.Linear | None],
    consumer: tuple[str, nn.Linear | None],
    heads: object,
    head_dim: object,
    attributes: tuple[AttributeUpdate, ...],
    counts: str,
) -> GroupSet | None:
    """Heads of separate q/k/v projections read by one output projection (OPT, BERT).

    ``projections`` and ``consumer`` map paths (relative to the attention ``name``) to the
    modules; ``counts`` names the attributes in the error message.
    """
    path, output = consumer
    if output is None or None in projections.values():
        return None
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return None
    width = heads * head_dim
    outputs = {m.out_features for m in projections.values() if m is not None}
    if outputs | {output.in_features} != {width}:
        raise TypeError(
            f"find_groups: the attention {name!r} has projection sizes that do not match "
            f"{counts}={heads} x {head_dim}; its heads cannot be removed safely"
        )
    index = _blocks(heads, head_dim)
    slices = [
        s for p, m in projections.items() if m is not None for s in _rows(f"{name}.{p}", m, index)
    ]
    return GroupSet(
        name,
        "heads",
        heads,
        (*slices, Slice(f"{name}.{path}.weight", 1, index)),
        consumers=(Consumer(f"{name}.{path}", index),),
        attributes=attributes,
        note=_DERIVED,
    )


def _opt_attention(model: nn.Module, name: str, module: nn.Module) -> GroupSet | None:
    """``q/k/v/out_proj`` with ``num_heads`` (OPT, GPT-Neo, XGLM, BART-style).

    XGLM reshapes the heads' outputs by its ``embed_dim``, so that count is kept in step too
    (``head_dim`` per head), where the module has one.
    """
    projections = {p: _linear(module, p) for p in ("q_proj", "k_proj", "v_proj")}
    head_dim = getattr(module, "head_dim", None)
    attributes = [AttributeUpdate(name, "num_heads", 1)]
    if isinstance(getattr(module, "embed_dim", None), int) and isinstance(head_dim, int):
        attributes.append(AttributeUpdate(name, "embed_dim", head_dim))
    return _separate_heads(
        name,
        projections,
        ("out_proj", _linear(module, "out_proj")),
        getattr(module, "num_heads", None),
        head_dim,
        tuple(attributes),
        "num_heads x head_dim",
    )


def _fused_heads(
    name: str,
    fused: tuple[str, nn.Linear],
    output_name: str,
    rows: Tensor,
    columns: Tensor,
    attributes: tuple[AttributeUpdate, ...],
    heads_per_group: int = 1,
) -> GroupSet:
    """Heads of one fused q/k/v projection read by one output map (GPT-NeoX, Falcon, BigCode).

    ``rows``: ``(groups, width)``, the fused map's output rows (and bias entries) each group
    owns; ``columns``: the output map's input columns each group feeds. The configs of these
    layouts derive the head size from the head count (:data:`_DERIVED`).
    """
    fused_name, fused_map = fused
    return GroupSet(
        name,
        "heads",
        len(rows),
        (
            *_rows(f"{name}.{fused_name}", fused_map, rows),
            Slice(f"{name}.{output_name}.weight", 1, columns),
        ),
        consumers=(Consumer(f"{name}.{output_name}", columns),),
        attributes=attributes,
        note=_DERIVED,
        heads_per_group=heads_per_group,
    )


def _gptj_attention(model: nn.Module, name: str, module: nn.Module) -> GroupSet | None:
    """GPT-J's ``q/k/v/out_proj``: its forward views them as ``(..., -1, head_dim)`` heads.

    Recognised by its ``rotary_dim`` (the features of each head that rotate) beside
    ``num_attention_heads``: other attentions with these names may reshape by a width that
    removal would not update.
    """
    heads, head_dim = (
        getattr(module, "num_attention_heads", None),
        getattr(module, "head_dim", None),
    )
    if not isinstance(heads, int) or not hasattr(module, "rotary_dim"):
        return None
    return _separate_heads(
        name,
        {p: _linear(module, p) for p in ("q_proj", "k_proj", "v_proj")},
        ("out_proj", _linear(module, "out_proj")),
        heads,
        head_dim,
        (AttributeUpdate(name, "num_attention_heads", 1),),
        "num_attention_heads x head_dim",
    )


def _gpt_neox_attention(model: nn.Module, name: str, module: nn.Module) -> GroupSet | None:
    """GPT-NeoX's fused ``query_key_value``: head h's q, k and v are one run of 3·d rows."""
    fused, dense = _linear(module, "query_key_value"), _linear(module, "dense")
    head_size = getattr(module, "head_size", None)
    # Falcon's and BLOOM's query_key_value (module docstring) come with a head_dim instead.
    if fused is None or dense is None or not isinstance(head_size, int):
        return None
    heads, remainder = divmod(dense.in_features, head_size)
    if remainder or fused.out_features != 3 * dense.in_features:
        raise TypeError(
            f"find_groups: the attention {name!r} has query_key_value/dense sizes "
            f"{fused.out_features}/{dense.in_features} that do not match head_size={head_size} "
            "(3 x heads x head_size rows, heads x head_size columns); its heads cannot be "
            "removed safely"
        )
    return _fused_heads(
        name,
        ("query_key_value", fused),
        "dense",
        _blocks(heads, 3 * head_size),
        _blocks(heads, head_size),
        # GPT-NeoX views its heads as -1; GPT-NeoX-Japanese reads num_attention_heads.
        (
            (AttributeUpdate(name, "num_attention_heads", 1),)
            if isinstance(getattr(module, "num_attention_heads", None), int)
            else ()
        ),
    )


def _falcon_attention(model: nn.Module, name: str, module: nn.Module) -> GroupSet | None:
    """Falcon's fused ``query_key_value`` in its three layouts (module docstring)."""
    fused, dense = _linear(module, "query_key_value"), _linear(module, "dense")
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    kv_heads = getattr(module, "num_kv_heads", None)
    if fused is None or dense is None or not hasattr(module, "new_decoder_architecture"):
        return None
    if not all(isinstance(n, int) for n in (heads, head_dim, kv_heads)):
        return None
    assert isinstance(heads, int) and isinstance(head_dim, int) and isinstance(kv_heads, int)
    if getattr(_config(model), "alibi", False):
        raise TypeError(
            f"find_groups: {name!r} is an ALiBi attention, whose slopes the model computes "
            "from its head count: the kept heads would get other slopes, so its heads cannot "
            "be removed"
        )
    d = head_dim
    query = _blocks(heads, d)  # the columns of dense each query head feeds
    attributes = [AttributeUpdate(name, "num_heads", 1)]
    if module.new_decoder_architecture:
        ratio = heads // kv_heads
        expected = kv_heads * (ratio + 2) * d
        rows = _blocks(kv_heads, (ratio + 2) * d)
        query = _blocks(kv_heads, ratio * d)
        attributes = [
            AttributeUpdate(name, "num_heads", ratio),
            AttributeUpdate(name, "num_kv_heads", 1),
        ]
    elif module.multi_query:  # one key and value, read by every head: they stay
        expected, rows = (heads + 2) * d, query
        attributes.append(AttributeUpdate(name, "num_key_value_groups", 1))
    else:
        expected, rows = 3 * heads * d, _blocks(heads, 3 * d)
        attributes.append(AttributeUpdate(name, "num_kv_heads", 1))
    if fused.out_features != expected or dense.in_features != heads * d:
        raise TypeError(
            f"find_groups: the attention {name!r} has query_key_value/dense sizes "
            f"{fused.out_features}/{dense.in_features} that do not match num_heads={heads}, "
            f"num_kv_heads={kv_heads} x head_dim={d} in its layout; its heads cannot be "
            "removed safely"
        )
    return _fused_heads(
        name,
        ("query_key_value", fused),
        "dense",
        rows,
        query,
        tuple(attributes),
        heads_per_group=heads // kv_heads if module.new_decoder_architecture else 1,
    )


def _bigcode_attention(model: nn.Module, name: str, module: nn.Module) -> GroupSet | None:
    """GPT-BigCode's ``c_attn`` (``nn.Linear``): multi-query, or q, k, v per head."""
    fused, proj = _linear(module, "c_attn"), _linear(module, "c_proj")
    heads, d = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if fused is None or proj is None or not hasattr(module, "kv_dim"):
        return None
    if not isinstance(heads, int) or not isinstance(d, int):
        return None
    if getattr(module, "is_cross_attention", False):
        raise TypeError(
            f"find_groups: {name!r} is a cross-attention (separate q_attn); removing its heads "
            "is not supported"
        )
    query = _blocks(heads, d)
    attributes = [AttributeUpdate(name, "num_heads", 1), AttributeUpdate(name, "embed_dim", d)]
    if module.multi_query:  # one key and value, read by every head: they stay
        expected, rows = (heads + 2) * d, query
        attributes.append(AttributeUpdate(name, "num_key_value_groups", 1))
    else:
        expected, rows = 3 * heads * d, _blocks(heads, 3 * d)
        attributes += [AttributeUpdate(name, "kv_heads", 1), AttributeUpdate(name, "kv_dim", d)]
    if fused.out_features != expected or proj.in_features != heads * d:
        raise TypeError(
            f"find_groups: the attention {name!r} has c_attn/c_proj sizes "
            f"{fused.out_features}/{proj.in_features} that do not match num_heads={heads} x "
            f"head_dim={d} (multi_query={module.multi_query}); its heads cannot be removed safely"
        )
    return _fused_heads(name, ("c_attn", fused), "c_proj", rows, query, tuple(attributes))


def _gpt2_attention(model: nn.Module, name: str, module: nn.Module) -> GroupSet | None:
    fused, proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not isinstance(fused, nn.Module) or not isinstance(proj, nn.Module):
        return None
    if not (is_hf_conv1d(fused) and is_hf_conv1d(proj)):
        return None
    if getattr(module, "is_cross_attention", False):
        raise TypeError(
            f"find_groups: {name!r} is a cross-attention (separate q_attn); removing its heads "
            "is not supported"
        )
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return None
    width = heads * head_dim
    fused_shape, proj_shape = _weight(fused).shape, _weight(proj).shape
    if fused_shape[1] != 3 * width or proj_shape[0] != width:
        raise TypeError(
            f"find_groups: the attention {name!r} has c_attn/c_proj shapes "
            f"{tuple(fused_shape)}/{tuple(proj_shape)} that do not match "
            f"num_heads={heads} x head_dim={head_dim}"
        )
    single = _blocks(heads, head_dim)
    qkv = torch.cat([single, single + width, single + 2 * width], dim=1)
    slices = [
        Slice(f"{name}.c_attn.weight", 1, qkv),
        Slice(f"{name}.c_attn.bias", 0, qkv),
        Slice(f"{name}.c_proj.weight", 0, single),
    ]
    return GroupSet(
        name,
        "heads",
        heads,
        tuple(slices),
        consumers=(Consumer(f"{name}.c_proj", single),),
        attributes=(
            AttributeUpdate(name, "num_heads", 1),
            AttributeUpdate(name, "split_size", head_dim),
        ),
        note=_DERIVED,
    )


def _bert_attention(model: nn.Module, name: str, module: nn.Module) -> GroupSet | None:
    attention, output = getattr(module, "self", None), getattr(module, "output", None)
    if not isinstance(attention, nn.Module) or not isinstance(output, nn.Module):
        return None
    head_dim = getattr(attention, "attention_head_size", None)
    return _separate_heads(
        name,
        {f"self.{p}": _linear(attention, p) for p in ("query", "key", "value")},
        ("output.dense", _linear(output, "dense")),
        getattr(attention, "num_attention_heads", None),
        head_dim,
        (
            AttributeUpdate(f"{name}.self", "num_attention_heads", 1),
            AttributeUpdate(
                f"{name}.self", "all_head_size", head_dim if isinstance(head_dim, int) else 0
            ),
        ),
        "num_attention_heads x attention_head_size",
    )


def _mlp(
    model: nn.Module,
    name: str,
    producers: list[tuple[str, nn.Module]],
    consumer: tuple[str, nn.Module],
    config_keys: tuple[str, ...],
) -> GroupSet:
    """Neurons of an MLP: rows of each producer, columns of the consumer.

    Producers and consumer are ``nn.Linear`` or Hugging Face ``Conv1D`` (weights (in, out)).
    """
    consumer_name, consumer_module = consumer
    conv1d = is_hf_conv1d(consumer_module)
    size = _weight(consumer_module).shape[0 if conv1d else 1]
    index = _blocks(size, 1)
    slices: list[Slice] = []
    for producer_name, producer in producers:
        producer_conv1d = is_hf_conv1d(producer)
        outputs = _weight(producer).shape[1 if producer_conv1d else 0]
        if outputs != size:
            raise TypeError(
                f"find_groups: {producer_name!r} has {outputs} outputs but {consumer_name!r} "
                f"reads {size}; the MLP {name!r} cannot be cut into neurons"
            )
        slices += _rows(producer_name, producer, index, axis=1 if producer_conv1d else 0)
    slices.append(Slice(f"{consumer_name}.weight", 0 if conv1d else 1, index))
    # The first of the layout's config fields that holds this width (Phi's and StarCoder2's
    # fc1/c_fc layouts count it in intermediate_size, OPT's in ffn_dim, GPT-2's in n_inner).
    config_key = next((key for key in config_keys if _width(model, key) == size), None)
    return GroupSet(
        name,
        "neurons",
        size,
        tuple(slices),
        consumers=(Consumer(consumer_name, index),),
        config=(ConfigUpdate(config_key, 1),) if config_key else (),
        note="" if config_key else (
            f"no config field of {list(config_keys)} is this MLP's width {size}"
        ),
    )  # fmt: skip


def _width(model: nn.Module, key: str) -> object:
    """The MLP width a config field says (GPT-2's ``n_inner=None`` means ``4 * n_embd``)."""
    value = _config_value(model, key)
    if key == "n_inner" and value is None and _config_value(model, "n_embd") is not None:
        value = 4 * int(_config_value(model, "n_embd"))  # type: ignore[call-overload]
    return value


def _mlp_layout(model: nn.Module, name: str, module: nn.Module) -> GroupSet | None:
    def child(path: str) -> tuple[str, nn.Module] | None:
        try:
            found = module.get_submodule(path)
        except AttributeError:
            return None
        if isinstance(found, nn.Linear) or is_hf_conv1d(found):
            return f"{name}.{path}", found
        return None

    layouts = (
        (("gate_proj", "up_proj"), "down_proj", ("intermediate_size",)),
        (("c_fc",), "c_proj", ("n_inner", "intermediate_size")),
        (("fc1",), "fc2", ("ffn_dim", "intermediate_size")),
        (("intermediate.dense",), "output.dense", ("intermediate_size",)),
        (("dense_h_to_4h",), "dense_4h_to_h", ("intermediate_size", "ffn_hidden_size")),
        (("fc_in",), "fc_out", ("n_inner",)),
        (("lin1",), "lin2", ("hidden_dim",)),
    )
    for producer_paths, consumer_path, key in layouts:
        producers = [child(p) for p in producer_paths]
        consumer = child(consumer_path)
        if consumer is not None and all(p is not None for p in producers):
            if consumer_path == "c_proj" and hasattr(module, "c_attn"):
                return None  # GPT-2's attention also has a c_proj
            return _mlp(model, name, [p for p in producers if p is not None], consumer, key)
    return None


def _experts(model: nn.Module, name: str, module: nn.Module) -> GroupSet | None:
    experts, router = getattr(module, "experts", None), getattr(module, "gate", None)
    count = getattr(experts, "num_experts", None)
    if not isinstance(experts, nn.Module) or not isinstance(router, nn.Module):
        return None
    if not isinstance(count, int) or isinstance(experts, nn.ModuleList):
        return None
    slices: list[Slice] = []
    index = _blocks(count, 1)
    for owner, prefix in ((experts, "experts"), (router, "gate")):
        tensors = [*owner.named_parameters(), *owner.named_buffers()]
        for local, tensor in tensors:
            if tensor.dim() >= 1 and tensor.shape[0] == count:
                slices.append(Slice(f"{name}.{prefix}.{local}", 0, index))
    router_weight = getattr(router, "weight", None)
    if not isinstance(router_weight, Tensor) or router_weight.shape[0] != count:
        raise TypeError(
            f"find_groups: the router {name}.gate has no weight with one row per expert "
            f"({count}); its experts cannot be removed safely"
        )
    attributes = [AttributeUpdate(f"{name}.experts", "num_experts", 1)]
    if isinstance(getattr(router, "num_experts", None), int):
        attributes.append(AttributeUpdate(f"{name}.gate", "num_experts", 1))
    keys = [k for k in ("num_local_experts", "num_experts") if _config_value(model, k) == count]
    return GroupSet(
        name,
        "experts",
        count,
        tuple(slices),
        attributes=tuple(attributes),
        config=(ConfigUpdate(keys[0], 1),) if keys else (),
        note="" if keys else "no config field holds this block's expert count",
    )


_ATTENTION = (
    _llama_attention,
    _opt_attention,
    _gptj_attention,
    _gpt2_attention,
    _bigcode_attention,
    _gpt_neox_attention,
    _falcon_attention,
    _bert_attention,
)


def transformer_groups(model: nn.Module, kind: str) -> Iterator[GroupSet]:
    """Every group set of ``kind`` (``"heads"``, ``"neurons"``, ``"experts"``) in module order."""
    for name, module in model.named_modules():
        if kind == "heads":
            for finder in _ATTENTION:
                found = finder(model, name, module)
                if found is not None:
                    yield found
                    break
        elif kind == "neurons":
            found = _mlp_layout(model, name, module)
            if found is not None:
                yield found
        elif kind == "experts":
            found = _experts(model, name, module)
            if found is not None:
                yield found
