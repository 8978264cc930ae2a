"""The network behind a user's model, and whether its weights can be pruned at all.

:func:`unwrap` removes the wrappers that only change how a model runs:
``DistributedDataParallel`` / ``DataParallel`` (statistics are computed functionally on the
wrapped network, and their own all-reduce replaces the wrapper's gradient sync) and
``torch.compile`` (its graphs have no double backward, which Hessian-vector products need; the
original module shares every parameter, so pruning it prunes the compiled model). Masks are then
keyed by the names of the network itself, without ``module.`` or ``_orig_mod.``.

:func:`check_weights` refuses, before anything is scored, weights that are not there (the meta
device) or not floating-point numbers (a quantized model).
"""

from __future__ import annotations

from torch import nn

__all__ = ["check_weights", "unwrap"]

# Where quantized layers come from: torch.ao, bitsandbytes, torchao, optimum-quanto, HQQ, AWQ.
_QUANTIZED_MODULES = (
    "torch.ao.nn.quantized",
    "torch.nn.quantized",
    "bitsandbytes",
    "torchao",
    "optimum.quanto",
    "hqq",
    "awq",
)


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` without (DistributedData)Parallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def check_weights(model: nn.Module) -> None:
    """Every parameter is materialised and the model is not quantized.

    Raises:
        ValueError: naming the quantized layer or the parameter on the meta device.
    """
    quantized = _quantized(model)
    if quantized:
        raise ValueError(
            f"the model is quantized ({quantized}): pruning scores and zeroes floating-point "
            "weights; prune the model before quantizing it (or load it without quantization)"
        )
    for name, param in model.named_parameters():
        if param.is_meta:
            raise ValueError(
                f"parameter {name!r} is on the meta device: its values were never loaded "
                "(init_empty_weights, device_map offload); load the weights before pruning"
            )


def _quantized(model: nn.Module) -> str:
    """What makes the model quantized, or ``""``."""
    if getattr(model, "is_quantized", False):  # transformers' from_pretrained(quantization_config)
        method = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
        return f"quantization_config {getattr(method, 'quant_method', 'set')}"
    for name, module in model.named_modules():
        if type(module).__module__.startswith(_QUANTIZED_MODULES):
            return f"module {name!r} is a {type(module).__module__}.{type(module).__name__}"
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            return f"parameter {name!r} holds {param.dtype}"
        if type(param.detach()).__module__.startswith(_QUANTIZED_MODULES):
            return f"parameter {name!r} is a {type(param.detach()).__name__}"
    return ""
