"""The compressed layer kinds a model file can hold, and the tensors each kind stores.

One table for the manifest check, the size check before allocation and the rebuild, so that the
three cannot disagree about what a layer of a kind holds.
"""

from __future__ import annotations

import math
from typing import Any

from ..core.quantize import QuantConfig
from ..errors import ConfigError
from ..nn.quantized import QuantizedBlocks, quantized_shapes

_MAX_GROUP = 2**20

# Quantized kinds (format version 3) by the float packed kind they quantize.
QUANTIZED_KINDS = {
    "QuantizedBlockDiagonalLinear": "BlockDiagonalLinear",
    "QuantizedBlockDiagonalConv": "BlockDiagonalConv",
}
PACKED_KINDS = ("BlockDiagonalLinear", "BlockDiagonalConv", *QUANTIZED_KINDS)
MASKED_KINDS = ("MPDLinear", "MPDConv1d", "MPDConv2d")
LAYER_KINDS = PACKED_KINDS + MASKED_KINDS
# Kernel dimensions of each convolution kind (a packed convolution has one or two).
CONV_DIMS = {"MPDConv1d": (1,), "MPDConv2d": (2,), "BlockDiagonalConv": (1, 2), "QuantizedBlockDiagonalConv": (1, 2)}
_QUANTIZATION_KEYS = {"bits", "group_size", "symmetric", "activations"}

__all__ = [
    "PACKED_KINDS",
    "MASKED_KINDS",
    "LAYER_KINDS",
    "CONV_DIMS",
    "QUANTIZED_KINDS",
    "quantization_problem",
    "quantization_entry",
    "layer_tensor_shapes",
    "kernel_problem",
    "stored_values",
]


def kernel_problem(kind: str, kernel: Any, is_size) -> str | None:
    """Why ``kernel`` is not a kernel size a layer of ``kind`` has, or None (linears have none)."""
    if kind not in CONV_DIMS:
        return None if kernel is None else f"a {kind} has no kernel_size"
    if not (isinstance(kernel, list) and len(kernel) in CONV_DIMS[kind] and all(is_size(k) for k in kernel)):
        return f"a {kind} needs a kernel_size of {' or '.join(map(str, CONV_DIMS[kind]))} positive ints"
    return None


def quantization_entry(layer: Any) -> dict[str, Any] | None:
    """A quantized layer's manifest and architecture entry (None for other layers)."""
    if not isinstance(layer, QuantizedBlocks):
        return None
    return {
        "bits": layer.bits,
        "group_size": layer.group_size,
        "symmetric": layer.symmetric,
        "activations": layer.activations,
    }


def quantization_problem(kind: str, entry: Any) -> str | None:
    """Why ``entry`` is not the quantization of a layer of ``kind`` (a dict of
    :class:`~mpdcompress.QuantConfig`'s fields for quantized kinds, absent for others), or None."""
    if kind not in QUANTIZED_KINDS:
        return None if entry is None else f"a {kind} is not quantized"
    if not (isinstance(entry, dict) and set(entry) == _QUANTIZATION_KEYS and type(entry["symmetric"]) is bool):
        return f"a {kind} needs a quantization entry with {sorted(_QUANTIZATION_KEYS)}"
    try:
        config = QuantConfig(**entry)
    except ConfigError as exc:
        return f"{kind}: {exc}"
    if config.group_size != entry["group_size"] or (config.group_size or 2) > _MAX_GROUP:
        return f"{kind}: group_size {entry['group_size']!r} is not a group size this format stores"
    if config.activations == "dynamic" and QUANTIZED_KINDS[kind] != "BlockDiagonalLinear":
        return f"{kind}: dynamic activations are for linear layers"
    return None


def layer_tensor_shapes(
    kind: str,
    d_out: int,
    d_in: int,
    c: int,
    bias: bool,
    kernel: list[int] | None = None,
    quantization: dict[str, Any] | None = None,
) -> dict[str, tuple[int, ...]]:
    """State-dict suffix → shape of every tensor a compressed layer of ``kind`` stores (the block
    count is in the manifest, not stored; ``quantization``: a quantized kind's entry)."""
    rows, cols = -(-d_out // c), -(-d_in // c)
    k = tuple(kernel or ())
    if kind in QUANTIZED_KINDS:
        q = quantization or {}
        weight = quantized_shapes(c, rows, cols * math.prod(k), q["bits"], q["group_size"], q["symmetric"])
        bias_shape = (c * rows,)
    elif kind in PACKED_KINDS:
        weight = {"weight_blocks": (c * rows, cols, *k) if k else (c, rows, cols)}
        bias_shape = (c * rows,)
    else:
        weight = {"weight": (d_out, d_in, *k)}
        bias_shape = (d_out,)
    return {**weight, **({"bias": bias_shape} if bias else {}), "row_order": (d_out,), "col_order": (d_in,)}


def stored_values(shapes: dict[str, tuple[int, ...]]) -> int:
    """How many values the tensors of ``shapes`` hold."""
    return sum(math.prod(shape) for shape in shapes.values())
