"""The compressed layer kinds a model file can hold, and the tensors each kind stores.

One table for the manifest check, the size check before allocation and the rebuild, so that the
three cannot disagree about what a layer of a kind holds.
"""

from __future__ import annotations

import math
from typing import Any

PACKED_KINDS = ("BlockDiagonalLinear", "BlockDiagonalConv")
MASKED_KINDS = ("MPDLinear", "MPDConv1d", "MPDConv2d")
LAYER_KINDS = PACKED_KINDS + MASKED_KINDS
# Kernel dimensions of each convolution kind (a packed convolution has one or two).
CONV_DIMS = {"MPDConv1d": (1,), "MPDConv2d": (2,), "BlockDiagonalConv": (1, 2)}

__all__ = [
    "PACKED_KINDS",
    "MASKED_KINDS",
    "LAYER_KINDS",
    "CONV_DIMS",
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


def layer_tensor_shapes(
    kind: str, d_out: int, d_in: int, c: int, bias: bool, kernel: list[int] | None = None
) -> dict[str, tuple[int, ...]]:
    """State-dict suffix → shape of every tensor a compressed layer of ``kind`` stores (the block
    count is in the manifest, not stored)."""
    rows, cols = -(-d_out // c), -(-d_in // c)
    k = tuple(kernel or ())
    if kind in PACKED_KINDS:
        weight = {"weight_blocks": (c * rows, cols, *k) if k else (c, rows, cols)}
        bias_shape = (c * rows,)
    else:
        weight = {"weight": (d_out, d_in, *k)}
        bias_shape = (d_out,)
    return {**weight, **({"bias": bias_shape} if bias else {}), "row_order": (d_out,), "col_order": (d_in,)}


def stored_values(shapes: dict[str, tuple[int, ...]]) -> int:
    """How many values the tensors of ``shapes`` hold."""
    return sum(math.prod(shape) for shape in shapes.values())
