"""Quantization with error feedback (GPTQ, Frantar et al., 2023) over each block's kept weights.

Rounding each weight to its nearest level ignores what the layer's inputs make matter. GPTQ
quantizes a block one input column at a time and moves each column's rounding error onto the
columns not quantized yet, weighted by the inverse of ``H = Xᵀ X`` over calibration inputs, so
that the block's output on inputs like these changes least. MPD's blocks are small dense
matrices with their own inputs, so every block gets its own ``H`` (``cols × cols``) and all
blocks of a layer are processed together.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.convert import LayerFilter, _replace_modules, packed_layer_sources, unpack
from ..core.quantize import (
    QuantConfig,
    Scheme,
    group_parameters,
    integer_weight,
    quantize_,
    quantized_like,
    refuse_dynamic_convs,
    scheme,
    to_integers,
)
from ..errors import CompressionError, ConfigError
from ..nn.packed import BlockDiagonalLinear
from ..nn.packed_conv import BlockDiagonalConv
from .taps import evaluating, reiterable, run

__all__ = ["quantize_calibrated_", "block_hessians", "gptq_blocks"]


def block_hessians(
    model: nn.Module, batches: Iterable, layers: dict[str, BlockDiagonalLinear]
) -> dict[str, torch.Tensor]:
    """``Xᵀ X`` per block ``(c, cols, cols)`` of each packed layer over the calibration batches,
    from the inputs its masked form receives (a chain runs its layers inside one call, so the
    inputs are read from the unpacked model). Padding columns get zero rows and columns. In a
    batch with an ``attention_mask``, token positions it excludes (padding) do not count."""
    sources = packed_layer_sources(model)
    masked = unpack(model)
    sums: dict[str, torch.Tensor] = {}
    hooks = {}
    positions: dict[str, torch.Tensor | None] = {"kept": None}

    def kept_rows(x: torch.Tensor) -> torch.Tensor:
        keep = positions["kept"]
        if keep is not None and tuple(x.shape[:-1]) == tuple(keep.shape):
            return x[keep.to(x.device).bool()]
        return x.reshape(-1, x.shape[-1])

    for name, layer in layers.items():
        layout = layer.layout
        gather, valid = layer.in_gather, (layer.kernel_in_index >= 0).to(layer.in_gather.device)

        def add(x: torch.Tensor, name=name, gather=gather, valid=valid, layout=layout) -> None:
            xg = (kept_rows(x).double()[:, gather] * valid).view(-1, layout.compression, layout.max_cols)
            h = torch.einsum("nki,nkj->kij", xg, xg)
            sums[name] = h if name not in sums else sums[name] + h

        hooks[masked.get_submodule(sources[name][1])] = add
    with evaluating(masked):
        for batch in reiterable(batches):
            positions["kept"] = batch.get("attention_mask") if isinstance(batch, dict) else None
            run(masked, [batch], hooks)
    missing = sorted(set(layers) - set(sums))
    if missing:
        raise CompressionError(f"the calibration batches never reach these layers: {missing}")
    return sums


@torch.no_grad()
def gptq_blocks(
    blocks: torch.Tensor, hessian: torch.Tensor, config: QuantConfig, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Scheme]:
    """Integers, scales and zero points of ``blocks`` ``(c, rows, cols)`` chosen column by
    column with error feedback under ``hessian`` ``(c, cols, cols)``."""
    c, rows, cols = blocks.shape
    s = scheme(config, cols)
    padded = cols + (-cols % s.group)
    w = F.pad(blocks.detach().double(), (0, padded - cols))
    h = F.pad(hessian.double(), (0, padded - cols, 0, padded - cols))
    dead = torch.diagonal(h, dim1=1, dim2=2) == 0  # padding and inputs that never fire
    h = h + torch.diag_embed(dead.double())
    w[dead.unsqueeze(1).expand_as(w)] = 0
    mean = torch.diagonal(h, dim1=1, dim2=2).mean(-1)
    h = h + torch.diag_embed((damp * mean).unsqueeze(-1).expand(c, padded))
    try:
        inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError as exc:  # torch.linalg.LinAlgError derives from RuntimeError
        raise CompressionError(f"GPTQ: the calibration inputs' Gram matrix is not positive definite: {exc}") from None
    q = torch.empty(c, rows, padded, dtype=torch.int32)
    scales, zeros = [], []
    for start in range(0, padded, s.group):
        end = start + s.group
        group_scales, group_zeros = group_parameters(w[:, :, start:end].reshape(c * rows, -1).to(blocks.dtype), s)
        scales.append(group_scales.view(c, rows))
        zeros.append(None if group_zeros is None else group_zeros.view(c, rows))
        for j in range(start, end):
            column = w[:, :, j].reshape(c * rows, 1).to(blocks.dtype)
            level = to_integers(column, group_scales, group_zeros, s, group=1)
            q[:, :, j] = level.view(c, rows).to(torch.int32)
            offset = 0 if group_zeros is None else group_zeros
            value = ((level.to(torch.int32) - offset).to(group_scales.dtype) * group_scales).view(c, rows).double()
            error = (w[:, :, j] - value) / inverse[:, j, j].unsqueeze(-1)
            w[:, :, j + 1 :] -= error.unsqueeze(-1) * inverse[:, j, j + 1 :].unsqueeze(1)
    scales_t = torch.stack(scales, -1).to(blocks.dtype)
    zeros_t = None if zeros[0] is None else torch.stack(zeros, -1)
    return q, scales_t, zeros_t, s


def quantize_calibrated_(
    model: nn.Module,
    config: QuantConfig | str,
    batches: Iterable,
    *,
    filter_fn: LayerFilter | None = None,
    damp: float = 0.01,
) -> nn.Module:
    """:func:`~mpdcompress.quantize_` with GPTQ error feedback for packed linear layers (their
    inputs read over ``batches``, a list or DataLoader of what ``model`` takes); packed
    convolutions are rounded to nearest. In place; returns ``model``."""
    config = QuantConfig.of(config)
    if not 0 <= damp < 1:
        raise ConfigError(f"damp must be in [0, 1), got {damp!r}")
    selected = {
        name: layer
        for name, (layer, _) in packed_layer_sources(model).items()
        if type(layer) in (BlockDiagonalLinear, BlockDiagonalConv) and (filter_fn is None or filter_fn(layer, name))
    }
    refuse_dynamic_convs(config, selected)
    linear = {name: layer for name, layer in selected.items() if type(layer) is BlockDiagonalLinear}
    convs = {id(layer) for layer in selected.values() if type(layer) is BlockDiagonalConv}
    if not linear:
        raise CompressionError("nothing to calibrate: no packed linear layer is selected (pack() the model first)")
    hessians = block_hessians(model, batches, linear)
    chosen = {}
    for name, layer in linear.items():
        q, scales, zeros, s = gptq_blocks(layer.weight_blocks, hessians[name], config, damp)
        weight = integer_weight(q, scales, zeros, s, config.bits, tuple(layer.weight_blocks.shape))
        chosen[id(layer)] = quantized_like(layer, weight, config.activations)
    _replace_modules(model, lambda m: chosen.get(id(m)))
    if convs:
        quantize_(model, config, filter_fn=lambda m, _: id(m) in convs)
    return model
