"""Packed layers whose blocks are stored as int8 or int4 (made by :func:`mpdcompress.quantize_`).

A quantized layer keeps everything of its float packed layer (mask, gathers, bias, place in a
chain) and replaces the trainable ``weight_blocks`` by integer buffers (``qweight``, ``scales``,
``zero_points``, see :class:`~mpdcompress.kernels.quantized_blocks.QuantizedWeight`).
``weight_blocks`` is still readable: it dequantizes, and the engines multiply with exactly those
values, so a quantized model and its :func:`~mpdcompress.dequantize` copy compute the same
output. With ``activations="dynamic"`` (int8 linear layers on the CPU) the blocks run through
the CPU backend's int8 GEMMs instead, activations quantized on the fly.

:class:`QuantizedLinear` is the dense counterpart, for the ``nn.Linear`` layers a packed model
keeps (the classifier, a chain's folded head or tail): its weight is stored as one block.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layout import BlockLayout
from ..core.masks import MPDMask, check_incoming_mask
from ..errors import CompressionError
from ..kernels.quantized_blocks import SYMMETRIC_INT4_ZERO, DynamicInt8Blocks, QuantizedWeight
from ..kernels.torch_engine import BlockGemm, tracing
from .packed import BlockDiagonalLinear, PackedBlocks
from .packed_conv import BlockDiagonalConv

__all__ = [
    "ACTIVATIONS",
    "QuantizedBlocks",
    "QuantizedBlockDiagonalLinear",
    "QuantizedBlockDiagonalConv",
    "QuantizedLinear",
    "quantized_shapes",
    "quantized_problem",
    "zero_quantized_weight",
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


def zero_quantized_weight(blocks: torch.Tensor, c: int, rows: int, quantization: dict[str, Any]) -> QuantizedWeight:
    """The integer form of all-zero ``blocks`` (a skeleton a file's tensors are loaded into),
    made without torchao, on the device ``blocks`` lies on (meta for the size check)."""
    inputs = blocks.numel() // (c * rows)
    shapes = quantized_shapes(
        c, rows, inputs, quantization["bits"], quantization["group_size"], quantization["symmetric"]
    )
    device = blocks.device
    if quantization["bits"] == 8:
        qweight = torch.zeros(shapes["qweight"], dtype=torch.int8, device=device)
    else:  # a zero of symmetric int4 is the nibble 8; asymmetric zero points are 0 here
        nibble = SYMMETRIC_INT4_ZERO if quantization["symmetric"] else 0
        qweight = torch.full(shapes["qweight"], nibble * 0x11, dtype=torch.uint8, device=device)
    zeros = None
    if "zero_points" in shapes:
        zeros = torch.zeros(shapes["zero_points"], dtype=torch.uint8, device=device)
    scales = torch.ones(shapes["scales"], dtype=blocks.dtype, device=device)
    group = inputs if quantization["bits"] == 8 else quantization["group_size"]
    return QuantizedWeight(qweight, scales, zeros, quantization["bits"], tuple(blocks.shape), group)


def _check_incoming_weight(state_dict: dict, prefix: str, weight: QuantizedWeight, layout: BlockLayout) -> None:
    """Refuse integer tensors in ``state_dict`` that are no valid quantized form of ``weight``'s
    kind, before anything is copied; missing or misshapen ones are left to
    ``load_state_dict``, which reports them itself."""
    mine = {"qweight": weight.qweight, "scales": weight.scales, "zero_points": weight.zero_points}
    tensors = {name: state_dict.get(prefix + name) for name in mine}
    for name, tensor in tensors.items():
        ref = mine[name]
        if ref is None:  # symmetric: no zero points (one given is an unexpected key)
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.shape != ref.shape:
            return
        if tensor.dtype != ref.dtype and not (name == "scales" and tensor.is_floating_point()):
            raise CompressionError(f"{prefix}{name}: dtype {tensor.dtype}, expected {ref.dtype}")
    zeros = None if weight.zero_points is None else tensors["zero_points"]
    incoming = QuantizedWeight(
        tensors["qweight"], tensors["scales"], zeros, weight.bits, weight.shape, weight.group_size
    )
    problem = quantized_problem(incoming, layout)
    if problem is not None:
        raise CompressionError(f"{prefix}: {problem}")


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

    def engine_blocks(self, kernel_indices: bool) -> torch.Tensor | BlockGemm | QuantizedWeight:
        """The export form if set; for the Triton engine (``kernel_indices``) the integer blocks,
        which it dequantizes tile by tile; else the dequantized blocks, or the CPU's int8 GEMMs
        for dynamic activations."""
        if self.export_gemm is not None:
            return self.export_gemm
        if kernel_indices:
            return self.quantized_weight()
        if self.activations != "dynamic" or self.qweight.device.type != "cpu" or tracing():
            return self.weight_blocks
        return _dynamic_blocks(self, self.quantized_weight())

    def check_incoming(self, state_dict: dict, prefix: str) -> None:
        """Refuse a state whose mask is no permutation or whose integer blocks are not a valid
        quantized form of this layer (checked before anything is copied)."""
        check_incoming_mask(state_dict, prefix, *self.plane(), self.compression)
        _check_incoming_weight(state_dict, prefix, self.quantized_weight(), self.layout)

    def _apply(self, fn, recurse=True):
        self._dynamic = None  # prepacked for the old tensors
        return super()._apply(fn, recurse)


def _dynamic_blocks(module: nn.Module, weight: QuantizedWeight) -> DynamicInt8Blocks:
    """``weight`` prepacked for the CPU's int8 GEMMs, cached on ``module`` until its integer
    tensors change."""
    key = (weight.qweight.data_ptr(), weight.qweight._version, weight.scales.data_ptr(), weight.scales._version)
    if module._dynamic is None or module._dynamic[0] != key:
        module._dynamic = key, DynamicInt8Blocks(weight)
    return module._dynamic[1]


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


class QuantizedLinear(nn.Module):
    """A dense linear layer whose weight is stored as int8 or int4 (one block: int8 with a scale
    per output row, int4 with a scale per ``group_size`` inputs), made by
    :func:`~mpdcompress.quantize_` with ``dense_layers=True``.

    ``weight`` dequantizes on each read and the forward multiplies with exactly it, so the layer
    computes what an ``nn.Linear`` holding :meth:`dequantized` computes. The constructor builds
    the zero weight a state dict is loaded into (what a model file's architecture rebuilds);
    :meth:`from_weight` takes integer weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        activations: str = "float",
    ) -> None:
        super().__init__()
        from ..core.quantize import QuantConfig  # core.quantize builds these layers

        config = QuantConfig(bits, group_size, symmetric, activations)
        if config.group_size != group_size:
            raise CompressionError(f"a QuantizedLinear of {bits} bits needs its group_size given, got {group_size!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.activations = bits, group_size, activations
        quantization = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
        self._set_weight(
            zero_quantized_weight(torch.zeros(1, out_features, in_features), 1, out_features, quantization)
        )
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._dynamic: tuple[tuple, DynamicInt8Blocks] | None = None
        self.export_gemm: BlockGemm | None = None  # an export form runs the GEMM instead, as for packed layers

    @classmethod
    def from_weight(
        cls, weight: QuantizedWeight, bias: torch.Tensor | None, activations: str = "float"
    ) -> "QuantizedLinear":
        """The layer holding ``weight`` (one block of shape ``(1, out_features, in_features)``)."""
        if len(weight.shape) != 3 or weight.shape[0] != 1:
            raise CompressionError(f"a QuantizedLinear holds one block (1, out, in), got {weight.shape}")
        _, out_features, in_features = weight.shape
        group = None if weight.bits == 8 else weight.group_size
        with torch.device("meta"):  # the zero weight is replaced at once
            layer = cls(in_features, out_features, bias is not None, weight.bits, group, weight.zero_points is None)
        problem = quantized_problem(weight, BlockLayout.create(out_features, in_features, 1))
        if problem is not None:
            raise CompressionError(f"invalid quantized weight: {problem}")
        layer._set_weight(weight)
        layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if activations == "dynamic" and weight.bits != 8:
            raise CompressionError("dynamic int8 activations need int8 weights with one scale per row")
        layer.activations = activations
        return layer

    def _set_weight(self, weight: QuantizedWeight) -> None:
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zero_points", weight.zero_points)

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def quantized_weight(self) -> QuantizedWeight:
        """The integer weight as one object."""
        group = self.in_features if self.bits == 8 else self.group_size
        shape = (1, self.out_features, self.in_features)
        return QuantizedWeight(self.qweight, self.scales, self.zero_points, self.bits, shape, group)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``(out_features, in_features)`` weight (computed on each read)."""
        return self.quantized_weight().dequantize()[0]

    def dequantized(self) -> nn.Linear:
        """The float ``nn.Linear`` this layer computes, holding exactly its dequantized weight."""
        weight = self.weight
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        gemm = self.export_gemm
        if gemm is None and self.activations == "dynamic" and self.qweight.device.type == "cpu" and not tracing():
            gemm = _dynamic_blocks(self, self.quantized_weight())
        if gemm is None:
            return F.linear(input, self.weight, self.bias)
        y = gemm.batch_major(input.reshape(1, -1, self.in_features), self.bias)
        return y.reshape(*input.shape[:-1], self.out_features)

    def check_incoming(self, state_dict: dict, prefix: str) -> None:
        """Refuse integer tensors that are not a valid quantized weight of this layer."""
        layout = BlockLayout.create(self.out_features, self.in_features, 1)
        _check_incoming_weight(state_dict, prefix, self.quantized_weight(), layout)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.check_incoming(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._dynamic = None  # prepacked for the old tensors
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{_quantization_repr(self)}"
        )
