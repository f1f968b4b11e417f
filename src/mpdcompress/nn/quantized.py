"""Packed layers whose blocks are stored as int8 or int4 (made by :func:`mpdcompress.quantize_`).

A quantized layer keeps everything of its float packed layer (mask, gathers, bias, place in a
chain) and replaces the trainable ``weight_blocks`` by integer buffers (``qweight``, ``scales``,
``zero_points``, see :class:`~mpdcompress.kernels.quantized_blocks.QuantizedWeight`).
``weight_blocks`` is still readable: it dequantizes, and the engines multiply with exactly those
values, so a quantized model and its :func:`~mpdcompress.dequantize` copy compute the same
output. With ``activations="dynamic"`` (int8 linear layers on the CPU) the blocks run through
the CPU backend's int8 GEMMs instead, activations quantized on the fly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.layout import BlockLayout
from ..core.masks import MPDMask, check_incoming_mask
from ..errors import CompressionError
from ..kernels.quantized_blocks import DynamicInt8Blocks, QuantizedWeight
from .packed import BlockDiagonalLinear, PackedBlocks
from .packed_conv import BlockDiagonalConv

__all__ = [
    "ACTIVATIONS",
    "QuantizedBlocks",
    "QuantizedBlockDiagonalLinear",
    "QuantizedBlockDiagonalConv",
    "quantized_shapes",
    "quantized_problem",
]

ACTIVATIONS = ("float", "dynamic")


def quantized_shapes(
    c: int, rows: int, inputs: int, bits: int, group_size: int | None, symmetric: bool
) -> dict[str, tuple[int, ...]]:
    """Buffer name → shape of the integer form of ``c`` blocks of ``rows`` rows by ``inputs``
    inputs (``group_size`` None: one group per row, as int8 always has)."""
    groups = 1 if group_size is None else math.ceil(inputs / group_size)
    shapes = {"qweight": (c, rows, inputs if bits == 8 else math.ceil(inputs / 2)), "scales": (c, rows, groups)}
    if not symmetric:
        shapes["zero_points"] = (c, rows, groups)
    return shapes


def quantized_problem(weight: QuantizedWeight, layout: BlockLayout) -> str | None:
    """What makes ``weight`` no valid quantized form of packed blocks of ``layout``, or None:
    scales that are not finite and positive, zero points outside 0..15, or padding (block
    padding, or the nibble that ends a row of odd length) that does not dequantize to zero.
    Checked on every load, before the values reach a module."""
    scales = weight.scales
    if not scales.is_floating_point() or not bool((torch.isfinite(scales) & (scales > 0)).all()):
        return "scales are not all finite and positive"
    if weight.zero_points is not None and bool((weight.zero_points > 15).any()):
        return "zero_points lie outside 0..15"
    q = weight.integers()
    if bool(q[..., weight.inputs :].any()):
        return "qweight is not zero in the nibble that pads its rows"
    blocks = weight.dequantize().reshape(layout.compression, layout.max_rows, layout.max_cols, -1)
    if layout.nonzero_padding(blocks, None) is not None:
        return "qweight is not zero on the blocks' padding"
    return None


class QuantizedBlocks(PackedBlocks):
    """What quantized packed layers share: integer buffers in place of ``weight_blocks``."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    activations: str = "float"

    def _init_blocks(self, mask: MPDMask, weight_blocks: QuantizedWeight, bias: torch.Tensor | None) -> None:
        if not isinstance(weight_blocks, QuantizedWeight):
            raise CompressionError(f"a quantized layer takes a QuantizedWeight, got {type(weight_blocks).__name__}")
        self.bits = weight_blocks.bits
        self._group_size = weight_blocks.group_size
        # A Python tuple: reading the block count from its buffer in forward would stop
        # torch.export (and sync a GPU).
        self.float_shape = tuple(weight_blocks.shape)
        self.register_buffer("qweight", weight_blocks.qweight)
        self.register_buffer("scales", weight_blocks.scales)
        self.register_buffer("zero_points", weight_blocks.zero_points)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._dynamic: tuple[tuple, DynamicInt8Blocks] | None = None
        self._init_mask(mask, weight_blocks.device)
        problem = quantized_problem(weight_blocks, mask.layout)
        if problem is not None:
            raise CompressionError(f"invalid quantized blocks: {problem}")

    @property
    def group_size(self) -> int | None:
        """Inputs per scale (None: one scale per row)."""
        return None if self.bits == 8 else self._group_size

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def quantized_weight(self) -> QuantizedWeight:
        """The integer blocks as one object."""
        return QuantizedWeight(
            self.qweight, self.scales, self.zero_points, self.bits, self.float_shape, self._group_size
        )

    @property
    def weight_blocks(self) -> torch.Tensor:
        """The dequantized float blocks (computed on each read)."""
        return self.quantized_weight().dequantize()

    def engine_blocks(self, kernel_indices: bool) -> torch.Tensor | DynamicInt8Blocks:
        if self.activations != "dynamic" or kernel_indices or self.qweight.device.type != "cpu" or _tracing():
            return self.weight_blocks
        key = (self.qweight.data_ptr(), self.qweight._version, self.scales.data_ptr(), self.scales._version)
        if self._dynamic is None or self._dynamic[0] != key:
            self._dynamic = key, DynamicInt8Blocks(self.quantized_weight())
        return self._dynamic[1]

    def check_incoming(self, state_dict: dict, prefix: str) -> None:
        """Refuse a state whose mask is no permutation or whose integer blocks are not a valid
        quantized form of this layer (checked before anything is copied)."""
        check_incoming_mask(state_dict, prefix, *self.plane(), self.compression)
        tensors = {name: state_dict.get(prefix + name) for name in ("qweight", "scales", "zero_points")}
        mine = {"qweight": self.qweight, "scales": self.scales, "zero_points": self.zero_points}
        for name, tensor in tensors.items():
            ref = mine[name]
            if ref is None or not isinstance(tensor, torch.Tensor) or tensor.shape != ref.shape:
                return  # missing or misshapen: load_state_dict reports it itself
            if tensor.dtype != ref.dtype and not (name == "scales" and tensor.is_floating_point()):
                raise CompressionError(f"{prefix}{name}: dtype {tensor.dtype}, expected {ref.dtype}")
        incoming = QuantizedWeight(
            tensors["qweight"], tensors["scales"], tensors["zero_points"], self.bits, self.float_shape, self._group_size
        )
        problem = quantized_problem(incoming, self.layout)
        if problem is not None:
            raise CompressionError(f"{prefix}: {problem}")

    def _apply(self, fn, recurse=True):
        self._dynamic = None  # prepacked for the old tensors
        return super()._apply(fn, recurse)


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


class QuantizedBlockDiagonalLinear(QuantizedBlocks, BlockDiagonalLinear):
    """A :class:`BlockDiagonalLinear` with int8 or int4 blocks (``activations``: ``"float"``, or
    ``"dynamic"`` for int8 activations in the CPU's int8 GEMMs)."""

    def __init__(
        self, mask: MPDMask, weight: QuantizedWeight, bias: torch.Tensor | None, *, activations: str = "float"
    ) -> None:
        if activations not in ACTIVATIONS:
            raise CompressionError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
        if activations == "dynamic" and (weight.bits != 8 or weight.scales.shape[-1] != 1):
            raise CompressionError("dynamic int8 activations need int8 weights with one scale per row")
        super().__init__(mask, weight, bias)
        self.activations = activations

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_quantization_repr(self)}"


class QuantizedBlockDiagonalConv(QuantizedBlocks, BlockDiagonalConv):
    """A :class:`BlockDiagonalConv` with int8 or int4 blocks (weight-only)."""

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_quantization_repr(self)}"


def _quantization_repr(layer: QuantizedBlocks) -> str:
    kind = f"int{layer.bits}"
    if layer.group_size is not None:
        kind += f", group_size={layer.group_size}"
    if not layer.symmetric:
        kind += ", asymmetric"
    if layer.activations == "dynamic":
        kind += ", dynamic int8 activations"
    return kind
