"""Export forms of packed blocks: one product per block on the block's slice of the input.

Exporters replace a layer's batched block product by one call per block (``export_gemm``) where
the target runtime runs per-block calls faster, or has a kernel of its own for a block (XNNPACK's
linear with constant weights, ONNX Runtime's MatMulNBits). Each form is a
:class:`~mpdcompress.kernels.torch_engine.BlockGemm`; its ``_block`` is the product of block
``k`` with its ``(batch, cols)`` input.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PerBlockProducts", "set_export_form"]


class PerBlockProducts:
    """Blocks run as one product per block, their outputs concatenated (subclasses say how)."""

    shape: tuple[int, int, int]

    def _block(self, k: int, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_major(self, a: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``a`` (c, batch, cols) → ``(batch, c * rows)``."""
        y = torch.cat([self._block(k, a[k]) for k in range(self.shape[0])], dim=1)
        return y if bias is None else y + bias

    def feature_major(self, a: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``a`` (c, cols, batch) → ``(c * rows, batch)``."""
        return self.batch_major(a.transpose(1, 2), bias).t()


def set_export_form(layer: nn.Module, form: PerBlockProducts) -> None:
    """``layer`` (a quantized layer of an export copy) runs ``form``; its integer buffers, unused
    now, are dropped, or the program would store them beside the form's own constants."""
    layer.export_gemm = form
    for name in ("qweight", "scales", "zero_points"):
        layer.register_buffer(name, None)
