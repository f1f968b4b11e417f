"""``Residual``: the sum of two branches, the one building block a ResNet needs beyond Sequential."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Residual"]


class Residual(nn.Module):
    """``body(x) + shortcut(x)``; without a shortcut, ``body(x) + x``.

    A container (its branches are ordinary child modules, usually Sequentials), so model files
    can describe it and :func:`~mpdcompress.pack` fuses the compressed convolutions inside
    ``body`` as it does in any Sequential.
    """

    def __init__(self, body: nn.Module | None = None, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        if body is not None:
            self.body = body
        if shortcut is not None:
            self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self._modules.get("shortcut")
        return self.body(x) + (x if shortcut is None else shortcut(x))
