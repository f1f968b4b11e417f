"""Quantized linear layers in ONNX as ONNX Runtime's ``MatMulNBits`` (domain ``com.microsoft``).

The standard ONNX form of a quantized layer stores its integers and dequantizes them with
``Cast`` and ``Mul``; ONNX Runtime folds those into float weights when it loads the model, so it
runs float GEMMs over four or eight times the bytes. ``MatMulNBits`` keeps each block's integers
and multiplies with them: at accuracy level 0 the activations stay float (the weight-only
result, to float rounding), at level 4 ONNX Runtime rounds each row of activations to int8 and
runs integer dot products (faster, close to but not exactly the weight-only result).

Its layout is ours almost bit for bit: per output row, blocks of ``block_size`` inputs (a power
of two, at least 16), 4-bit values low nibble first, one scale per block, the nibble 8 (or the
byte 128 at 8 bits) standing for zero unless zero points are given, which for 4 bits are packed
two per byte like the weights. Our int4 groups are its blocks; our int8 rows (one scale per row)
are one block as wide as the next power of two.

The graph gets the operator through a PyTorch custom operator, ``mpdcompress::matmul_nbits``,
whose eager meaning (the weight-only product) is what ``torch.export`` traces and what the
export's check forward runs, and which the ONNX exporter translates to ``MatMulNBits``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernels.quantized_blocks import SYMMETRIC_INT4_ZERO, QuantizedWeight, pack_int4, unpack_int4
from ..nn.quantized import QuantizedBlockDiagonalLinear, QuantizedLinear
from .block_forms import PerBlockProducts, set_export_form

__all__ = ["NBitsBlocks", "matmulnbits_form_", "translation_table", "WEIGHT_ONLY", "INT8_ACTIVATIONS"]

# MatMulNBits' accuracy levels: 0 computes in the activations' float type, 4 in int8.
WEIGHT_ONLY, INT8_ACTIVATIONS = 0, 4


@torch.library.custom_op("mpdcompress::matmul_nbits", mutates_args=())
def matmul_nbits(
    a: torch.Tensor,
    blob: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    k: int,
    n: int,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """``a @ W.T`` with ``W`` (``n`` x ``k``) stored as MatMulNBits stores it, in float (the
    weight-only meaning, whatever ``accuracy_level``). The weights dequantize with the same
    operations as :meth:`QuantizedWeight.dequantize`, so they are bit-identical to the layer's."""
    raw = unpack_int4(blob.reshape(n, -1)) if bits == 4 else blob.reshape(n, -1).to(torch.int32)
    per_row = raw.shape[1] // block_size
    if zero_points is None:
        zero = torch.full((n, per_row), 1 << (bits - 1), dtype=torch.int32, device=blob.device)
    elif bits == 4:
        zero = unpack_int4(zero_points.reshape(n, -1))[:, :per_row]
    else:
        zero = zero_points.reshape(n, per_row).to(torch.int32)
    q = (raw.reshape(n, per_row, block_size) - zero.unsqueeze(-1)).to(scales.dtype)
    w = (q * scales.reshape(n, per_row, 1)).flatten(1)[:, :k]
    return F.linear(a, w.to(a.dtype))


@matmul_nbits.register_fake
def _(a, blob, scales, zero_points, k, n, bits, block_size, accuracy_level):
    return a.new_empty((*a.shape[:-1], n))


def _register_schema() -> None:
    """Tell ``onnx`` (which onnxscript asks) the signature of ONNX Runtime's contrib operator."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MatMulNBits", "com.microsoft"):
        return
    tensor, attribute = OpSchema.FormalParameter, OpSchema.Attribute
    optional = OpSchema.FormalParameterOption.Optional
    onnx.defs.register_schema(
        OpSchema(
            "MatMulNBits",
            "com.microsoft",
            1,
            inputs=[
                tensor("A", "T1"),
                tensor("B", "T2"),
                tensor("scales", "T1"),
                tensor("zero_points", "T3", param_option=optional),
            ],
            outputs=[tensor("Y", "T1")],
            type_constraints=[
                ("T1", ["tensor(float)", "tensor(float16)"], "activations and scales"),
                ("T2", ["tensor(uint8)"], "packed weights"),
                ("T3", ["tensor(uint8)"], "packed zero points"),
            ],
            attributes=[
                attribute(name, OpSchema.AttrType.INT, "")
                for name in ("K", "N", "bits", "block_size", "accuracy_level")
            ],
        )
    )


def _matmul_nbits_onnx(a, blob, scales, zero_points, k: int, n: int, bits: int, block_size: int, accuracy_level: int):
    from onnxscript import values

    inputs = (a, blob, scales) if zero_points is None else (a, blob, scales, zero_points)
    return values.Opset("com.microsoft", 1).MatMulNBits(
        *inputs, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level
    )


def translation_table() -> dict:
    """The exporter's ``custom_translation_table`` entry for ``mpdcompress::matmul_nbits``."""
    _register_schema()
    return {torch.ops.mpdcompress.matmul_nbits.default: _matmul_nbits_onnx}


def _block_size(weight: QuantizedWeight, where: str) -> int:
    if weight.bits == 8:  # one scale per row: one block of the whole row
        return max(16, 1 << (weight.inputs - 1).bit_length())
    size = weight.group_size
    if size < 16 or size & (size - 1):
        raise ConfigError(
            f"{where}: MatMulNBits needs groups of a power of two of at least 16 inputs, this layer has "
            f"{size} (quantize with group_size 32, 64 or 128, or export with quantized_ops='dequantize')"
        )
    return size


class NBitsBlocks(PerBlockProducts):
    """Integer blocks as one ``MatMulNBits`` per block; ``where`` names the layer in errors.
    Built before tracing, so that each block's integers, scales and zero points are constants of
    the graph."""

    def __init__(self, weight: QuantizedWeight, accuracy_level: int, where: str) -> None:
        c, rows = weight.qweight.shape[:2]
        inputs = weight.inputs
        self.shape = (c, rows, inputs)
        self.bits, self.accuracy_level = weight.bits, accuracy_level
        self.block_size = _block_size(weight, where)
        blocks_per_row = math.ceil(inputs / self.block_size)
        if weight.bits == 8:
            raw, pad = weight.qweight.to(torch.int32) + 128, 128
        else:
            raw, pad = unpack_int4(weight.qweight)[..., :inputs], SYMMETRIC_INT4_ZERO
        raw = F.pad(raw, (0, blocks_per_row * self.block_size - inputs), value=pad)
        if weight.bits == 4:
            raw = pack_int4(raw)
        blob = raw.to(torch.uint8).reshape(c, rows, blocks_per_row, -1)
        scales = weight.scales.reshape(c, rows * blocks_per_row)
        zeros = weight.zero_points
        if zeros is not None:  # 4 bits (8-bit blocks are symmetric): two per byte, rows padded to whole bytes
            zeros = pack_int4(F.pad(zeros, (0, blocks_per_row % 2))).reshape(c, -1)
        self.blocks = [
            (blob[k].clone(), scales[k].clone(), None if zeros is None else zeros[k].clone()) for k in range(c)
        ]

    def _block(self, k: int, a: torch.Tensor) -> torch.Tensor:
        blob, scales, zeros = self.blocks[k]
        return torch.ops.mpdcompress.matmul_nbits(
            a,
            blob,
            scales.to(a.dtype),
            zeros,
            self.shape[2],
            self.shape[1],
            self.bits,
            self.block_size,
            self.accuracy_level,
        )


def matmulnbits_form_(model: nn.Module, int8_activations: bool) -> int:
    """Quantized linear layers (packed and dense) of ``model`` (an export copy) run as
    :class:`NBitsBlocks`: int4 layers always, int8 layers only with ``int8_activations`` (ONNX
    Runtime's 8-bit kernel with float activations ran 13-18x slower than float GEMMs here, so
    weight-only int8 keeps the dequantizing form, which ONNX Runtime folds to float). Returns the
    number of layers converted; quantized convolutions keep the dequantizing form."""
    level = INT8_ACTIVATIONS if int8_activations else WEIGHT_ONLY
    converted = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, (QuantizedBlockDiagonalLinear, QuantizedLinear)):
            continue
        if layer.bits == 8 and not int8_activations:
            continue
        set_export_form(layer, NBitsBlocks(layer.quantized_weight(), level, name or "model"))
        converted += 1
    return converted
