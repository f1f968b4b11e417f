"""Integer blocks: int8 rows and int4 groups, their dequantization, and CPU int8 GEMMs.

A packed layer's blocks, viewed as a matrix of ``c * max_rows`` rows by ``K`` inputs (a
convolution's kernel positions folded into ``K``), are stored as integers ``q`` with a float
scale per row (int8) or per group of ``group_size`` inputs along ``K`` (int4, two per byte,
low nibble first), and for asymmetric int4 an integer zero point per group:
``w = (q - zero) * scale``. Symmetric int4 keeps ``q + 8`` in the nibble (zero 8), so both int4
kinds share one unpacking. Dequantization follows torchao's ``dequantize_affine`` operation
for operation (integers to int32, minus the zero, to float, times the scale), so a quantized
layer and its dequantized float copy hold bit-identical weights.

Only the run-time side lives here (no torchao import): choosing scales is
:mod:`mpdcompress.core.quantize`'s job.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .torch_engine import tracing

__all__ = ["QuantizedWeight", "pack_int4", "unpack_int4", "DynamicInt8Blocks", "SYMMETRIC_INT4_ZERO"]

# The nibble that stands for zero in symmetric int4 (signed values -8..7 are stored as 0..15).
SYMMETRIC_INT4_ZERO = 8


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` integers in 0..15, ``K`` even → ``(..., K // 2)`` uint8, low nibble first."""
    v = values.to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``(..., K // 2)`` uint8 → ``(..., K)`` int32 in 0..15."""
    # In int32 from the start (exporters type the two halves alike only this way), and with
    # division instead of shifts and masks, which are not in the core ATen opset that
    # torch.export → ExecuTorch accepts.
    wide = packed.to(torch.int32)
    high = torch.div(wide, 16, rounding_mode="floor")
    return torch.stack((wide - 16 * high, high), dim=-1).flatten(-2)


@dataclass
class QuantizedWeight:
    """A packed layer's blocks in integer form.

    ``qweight``: int8 ``(c, max_rows, K)`` for 8 bits, uint8 ``(c, max_rows, ceil(K / 2))`` for
    4 bits (an odd ``K`` ends in one padding nibble that stands for zero);
    ``scales``: ``(c, max_rows, ceil(K / group_size))`` floats, one per row for int8 (whose
    ``group_size`` is ``K``); the last group of a row may be shorter than the others, so that no
    row stores more than its own inputs;
    ``zero_points``: uint8 like ``scales`` for asymmetric int4, else None;
    ``shape``: the float blocks' shape as the layer stores them (``K`` is its product past the
    first two dimensions for a linear layer's ``(c, rows, cols)``, past the first for a
    convolution's ``(c * rows, cols, *kernel)``).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    bits: int
    shape: tuple[int, ...]
    group_size: int

    @property
    def inputs(self) -> int:
        """``K``: the inputs of each row."""
        return math.prod(self.shape) // (self.qweight.shape[0] * self.qweight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dim(self) -> int:
        """Dimensions of the float blocks (what a packed layer's constructor checks)."""
        return len(self.shape)

    def _grouped(self, values: torch.Tensor) -> torch.Tensor:
        """``(..., stored inputs)`` → ``(..., groups, group_size)``, the short last group padded."""
        groups = self.scales.shape[-1]
        return F.pad(values, (0, groups * self.group_size - values.shape[-1])).unflatten(-1, (groups, -1))

    def integers(self) -> torch.Tensor:
        """``q - zero`` as int32 ``(c, max_rows, K)`` (``K + 1`` for an odd ``K`` at 4 bits)."""
        if self.bits == 8:
            return self.qweight.to(torch.int32)
        q = unpack_int4(self.qweight)
        if self.zero_points is None:
            return q - SYMMETRIC_INT4_ZERO
        zero = self.zero_points.to(torch.int32).unsqueeze(-1)
        return (self._grouped(q) - zero).flatten(-2)[..., : q.shape[-1]]

    def dequantize(self) -> torch.Tensor:
        """The float blocks, in the layer's stored shape, contiguous (a strided view would make
        the GEMMs round differently from a float layer holding the same values).

        Eager calls take the short way (:meth:`_dequantize_eager`: the forward of a quantized
        model runs this on every call); tracers get the same values from core ATen operators."""
        if tracing():
            q = self._grouped(self.integers()).to(self.scales.dtype)
            w = (q * self.scales.unsqueeze(-1)).flatten(-2)
            return w[..., : self.inputs].contiguous().reshape(self.shape)
        return self._dequantize_eager()

    def _dequantize_eager(self) -> torch.Tensor:
        """:meth:`dequantize` in as few passes over the weights as torch allows: int8 converted and
        times its row's scale in place (the integer converts exactly, the product rounds once); int4
        nibbles split with shifts, converted, minus the zero and times the scale in place. Each
        value is the traced form's: an integer minus its zero is exact in any float type, and
        only the product by the scale rounds."""
        if self.bits == 8:  # one scale per row (a promoting torch.mul of int8 by float ran 1.8x slower)
            return self.qweight.to(self.scales.dtype).mul_(self.scales).reshape(self.shape)
        q = self.qweight
        nibbles = torch.stack((q & 15, q >> 4), dim=-1).flatten(-2)
        w = self._grouped(nibbles).to(self.scales.dtype)
        w.sub_(SYMMETRIC_INT4_ZERO if self.zero_points is None else self.zero_points.unsqueeze(-1))
        w.mul_(self.scales.unsqueeze(-1))
        w = w.flatten(-2)[..., : self.inputs]
        return w.contiguous().reshape(self.shape)


class DynamicInt8Blocks:
    """int8 blocks run with int8 activations quantized on the fly (fbgemm / oneDNN on the CPU).

    Each block is prepacked once into the CPU backend's weight format; a forward quantizes each
    block's input (per tensor, from its range) and runs the backend's int8 GEMM, which on this
    hardware class is faster than a float GEMM over the same weights. It approximates the
    weight-only result (activations are rounded too), so it is opt-in.
    """

    def __init__(self, weight: QuantizedWeight) -> None:
        # int8 with one scale per row: QuantizedBlockDiagonalLinear refuses anything else.
        self.shape = tuple(weight.qweight.shape)
        zeros = torch.zeros(self.shape[1], dtype=torch.int64)
        with warnings.catch_warnings():
            # torch 2.13 deprecates quantized tensors, yet its CPU int8 GEMMs take their weights
            # only in that form; the tensor lives for the prepacking alone.
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            self._packed = [
                torch.ops.quantized.linear_prepack(
                    torch._make_per_channel_quantized_tensor(q, s.flatten().double(), zeros, 0), None
                )
                for q, s in zip(weight.qweight.cpu().unbind(0), weight.scales.float().cpu().unbind(0))
            ]

    def _block(self, k: int, a: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, so that int8 products cannot overflow on CPUs without
        # VNNI (what torch's own dynamic Linear does).
        return torch.ops.quantized.linear_dynamic(a.float().contiguous(), self._packed[k], True)

    def batch_major(self, a: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``a`` (c, batch, cols) → ``(batch, c * rows)``."""
        y = torch.cat([self._block(k, a[k]) for k in range(self.shape[0])], dim=1).to(a.dtype)
        return y if bias is None else y + bias

    def feature_major(self, a: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``a`` (c, cols, batch) → ``(c * rows, batch)``."""
        y = torch.cat([self._block(k, a[k].t()) for k in range(self.shape[0])], dim=1).to(a.dtype)
        return (y if bias is None else y + bias).t()
