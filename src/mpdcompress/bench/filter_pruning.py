"""L1-norm filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017): what a
CNN user picks instead of MPD for a trained model, a thinner dense network that keeps the
filters with the largest weights.

Every inner width (a convolution's output channels, a hidden linear layer's features) keeps the
units whose weights have the largest L1 norm, and every layer that reads them keeps the matching
slices: the BatchNorm after a convolution, the next convolution's input channels, the linear
layer after a ``Flatten`` (each kept channel's block of positions). The image channels and the
classifier's outputs stay.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import CompressionError
from ..models import classifier_name
from ..nn import Residual
from ..nn.conv_chain import conv_like

__all__ = ["prune_filters"]

_CONVS = (nn.Conv1d, nn.Conv2d)


def _strongest(weight: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices, in their order, of the ``keep`` output units with the largest L1 weight norms."""
    norms = weight.detach().abs().flatten(1).sum(1)
    return norms.topk(keep).indices.sort().values


@torch.no_grad()
def prune_filters(model: nn.Module, scale: float) -> nn.Module:
    """A pruned copy of the trained ``model`` (a Sequential of convolutions, linears, norms and
    parameter-free modules) keeping ``round(width * scale)`` of every inner width by L1 norm;
    ``model`` is left as it is. Residual connections tie the channel choices of several layers
    together and are refused."""
    if not 0 < scale <= 1:
        raise CompressionError(f"scale must be in (0, 1], got {scale!r}")
    if any(isinstance(m, Residual) for m in model.modules()):
        raise CompressionError("prune_filters does not follow residual connections (their channels are tied)")
    classifier = dict(model.named_modules())[classifier_name(model)]
    return _Pruner(scale, classifier).rebuild(model).train(model.training)


class _Pruner:
    """One walk through a model in forward order, carrying which units of the current
    activation were kept (``kept``; None: all) and, after a ``Flatten``, how many channels the
    flattened features came from."""

    def __init__(self, scale: float, classifier: nn.Module) -> None:
        self.scale, self.classifier = scale, classifier
        self.kept: torch.Tensor | None = None
        self.channels: int | None = None
        self.flat: int | None = None

    def rebuild(self, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Sequential):
            return nn.Sequential(*[self.rebuild(child) for child in module])
        if type(module) in _CONVS:
            return self.conv(module)
        if type(module) is nn.Linear:
            return self.linear(module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self.norm(module)
        if isinstance(module, nn.Flatten):
            self.flat = self.channels
        return copy.deepcopy(module)

    def _keep(self, width: int) -> int:
        return max(1, round(width * self.scale))

    def conv(self, module: nn.Module) -> nn.Module:
        if module.groups != 1:
            raise CompressionError("prune_filters prunes ungrouped convolutions only")
        out = _strongest(module.weight, self._keep(module.out_channels))
        weight = module.weight[out] if self.kept is None else module.weight[out][:, self.kept]
        new = conv_like(module, weight.shape[1], weight.shape[0])
        new.weight.copy_(weight)
        if module.bias is not None:
            new.bias.copy_(module.bias[out])
        self.kept, self.channels, self.flat = out, module.out_channels, None
        return new

    def norm(self, module: nn.modules.batchnorm._BatchNorm) -> nn.Module:
        new = copy.deepcopy(module)
        if self.kept is None:
            return new
        new.num_features = self.kept.numel()
        for name in ("weight", "bias"):
            if getattr(module, name) is not None:
                setattr(new, name, nn.Parameter(getattr(module, name)[self.kept].clone()))
        for name in ("running_mean", "running_var"):
            if getattr(module, name) is not None:
                setattr(new, name, getattr(module, name)[self.kept].clone())
        return new

    def linear(self, module: nn.Linear) -> nn.Linear:
        kept = self.kept
        if self.flat is not None and kept is not None:
            positions = module.in_features // self.flat
            kept = (kept[:, None] * positions + torch.arange(positions)).flatten()
        if module is self.classifier:
            out = torch.arange(module.out_features)
        else:
            out = _strongest(module.weight, self._keep(module.out_features))
        weight = module.weight[out] if kept is None else module.weight[out][:, kept]
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        new.weight.copy_(weight)
        if module.bias is not None:
            new.bias.copy_(module.bias[out])
        self.kept, self.channels, self.flat = out, module.out_features, None
        return new
