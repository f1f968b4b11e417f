"""Quantize a packed model's blocks to int8 or int4 (``quantize_``) and back (``dequantize``).

MPD's blocks are small dense matrices, so they quantize like any dense weight and keep running
as dense kernels. Scales and zero points come from torchao's quantization primitives
(``pip install "mpdcompress[quant]"``); running a quantized model needs no torchao.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CompressionError, ConfigError, MissingDependencyError
from ..kernels.quantized_blocks import SYMMETRIC_INT4_ZERO, QuantizedWeight, pack_int4
from ..nn.masked import MaskedWeight
from ..nn.packed import BlockDiagonalLinear, PackedBlocks
from ..nn.packed_conv import BlockDiagonalConv
from ..nn.quantized import (
    ACTIVATIONS,
    QuantizedBlockDiagonalConv,
    QuantizedBlockDiagonalLinear,
    QuantizedBlocks,
    QuantizedLinear,
)
from .convert import LayerFilter, _replace_modules

__all__ = [
    "QuantConfig",
    "quantize_",
    "dequantize",
    "quantize_weight",
    "quantized_layers",
    "quantized_like",
    "dense_linear_layers",
    "refuse_dynamic_convs",
    "Scheme",
    "scheme",
    "group_parameters",
    "to_integers",
    "integer_weight",
]


@dataclass(frozen=True)
class QuantConfig:
    """How :func:`quantize_` stores a packed model's blocks.

    ``bits=8``: int8 with one symmetric scale per output row. ``bits=4``: int4 with a scale per
    ``group_size`` inputs of each row (32 by default; 64 and 128 store fewer scales), symmetric,
    or with a zero point per group (``symmetric=False``). ``activations="float"`` (default) keeps
    activations in float (weight-only: the output equals the dequantized model's exactly);
    ``"dynamic"`` runs int8 linear layers through the CPU's int8 GEMMs with activations quantized
    on the fly (faster on the CPU, not exact).
    """

    bits: Literal[8, 4] = 8
    group_size: int | None = None
    symmetric: bool = True
    activations: Literal["float", "dynamic"] = "float"

    def __post_init__(self) -> None:
        if self.bits not in (8, 4) or isinstance(self.bits, bool):
            raise ConfigError(f"bits must be 8 or 4, got {self.bits!r}")
        if self.activations not in ACTIVATIONS:
            raise ConfigError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.bits == 8:
            if self.group_size is not None or not self.symmetric:
                raise ConfigError("int8 blocks have one symmetric scale per output row: drop group_size / symmetric")
            return
        if self.group_size is None:
            object.__setattr__(self, "group_size", 32)
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 2 or size % 2:
            raise ConfigError(f"group_size must be a positive even int, got {size!r}")
        if self.activations == "dynamic":
            raise ConfigError("dynamic activations run int8 GEMMs: they need bits=8")

    @classmethod
    def parse(cls, text: str) -> "QuantConfig":
        """``int8``, ``int8-dynamic``, ``int4``, ``int4-g64``, ``int4-asym``, ``int4-g128-asym``."""
        parts = text.lower().split("-")
        if parts[0] not in ("int8", "int4"):
            raise ConfigError(f"unknown quantization {text!r}: expected int8, int8-dynamic, int4[-gN][-asym]")
        options: dict = {"bits": int(parts[0][3:])}
        for part in parts[1:]:
            if part == "dynamic":
                options["activations"] = "dynamic"
            elif part == "asym":
                options["symmetric"] = False
            elif part.startswith("g") and part[1:].isdigit():
                options["group_size"] = int(part[1:])
            else:
                raise ConfigError(f"unknown quantization option {part!r} in {text!r}")
        return cls(**options)

    @classmethod
    def of(cls, config: "QuantConfig | str | None") -> "QuantConfig":
        """``config`` as a QuantConfig: itself, its name parsed, or the default (int8) for None."""
        if config is None:
            return cls()
        if isinstance(config, str):
            return cls.parse(config)
        if not isinstance(config, cls):
            raise ConfigError(f"config must be a QuantConfig or its name, got {type(config).__name__}")
        return config

    def describe(self) -> str:
        """The name :meth:`parse` reads back."""
        name = f"int{self.bits}"
        if self.bits == 4:
            name += f"-g{self.group_size}" + ("" if self.symmetric else "-asym")
        return name + ("-dynamic" if self.activations == "dynamic" else "")


def _primitives():
    try:
        from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine
    except ImportError as exc:
        raise MissingDependencyError(
            f'quantizing needs torchao (pip install "mpdcompress[quant]"): {exc}; running a quantized model does not'
        ) from None
    return MappingType, choose_qparams_affine, quantize_affine


@dataclass(frozen=True)
class Scheme:
    """How a config maps floats to integers: inputs per scale, the integer type and range."""

    group: int
    target: torch.dtype
    low: int
    high: int
    symmetric: bool


def scheme(config: QuantConfig, inputs: int) -> Scheme:
    """The integer scheme of ``config`` for rows of ``inputs`` inputs."""
    if config.bits == 8:
        return Scheme(inputs, torch.int8, -128, 127, True)
    if config.symmetric:
        return Scheme(config.group_size, torch.int8, -8, 7, True)
    return Scheme(config.group_size, torch.uint8, 0, 15, False)


def group_parameters(w: torch.Tensor, s: Scheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torchao's scales and zero points of ``w`` ``(rows, groups * group)``, one per row and group."""
    MappingType, choose_qparams_affine, _ = _primitives()
    mapping = MappingType.SYMMETRIC if s.symmetric else MappingType.ASYMMETRIC
    groups = w.shape[1] // s.group
    # torchao reduces over everything when a block is a single element (a block of one
    # column at int8): the same scales come from the row written twice.
    probe, block = (torch.cat([w, w], 1), (1, 2)) if s.group == 1 else (w, (1, s.group))
    scales, zeros = choose_qparams_affine(
        probe, mapping, block, s.target, s.low, s.high, scale_dtype=w.dtype, zero_point_dtype=torch.int32
    )
    # Reshaped explicitly: torchao's result drops dimensions of size one.
    return scales.reshape(-1, groups), None if zeros is None else zeros.reshape(-1, groups)


def to_integers(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, s: Scheme, group: int | None = None
) -> torch.Tensor:
    """torchao's ``quantize_affine`` of ``w`` ``(rows, groups * group)`` (``group``: inputs per
    scale in ``w``, the scheme's by default; 1 for a single column)."""
    _, _, quantize_affine = _primitives()
    return quantize_affine(w, (1, group or s.group), scales, zeros, s.target, s.low, s.high)


def integer_weight(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, s: Scheme, bits: int, shape: tuple[int, ...]
) -> QuantizedWeight:
    """Store integers ``q`` ``(c, rows, groups * group)`` (in the scheme's range) with their
    parameters ``(c, rows, groups)`` as a :class:`QuantizedWeight` of float blocks ``shape``."""
    scales = scales.contiguous()
    if bits == 8:
        return QuantizedWeight(q.to(torch.int8).contiguous(), scales, None, 8, shape, s.group)
    inputs = math.prod(shape) // (q.shape[0] * q.shape[1])
    q = q[..., : inputs + inputs % 2].to(torch.int16)  # a row's own inputs, in whole bytes
    if s.symmetric:
        return QuantizedWeight(pack_int4(q + SYMMETRIC_INT4_ZERO), scales, None, 4, shape, s.group)
    return QuantizedWeight(pack_int4(q), scales, zeros.to(torch.uint8).contiguous(), 4, shape, s.group)


@torch.no_grad()
def quantize_weight(blocks: torch.Tensor, c: int, rows: int, config: QuantConfig) -> QuantizedWeight:
    """Quantize packed blocks (in the layer's stored shape, ``c`` blocks of ``rows`` rows) by
    rounding to the nearest level."""
    w = blocks.detach().reshape(c, rows, -1)
    s = scheme(config, w.shape[-1])
    # Whole groups for torchao; the short last group's padding is quantized as zeros.
    w = F.pad(w, (0, -w.shape[-1] % s.group)).reshape(c * rows, -1)
    scales, zeros = group_parameters(w, s)
    q = to_integers(w, scales, zeros, s).reshape(c, rows, -1)
    zeros = None if zeros is None else zeros.reshape(c, rows, -1)
    return integer_weight(q, scales.reshape(c, rows, -1), zeros, s, config.bits, tuple(blocks.shape))


def quantized_layers(model: nn.Module) -> dict[str, QuantizedBlocks | QuantizedLinear]:
    """Qualified name → quantized layer (packed or dense), for every one in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantizedBlocks, QuantizedLinear))}


def quantized_like(
    layer: PackedBlocks, weight: QuantizedWeight, activations: str = "float", bias: torch.Tensor | None = None
) -> QuantizedBlocks:
    """The quantized layer that takes ``layer``'s place with blocks ``weight``: same mask, same
    convolution arguments, ``layer``'s bias (or ``bias``)."""
    if bias is None and layer.bias is not None:
        bias = layer.bias.detach()
    if isinstance(layer, BlockDiagonalConv):
        if activations == "dynamic":
            raise CompressionError("dynamic int8 activations are for linear layers; convolutions stay weight-only")
        return QuantizedBlockDiagonalConv(
            layer.mpd_mask, weight, bias, stride=layer.stride, padding=layer.padding, dilation=layer.dilation
        )
    return QuantizedBlockDiagonalLinear(layer.mpd_mask, weight, bias, activations=activations)


def refuse_dynamic_convs(config: QuantConfig, layers: dict[str, nn.Module]) -> None:
    """Refuse, before any layer is changed, dynamic activations for the convolutions among the
    selected ``layers`` (by name): a half-quantized model must not be left behind."""
    convs = [name for name, layer in layers.items() if isinstance(layer, BlockDiagonalConv)]
    if config.activations == "dynamic" and convs:
        raise CompressionError(
            f"dynamic int8 activations are for linear layers; these are convolutions: {convs[:5]} "
            "(quantize them weight-only, or leave them out with filter_fn)"
        )


def _quantized(layer: PackedBlocks, config: QuantConfig) -> QuantizedBlocks:
    layout = layer.layout
    weight = quantize_weight(layer.weight_blocks, layout.compression, layout.max_rows, config)
    return quantized_like(layer, weight, config.activations)


def float_packed_layers(model: nn.Module, filter_fn: LayerFilter | None, caller: str) -> dict[str, PackedBlocks]:
    """Qualified name → float packed layer of ``model`` that ``filter_fn`` selects (all without
    it); ``caller`` refuses by name a masked model, or selected layers with no values yet."""
    if any(isinstance(m, MaskedWeight) for m in model.modules()):
        raise CompressionError(f"{caller} takes a packed model: call pack() first (masked layers hold dense weights)")
    selected = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, PackedBlocks)
        and not isinstance(m, QuantizedBlocks)
        and (filter_fn is None or filter_fn(m, name))
    }
    _refuse_meta([m.weight_blocks for m in selected.values()], caller)
    return selected


def _refuse_meta(weights: list[torch.Tensor], caller: str) -> None:
    if any(w.device.type == "meta" for w in weights):
        raise CompressionError(f"{caller} cannot take a model on the meta device: its weights have no values yet")


def dense_linear_layers(model: nn.Module, filter_fn: LayerFilter | None, caller: str) -> dict[str, nn.Linear]:
    """Qualified name → ``nn.Linear`` of ``model`` that ``filter_fn`` selects (all without it):
    the dense layers a packed model keeps (the classifier, a chain's folded head or tail)."""
    selected = {
        name: m
        for name, m in model.named_modules()
        if type(m) is nn.Linear and (filter_fn is None or filter_fn(m, name))
    }
    _refuse_meta([m.weight for m in selected.values()], caller)
    return selected


def _quantized_linear(linear: nn.Linear, config: QuantConfig) -> QuantizedLinear:
    weight = quantize_weight(linear.weight.detach()[None], 1, linear.out_features, config)
    return QuantizedLinear.from_weight(weight, linear.bias, config.activations)


def quantize_(
    model: nn.Module,
    config: QuantConfig | str | None = None,
    *,
    filter_fn: LayerFilter | None = None,
    dense_layers: bool = False,
) -> nn.Module:
    """Quantize the blocks of every packed layer of ``model`` in place (``filter_fn(module, name)``
    selects some), torchao-style; returns ``model``.

    ``config``: a :class:`QuantConfig` or its name (``"int8"``, ``"int4"``, ``"int4-g64-asym"``,
    ...); int8 weight-only by default. Dense layers (the classifier, a chain's folded head or
    tail) stay float unless ``dense_layers``: then every ``nn.Linear`` that ``filter_fn``
    selects becomes a :class:`~mpdcompress.QuantizedLinear` of the same format (a model with no
    packed layer, quantized this way, is the dense baseline a user would try first). The model
    must be packed (:func:`~mpdcompress.pack`) or dense. Layers prepared by
    :func:`~mpdcompress.fake_quantize_` store exactly the blocks their last forward used; they
    must be quantized with the config they trained for.
    """
    config = QuantConfig.of(config)
    named = float_packed_layers(model, filter_fn, "quantize_")
    dense = dense_linear_layers(model, filter_fn, "quantize_") if dense_layers else {}
    refuse_dynamic_convs(config, named)
    trained_for = {name: m.fake_quant.config for name, m in named.items() if m.fake_quant is not None}
    mismatched = {name: other.describe() for name, other in trained_for.items() if other != config}
    if mismatched:
        raise CompressionError(
            f"these layers trained quantization-aware for another format than {config.describe()}: "
            f"{dict(list(mismatched.items())[:5])}; quantize them with the config they trained for"
        )
    selected = {id(m) for m in named.values()}
    selected_dense = {id(m) for m in dense.values()}
    if not selected and not selected_dense:
        kind = "packed or dense linear" if dense_layers else "packed"
        already = bool(quantized_layers(model))
        raise CompressionError(
            "nothing to quantize: "
            + (f"every {kind} layer selected is quantized already" if already else f"the model has no {kind} layer")
            + ("" if dense_layers else " (dense_layers=True quantizes its nn.Linear layers)")
        )

    def quantized(module: nn.Module) -> nn.Module | None:
        if id(module) in selected:
            return _quantized(module, config)
        return _quantized_linear(module, config) if id(module) in selected_dense else None

    replaced = _replace_modules(model, quantized)
    if replaced is not model:
        raise CompressionError("quantize_ works in place: pass the model that holds the packed layer, not the layer")
    return model


def dequantize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The float model a quantized one computes: every quantized packed layer back to a float
    packed layer, every :class:`~mpdcompress.QuantizedLinear` back to an ``nn.Linear``, each
    holding exactly its dequantized weights. Unless ``inplace``, ``model`` is untouched."""
    if not quantized_layers(model):
        raise CompressionError("nothing to dequantize: the model has no quantized layer")
    if not inplace:
        model = copy.deepcopy(model)
    return _replace_modules(model, _dequantized)


@torch.no_grad()
def _dequantized(module: nn.Module) -> nn.Module | None:
    if isinstance(module, QuantizedLinear):
        return module.dequantized()
    if not isinstance(module, QuantizedBlocks):
        return None
    weights = module.weight_blocks
    bias = None if module.bias is None else module.bias.detach().clone()
    if isinstance(module, BlockDiagonalConv):
        return BlockDiagonalConv(
            module.mpd_mask, weights, bias, stride=module.stride, padding=module.padding, dilation=module.dilation
        )
    return BlockDiagonalLinear(module.mpd_mask, weights, bias)
