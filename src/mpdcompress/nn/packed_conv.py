"""Packed form of a compressed convolution: a grouped convolution between two channel gathers.

A masked convolution's weight is, on its channel plane, a permuted block-diagonal matrix, the
same at every kernel position. Gathering the input channels into block order turns it into a
convolution with ``groups = c``, which every runtime already runs fast; a second gather puts the
output channels back in their order. Uneven blocks are padded to the largest block with zero
weights (padding input positions read channel 0 and multiply it by zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layout import BlockLayout
from ..core.masks import MPDMask
from ..errors import CompressionError
from .masked import MPDConv1d, MPDConv2d
from .packed import PackedBlocks, padded_sources

__all__ = ["BlockDiagonalConv"]

_CONV = {1: F.conv1d, 2: F.conv2d}
_MASKED = {1: MPDConv1d, 2: MPDConv2d}


class BlockDiagonalConv(PackedBlocks, nn.Module):
    """A compressed 1-D or 2-D convolution stored as ``c`` padded blocks and run as a grouped
    convolution.

    ``weight_blocks`` has the grouped convolution's weight shape, ``(c * max_rows, max_cols,
    *kernel_size)`` (block ``k`` is rows ``k * max_rows ...``), so it takes any memory format a
    convolution weight takes (``channels_last`` included). Computes exactly the masked
    convolution it was packed from. ``bias`` is kept in packed, padded output order (padding
    entries are zero and never read).
    """

    row_order: torch.Tensor
    col_order: torch.Tensor
    num_blocks: torch.Tensor
    in_gather: torch.Tensor
    out_gather: torch.Tensor
    padding_mask: torch.Tensor | None

    def __init__(
        self,
        mask: MPDMask,
        weight_blocks: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        stride: tuple[int, ...] | int = 1,
        padding: tuple[int, ...] | int | str = 0,
        dilation: tuple[int, ...] | int = 1,
    ) -> None:
        super().__init__()
        layout = mask.layout
        dims = weight_blocks.dim() - 2
        grouped = (layout.compression * layout.max_rows, layout.max_cols)
        if dims not in _CONV or tuple(weight_blocks.shape[:2]) != grouped:
            raise CompressionError(
                f"weight_blocks must have shape {grouped} followed by one or two kernel sizes, "
                f"got {tuple(weight_blocks.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (layout.compression * layout.max_rows,):
            raise CompressionError(
                f"packed bias must have shape {(layout.compression * layout.max_rows,)}, got {tuple(bias.shape)}"
            )
        self.in_channels, self.out_channels = layout.d_in, layout.d_out
        self.kernel_size = tuple(weight_blocks.shape[2:])
        self.stride, self.dilation = _per_dim(stride, dims), _per_dim(dilation, dims)
        self.padding = padding if isinstance(padding, str) else _per_dim(padding, dims)
        self._init_blocks(mask, weight_blocks, bias)

    @classmethod
    @torch.no_grad()
    def from_masked(cls, conv: MPDConv1d | MPDConv2d) -> "BlockDiagonalConv":
        """Pack the kept weights of a masked convolution (off-mask weights are dropped)."""
        if conv.padding_mode != "zeros":
            raise CompressionError(f"cannot pack a convolution with padding_mode={conv.padding_mode!r} (only 'zeros')")
        mask = conv.mpd_mask
        layout = mask.layout
        device = conv.weight.device
        c, br, bc = layout.compression, layout.max_rows, layout.max_cols
        pr = layout.padded_row_positions().to(device)
        rows = padded_sources(mask.row_order.to(device), pr, c * br)
        cols = padded_sources(mask.col_order.to(device), layout.padded_col_positions().to(device), c * bc)
        blocks = conv.weight[rows.view(c, br, 1), cols.view(c, 1, bc)]  # (c, br, bc, *kernel)
        if not layout.is_even:
            blocks = blocks * layout.padding_mask().to(device).view(c, br, bc, *[1] * (blocks.dim() - 3))
        bias = None
        if conv.bias is not None:
            bias = conv.bias.new_zeros(c * br)
            bias[pr] = conv.bias[mask.row_order.to(device)]
        blocks = blocks.reshape(c * br, bc, *blocks.shape[3:]).contiguous()
        return cls(mask, blocks, bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)

    # -- views of the layer ---------------------------------------------------------------------
    def plane(self) -> tuple[int, int]:
        """``(out_channels, in_channels)``."""
        return self.out_channels, self.in_channels

    def stored_shape(self, layout: BlockLayout) -> tuple[int, ...]:
        """The grouped convolution's weight: ``(c * max_rows, max_cols, *kernel_size)``."""
        return layout.compression * layout.max_rows, layout.max_cols, *self.kernel_size

    def as_blocks(self, blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        """``blocks`` viewed as ``(c, max_rows, max_cols, *kernel_size)``."""
        return blocks.reshape(layout.compression, layout.max_rows, layout.max_cols, *self.kernel_size)

    def blocks(self) -> torch.Tensor:
        """The weights as ``(c, max_rows, max_cols, *kernel_size)`` blocks (a view)."""
        return self.as_blocks(self.weight_blocks, self.layout)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The ``(out_channels, in_channels, *kernel_size)`` masked weight this layer computes with."""
        layout = self.layout
        device = self.row_order.device
        c, br, bc = layout.compression, layout.max_rows, layout.max_cols
        rows = padded_sources(self.row_order, layout.padded_row_positions().to(device), c * br, fill=-1)
        cols = padded_sources(self.col_order, layout.padded_col_positions().to(device), c * bc, fill=-1)
        dense = self.weight_blocks.new_zeros(layout.d_out, layout.d_in, *self.kernel_size)
        r, k = rows.view(c, br, 1).expand(c, br, bc), cols.view(c, 1, bc).expand(c, br, bc)
        real = (r >= 0) & (k >= 0)
        dense[r[real], k[real]] = self.blocks()[real]
        return dense

    @torch.no_grad()
    def to_masked(self) -> MPDConv1d | MPDConv2d:
        """The masked convolution this layer was packed from (exact)."""
        conv = _MASKED[len(self.kernel_size)](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            mask=self.mpd_mask,
            device=self.weight_blocks.device,
            dtype=self.weight_blocks.dtype,
        )
        conv.weight.copy_(self.dense_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias[self.out_gather])
        return conv

    # -- forward ----------------------------------------------------------------------------------
    def _build_indices(self) -> None:
        layout = self.layout
        mask = MPDMask(layout, self.row_order.cpu(), self.col_order.cpu())  # validates loaded orders
        self.groups = layout.compression  # a Python int: reading num_blocks in forward would sync a GPU
        out_gather = torch.empty(layout.d_out, dtype=torch.int64)
        out_gather[mask.row_order] = layout.padded_row_positions()
        in_gather = padded_sources(mask.col_order, layout.padded_col_positions(), layout.compression * layout.max_cols)
        device = self.row_order.device
        self.register_buffer("in_gather", in_gather.to(device), persistent=False)
        self.register_buffer("out_gather", out_gather.to(device), persistent=False)
        # Identity gathers (a residual stream stored in this layer's block order, see
        # core/streams.py) are skipped: each would copy the whole activation for nothing.
        c = layout.compression
        self.in_is_identity = layout.d_in % c == 0 and torch.equal(mask.col_order, torch.arange(layout.d_in))
        self.out_is_identity = layout.d_out % c == 0 and torch.equal(mask.row_order, torch.arange(layout.d_out))
        padding = None
        if not layout.is_even:
            padding = layout.padding_mask().view(-1, layout.max_cols, *[1] * len(self.kernel_size))
        self.register_buffer("padding_mask", None if padding is None else padding.to(device), persistent=False)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """The grouped convolution alone: input channels already in block order, output channels
        left in (padded) block order."""
        return _CONV[len(self.kernel_size)](
            x, self.effective_blocks(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s channels in this layer's (padded) input block order."""
        return x if self.in_is_identity else gather_channels(x, -1 - len(self.kernel_size), self.in_gather)

    def from_blocks(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` (output channels in block order) with its channels back in their order."""
        return y if self.out_is_identity else gather_channels(y, -1 - len(self.kernel_size), self.out_gather)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.from_blocks(self.grouped(self.to_blocks(input)))

    def extra_repr(self) -> str:
        layout = self.layout
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, compression={layout.compression}, "
            f"blocks={layout.compression}x{layout.max_rows}x{layout.max_cols}, bias={self.bias is not None}"
        )


def gather_channels(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, index)`` along the channels, keeping a channels-last layout.

    ``index_select`` returns a contiguous (channels-first) tensor, so every convolution and
    pooling after it would run channels-first again, which on the CPU is many times slower
    for pooling (a 2x2 max-pool measured ~25x); gathering the columns of the NHWC view keeps
    the layout the user chose. As ``torch.gather`` over ``(pixels, channels)`` rows, which reads
    the input once in order: ``index_select`` along the 4-D view's last dimension measured
    several times slower once the activation outgrows the cache.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        n, _, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, x.shape[1])
        picked = torch.gather(pixels, 1, index.expand(pixels.shape[0], -1))
        return picked.view(n, h, w, index.numel()).permute(0, 3, 1, 2)
    return x.index_select(dim, index)


def _per_dim(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims
