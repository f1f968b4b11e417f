"""The torch.nn layers a model file may name, and what each of their arguments may be.

A file's architecture rebuilds layers by calling their constructors with the arguments it
records, so those arguments are an allow-list per layer type, written from what torch accepts:
an int or a list of ints of the layer's dimensionality for sizes, strides and paddings (and
``"same"``/``"valid"`` for a convolution's padding), finite numbers, true/false, and the
strings a layer knows. Anything else is refused before any constructor runs, in particular the
``device``/``dtype`` keywords (a layer built on another device escapes the size check's meta
device) and numbers of absurd size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..nn.quantized import QuantizedLinear

__all__ = ["LAYER_ARGUMENTS", "SUPPORTED_LAYERS", "check_layer_args"]

_MAX_SIZE = 2**40  # no feature, channel or embedding count of a real model comes near this
_MAX_WINDOW = 2**20  # kernel sizes, strides, paddings and dilations
_MAX_DIMS = 64  # torch tensors have at most 64 dimensions


@dataclass(frozen=True)
class Arg:
    """What one argument may be: ``accepts(value)``, described as ``expected`` in errors."""

    accepts: Callable[[Any], bool]
    expected: str

    def __or__(self, other: Arg) -> Arg:
        return Arg(lambda v: self.accepts(v) or other.accepts(v), f"{self.expected}, or {other.expected}")


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def size(low: int = 1, high: int = _MAX_SIZE) -> Arg:
    return Arg(lambda v: _is_int(v, low, high), f"an integer from {low} to {high}")


def number(low: float = -math.inf, high: float = math.inf) -> Arg:
    def accepts(v: Any) -> bool:
        return type(v) in (int, float) and math.isfinite(v) and low <= v <= high

    bounds = "" if (low, high) == (-math.inf, math.inf) else f" from {low} to {high}"
    return Arg(accepts, f"a finite number{bounds}")


def per_dimension(n: int, low: int) -> Arg:
    """An int, or a list of ``n`` ints (one per spatial dimension), each from ``low``."""

    def accepts(v: Any) -> bool:
        items = v if isinstance(v, list) else [v]
        return (len(items) == n or not isinstance(v, list)) and all(_is_int(i, low, _MAX_WINDOW) for i in items)

    return Arg(accepts, f"an integer from {low} to {_MAX_WINDOW} or a list of {n} such")


def choice(*options: str) -> Arg:
    return Arg(lambda v: v in options and type(v) is str, "one of " + ", ".join(repr(o) for o in options))


def none() -> Arg:
    return Arg(lambda v: v is None, "null")


def int_list(max_len: int, low: int, high: int = _MAX_SIZE) -> Arg:
    return Arg(
        lambda v: isinstance(v, list) and 1 <= len(v) <= max_len and all(_is_int(i, low, high) for i in v),
        f"a list of 1 to {max_len} integers from {low} to {high}",
    )


def _unflattened(v: Any) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= _MAX_DIMS and all(i == -1 or _is_int(i, 1, _MAX_SIZE) for i in v)


def output_size(n: int) -> Arg:
    """An adaptive pool's output: an int, or a list of ``n`` ints or nulls (keep that size)."""
    accepts = Arg(
        lambda v: isinstance(v, list) and len(v) == n and all(i is None or _is_int(i, 1, _MAX_WINDOW) for i in v),
        f"a list of {n} integers from 1 to {_MAX_WINDOW} or nulls",
    )
    return size(1, _MAX_WINDOW) | accepts


UNFLATTENED = Arg(_unflattened, f"a list of 1 to {_MAX_DIMS} sizes from 1 to {_MAX_SIZE}, or -1 for one of them")
FLAG = Arg(lambda v: type(v) is bool, "true or false")
NUMBER = number()
DIM = size(-_MAX_DIMS, _MAX_DIMS - 1)
INPLACE = {"inplace": FLAG}


def _conv(n: int) -> dict[str, Arg]:
    return {
        "in_channels": size(),
        "out_channels": size(),
        "kernel_size": per_dimension(n, 1),
        "stride": per_dimension(n, 1),
        "padding": per_dimension(n, 0) | choice("same", "valid"),
        "dilation": per_dimension(n, 1),
        "groups": size(),
        "bias": FLAG,
        "padding_mode": choice("zeros", "reflect", "replicate", "circular"),
    }


def _max_pool(n: int) -> dict[str, Arg]:
    return {
        "kernel_size": per_dimension(n, 1),
        "stride": per_dimension(n, 1) | none(),
        "padding": per_dimension(n, 0),
        "dilation": per_dimension(n, 1),
        "return_indices": FLAG,
        "ceil_mode": FLAG,
    }


def _avg_pool(n: int) -> dict[str, Arg]:
    return {
        "kernel_size": per_dimension(n, 1),
        "stride": per_dimension(n, 1) | none(),
        "padding": per_dimension(n, 0),
        "ceil_mode": FLAG,
        "count_include_pad": FLAG,
    }


_BATCH_NORM = {
    "num_features": size(),
    "eps": number(0),
    "momentum": number() | none(),
    "affine": FLAG,
    "track_running_stats": FLAG,
    "bias": FLAG,
}
_DROPOUT = {"p": number(0, 1), **INPLACE}

# Every layer a file may name, with every argument it may record; a layer with no entry for an
# argument of its constructor gets the constructor's default.
LAYER_ARGUMENTS: dict[type[nn.Module], dict[str, Arg]] = {
    nn.Linear: {"in_features": size(), "out_features": size(), "bias": FLAG},
    QuantizedLinear: {
        "in_features": size(),
        "out_features": size(),
        "bias": FLAG,
        "bits": Arg(lambda v: type(v) is int and v in (4, 8), "4 or 8"),
        "group_size": size(2, _MAX_WINDOW) | none(),
        "symmetric": FLAG,
        "activations": choice("float", "dynamic"),
    },
    nn.Conv1d: _conv(1),
    nn.Conv2d: _conv(2),
    nn.Conv3d: _conv(3),
    nn.BatchNorm1d: _BATCH_NORM,
    nn.BatchNorm2d: _BATCH_NORM,
    nn.BatchNorm3d: _BATCH_NORM,
    nn.LayerNorm: {
        "normalized_shape": size() | int_list(_MAX_DIMS, 1),
        "eps": number(0),
        "elementwise_affine": FLAG,
        "bias": FLAG,
    },
    nn.GroupNorm: {"num_groups": size(), "num_channels": size(), "eps": number(0), "affine": FLAG, "bias": FLAG},
    nn.LocalResponseNorm: {"size": size(1, _MAX_WINDOW), "alpha": NUMBER, "beta": NUMBER, "k": NUMBER},
    nn.Embedding: {
        "num_embeddings": size(),
        "embedding_dim": size(),
        "padding_idx": size(-_MAX_SIZE, _MAX_SIZE) | none(),
        "max_norm": number(0) | none(),
        "norm_type": NUMBER,
        "scale_grad_by_freq": FLAG,
        "sparse": FLAG,
    },
    nn.MaxPool1d: _max_pool(1),
    nn.MaxPool2d: _max_pool(2),
    nn.AvgPool1d: _avg_pool(1),
    nn.AvgPool2d: {**_avg_pool(2), "divisor_override": size(1, _MAX_WINDOW) | none()},
    nn.AdaptiveAvgPool1d: {"output_size": output_size(1)},
    nn.AdaptiveAvgPool2d: {"output_size": output_size(2)},
    nn.AdaptiveMaxPool2d: {"output_size": output_size(2), "return_indices": FLAG},
    nn.Flatten: {"start_dim": DIM, "end_dim": DIM},
    nn.Unflatten: {"dim": DIM, "unflattened_size": UNFLATTENED},
    nn.Identity: {},
    nn.ReLU: INPLACE,
    nn.ReLU6: INPLACE,
    nn.LeakyReLU: {"negative_slope": NUMBER, **INPLACE},
    nn.ELU: {"alpha": NUMBER, **INPLACE},
    nn.SELU: INPLACE,
    nn.CELU: {"alpha": NUMBER, **INPLACE},
    nn.GELU: {"approximate": choice("none", "tanh")},
    nn.SiLU: INPLACE,
    nn.Mish: INPLACE,
    nn.Sigmoid: {},
    nn.Tanh: {},
    nn.Hardtanh: {"min_val": NUMBER, "max_val": NUMBER, **INPLACE},
    nn.Hardswish: INPLACE,
    nn.Hardsigmoid: INPLACE,
    nn.Softplus: {"beta": NUMBER, "threshold": NUMBER},
    nn.Softsign: {},
    nn.Tanhshrink: {},
    nn.Threshold: {"threshold": NUMBER, "value": NUMBER, **INPLACE},
    nn.LogSigmoid: {},
    nn.Dropout: _DROPOUT,
    nn.AlphaDropout: _DROPOUT,
    nn.Dropout2d: _DROPOUT,
    nn.PReLU: {"num_parameters": size()},
    nn.Softmax: {"dim": DIM | none()},
    nn.LogSoftmax: {"dim": DIM | none()},
}
SUPPORTED_LAYERS: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in LAYER_ARGUMENTS}


def check_layer_args(kind: str, args: Any) -> str | None:
    """Why ``args`` cannot be the arguments of layer ``kind``, or None if they can."""
    if kind not in SUPPORTED_LAYERS:
        return f"architecture names an unsupported module type {kind!r}"
    if not isinstance(args, dict):
        return f"architecture {kind} has malformed args"
    allowed = LAYER_ARGUMENTS[SUPPORTED_LAYERS[kind]]
    for name, value in args.items():
        if name not in allowed:
            return f"{kind} takes no argument {name!r} in a model file"
        if not allowed[name].accepts(value):
            return f"{kind}.{name} must be {allowed[name].expected}, got {json.dumps(value)[:60]}"
    return None
