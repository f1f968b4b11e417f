"""Folding BatchNorm into the convolution (or linear layer) before it, for inference.

In eval mode a BatchNorm is a per-channel affine map, ``y = s * x + t`` with ``s = γ / √(σ² + ε)``
and ``t = β - s * μ``; right after a convolution it is the same as scaling that convolution's
output rows by ``s`` and adding ``t`` to its bias. On a CPU an unfused BatchNorm costs a full pass
over the activations: measured inside a packed ResNet-18 at c = 8 (channels-last, batch 64) it was
a third of the forward, since the grouped convolutions around it had become cheap.

Packed layers fold like dense ones: a BatchNorm inside a :class:`PackedConvChain` already runs in
the block order of the convolution before it, so its scales and shifts multiply the grouped
convolution's rows directly; padding rows keep a zero bias, so they stay what they were, zero.
A folded BatchNorm becomes ``nn.Identity`` in place (keys and positions of everything else are
kept). What is folded cannot train as a BatchNorm any more: this is the last step before
deployment, on a model in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CompressionError
from ..nn.conv_chain import DENSE_CONVS, PackedConvChain, valid_input_positions
from ..nn.packed_conv import BlockDiagonalConv
from ..nn.quantized import QuantizedBlockDiagonalConv

__all__ = ["fold_batchnorm_"]

# The BatchNorm that normalizes the channels of each convolution's output, by kernel dimensions.
_NORM_OF = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_NORMS = tuple(_NORM_OF.values())


def fold_batchnorm_(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a 1-D or 2-D convolution (dense, masked or
    packed; in a ``Sequential`` or inside a packed chain) into that convolution, in place; each
    folded BatchNorm becomes ``nn.Identity``. The model must be in eval mode (folding uses the
    running statistics). BatchNorms after anything else (a linear layer's features need not be
    the channels a ``BatchNorm1d`` normalizes), without running statistics, or after a quantized
    layer are left as they are. Returns ``model``; for inference only."""
    if not isinstance(model, nn.Module):
        raise CompressionError(f"fold_batchnorm_ takes a torch.nn.Module, got {type(model).__name__}")
    training = [name for name, m in model.named_modules() if isinstance(m, _NORMS) and m.training]
    if training:
        where = f"the BatchNorm {training[0]!r}" if training[0] else "the model"
        raise CompressionError(
            f"fold_batchnorm_ folds running statistics, but {where} is in training mode: call model.eval() first"
        )
    for module in list(model.modules()):
        if isinstance(module, PackedConvChain):
            _fold_chain(module)
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            pairs = list(module._modules.items())
            for (_, layer), (key, norm) in zip(pairs, pairs[1:]):
                if _foldable(norm) and _fold_into(layer, norm):
                    module._modules[key] = nn.Identity()
    return model


def _foldable(norm: nn.Module) -> bool:
    return type(norm) in _NORMS and norm.running_mean is not None and norm.running_var is not None


def _scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` of the BatchNorm's affine map, in float64 until they are applied."""
    var, mean = norm.running_var.double(), norm.running_mean.double()
    weight = torch.ones_like(var) if norm.weight is None else norm.weight.double()
    bias = torch.zeros_like(var) if norm.bias is None else norm.bias.double()
    scale = weight / torch.sqrt(var + norm.eps)
    return scale, bias - scale * mean


@torch.no_grad()
def _fold_into(layer: nn.Module, norm: nn.Module) -> bool:
    """Fold ``norm`` (in ``layer``'s own output order) into ``layer``; False if it cannot be."""
    convolution = isinstance(layer, (*DENSE_CONVS, BlockDiagonalConv))  # masked MPDConv1d/2d included
    if not convolution or isinstance(layer, QuantizedBlockDiagonalConv):
        return False
    if type(norm) is not _NORM_OF[len(layer.kernel_size)] or norm.num_features != layer.out_channels:
        return False
    scale, shift = _scale_shift(norm)
    if not isinstance(layer, BlockDiagonalConv):
        # Masked layers keep their mask: scaling rows leaves off-mask weights at zero.
        _scale_rows(layer, "weight", scale, shift)
        return True
    # The packed rows are in padded block order: output channel o sits at out_gather[o].
    rows = layer.layout.compression * layer.layout.max_rows
    padded_scale = torch.ones(rows, dtype=torch.float64, device=scale.device)
    padded_shift = torch.zeros(rows, dtype=torch.float64, device=scale.device)
    padded_scale[layer.out_gather.to(scale.device)] = scale
    padded_shift[layer.out_gather.to(scale.device)] = shift
    _scale_rows(layer, "weight_blocks", padded_scale, padded_shift)
    return True


def _scale_rows(layer: nn.Module, name: str, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Scale the output rows of ``layer``'s weight ``name`` by ``scale`` and set its bias to
    ``bias * scale + shift`` (in the weight's row order)."""
    weight = getattr(layer, name)
    shape = (-1, *[1] * (weight.dim() - 1))
    weight.copy_((weight.double() * scale.view(shape)).to(weight.dtype))
    old = torch.zeros_like(scale) if layer.bias is None else layer.bias.double()
    bias = (old * scale + shift).to(weight.dtype)
    layer.bias = nn.Parameter(bias, requires_grad=weight.requires_grad)


@torch.no_grad()
def _fold_chain(chain: PackedConvChain) -> None:
    """Fold the BatchNorm leading each gap of ``chain`` into the layer before it; those
    BatchNorms run in that layer's padded block order already."""
    if chain.head is not None and chain.head_gap is not None and _foldable(_leading(chain.head_gap)):
        scale, shift = _scale_shift(_leading(chain.head_gap))
        valid = torch.zeros_like(scale, dtype=torch.bool)
        valid[valid_input_positions(chain.layers[0]).to(valid.device)] = True
        # Padding channels of the head stay zero; the first layer multiplies them by zero anyway.
        _scale_rows(chain.head, "weight", scale, shift * valid)
        chain.head_gap[0] = nn.Identity()
    gaps = [*chain.gaps, chain.tail_gap]
    for layer, gap in zip(chain.layers, gaps):
        if gap is None or isinstance(layer, QuantizedBlockDiagonalConv) or not _foldable(_leading(gap)):
            continue
        scale, shift = _scale_shift(_leading(gap))
        valid = torch.zeros_like(scale, dtype=torch.bool)
        valid[layer.out_gather.to(valid.device)] = True
        _scale_rows(layer, "weight_blocks", scale, shift * valid)
        gap[0] = nn.Identity()


def _leading(gap: nn.Sequential) -> nn.Module | None:
    return gap[0] if len(gap) else None
