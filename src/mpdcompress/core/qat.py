"""Quantization-aware training of packed models: the blocks train as :func:`quantize_` will store
them.

:func:`fake_quantize_` makes every selected packed layer multiply with its blocks rounded to
their int8 / int4 levels (the same function :func:`quantize_` applies, so nothing differs at
conversion) while the optimizer keeps updating the float blocks: the gradient passes the
rounding unchanged (straight-through estimator), and the scales follow the weights at every
step. After training, :func:`quantize_` with the same config stores exactly the blocks the last
forward multiplied with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CompressionError
from ..nn.packed import PackedBlocks
from .convert import LayerFilter
from .quantize import QuantConfig, float_packed_layers, quantize_weight

__all__ = ["FakeQuantizer", "fake_quantize_", "fake_quantized_layers"]


@dataclass(frozen=True)
class FakeQuantizer:
    """Blocks of ``compression`` × ``rows`` rows → the same blocks rounded as ``config`` stores
    them, with the identity as gradient."""

    config: QuantConfig
    compression: int
    rows: int

    def __call__(self, blocks: torch.Tensor) -> torch.Tensor:
        rounded = quantize_weight(blocks, self.compression, self.rows, self.config).dequantize()
        # rounded + exactly zero, so the values are the rounded ones bit for bit (blocks + (rounded -
        # blocks) is not), and the gradient reaches the float blocks unchanged.
        return rounded.to(blocks.dtype) + (blocks - blocks.detach())


def fake_quantized_layers(model: nn.Module) -> dict[str, PackedBlocks]:
    """Qualified name → packed layer that trains quantization-aware, for every one in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedBlocks) and m.fake_quant is not None}


def fake_quantize_(
    model: nn.Module, config: QuantConfig | str | None = None, *, filter_fn: LayerFilter | None = None
) -> nn.Module:
    """Prepare a packed model for quantization-aware training, in place; returns ``model``.

    Every packed layer (``filter_fn(module, name)`` selects some) runs with its blocks rounded as
    ``config`` (a :class:`QuantConfig` or its name; int8 by default) will store them; train as
    usual (the float blocks are the parameters), then call :func:`quantize_` with the same
    config. Weight rounding only: dynamic int8 activations are not simulated. The setting is not
    part of ``state_dict`` or model files: after loading a checkpoint, call this again.
    """
    config = QuantConfig.of(config)
    selected = float_packed_layers(model, filter_fn, "fake_quantize_")
    if not selected:
        raise CompressionError("nothing to prepare: the model has no float packed layer (that filter_fn selects)")
    for layer in selected.values():
        layout = layer.layout
        layer.fake_quant = FakeQuantizer(config, layout.compression, layout.max_rows)
    return model
