"""The masked training form: a dense layer whose weight is multiplied by a fixed MPD mask.

``MPDLinear`` masks an ``nn.Linear``; ``MPDConv1d`` / ``MPDConv2d`` mask a convolution on its
(output channel, input channel) plane, the same mask at every kernel position. What they share
(the mask's buffers, loading, the meta device) is :class:`MaskedWeight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layout import BlockLayout
from ..core.masks import MPDMask, check_incoming_mask, make_mask
from ..errors import CompressionError, CompressionTypeError

__all__ = ["MaskedWeight", "MPDLinear", "MPDConv1d", "MPDConv2d"]


class MaskedWeight:
    """Mixin of the masked layers: the mask as buffers, applied to ``weight`` in every forward.

    The mask is stored as its two permutations plus the block count (``row_order``,
    ``col_order``, ``num_blocks`` buffers), so loading a ``state_dict`` restores the exact mask;
    the dense mask (``mask``, broadcastable against ``weight``) is rebuilt from them, not saved.
    Masked entries get exactly zero gradient, so every ``torch.optim`` optimizer (momentum and
    weight decay included) leaves them at zero; :meth:`apply_mask_` re-zeroes them for
    optimizers that would not.
    """

    weight: nn.Parameter
    row_order: torch.Tensor
    col_order: torch.Tensor
    num_blocks: torch.Tensor
    mask: torch.Tensor

    def plane(self) -> tuple[int, int]:
        """``(d_out, d_in)``: the shape of the matrix the mask lives on."""
        raise NotImplementedError

    @property
    def compression(self) -> int:
        """The factor ``c``: the number of blocks."""
        return int(self.num_blocks)

    @property
    def mpd_mask(self) -> MPDMask:
        """The layer's mask (validated from its buffers)."""
        layout = BlockLayout.create(*self.plane(), int(self.num_blocks))
        return MPDMask(layout, self.row_order.cpu(), self.col_order.cpu())

    def _dense_mask(self, mask: MPDMask) -> torch.Tensor:
        dense = mask.dense()
        return dense.view(*dense.shape, *[1] * (self.weight.dim() - 2))

    def _init_mask(self, compression: int | None, mask: MPDMask | None, seed: int | None, permute: bool) -> None:
        if mask is None:
            if compression is None:
                raise CompressionTypeError(f"{type(self).__name__} needs compression= or mask=")
            mask = make_mask(*self.plane(), compression, seed=seed, permute=permute)
        elif compression is not None and compression != mask.compression:
            raise CompressionError(f"compression={compression} disagrees with the mask's {mask.compression}")
        self._attach_mask(mask)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _adopt(self, dense: nn.Module, mask: MPDMask) -> None:
        """Take ``dense``'s parameter objects, so that an optimizer built before compression stays valid."""
        if mask.shape != self.plane():
            raise CompressionError(f"mask shape {mask.shape} does not match the layer's {self.plane()}")
        self.weight = dense.weight
        self.bias = dense.bias
        self._attach_mask(mask)

    def _attach_mask(self, mask: MPDMask) -> None:
        device = self.weight.device
        index_device = None if device.type == "meta" else device
        self.register_buffer("row_order", mask.row_order.to(index_device))
        self.register_buffer("col_order", mask.col_order.to(index_device))
        self.register_buffer("num_blocks", torch.tensor(mask.compression, dtype=torch.int64, device=index_device))
        self.register_buffer("mask", self._dense_mask(mask).to(index_device), persistent=False)
        if device.type != "meta":
            self.apply_mask_()
        # A model built on the meta device is materialized with to_empty(), which gives every
        # tensor, the mask's own buffers included, uninitialized memory; _apply restores them.
        self._meta_mask = mask if device.type == "meta" else None

    def _apply(self, fn, recurse=True):
        materializing = self._meta_mask is not None and self.weight.device.type == "meta"
        super()._apply(fn, recurse)
        if materializing and self.weight.device.type != "meta":
            mask, self._meta_mask = self._meta_mask, None
            with torch.no_grad():
                self.row_order.copy_(mask.row_order)
                self.col_order.copy_(mask.col_order)
                self.num_blocks.fill_(mask.compression)
            self.mask = self._dense_mask(mask).to(self.weight.device)
        return self

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the stored weight off the mask (in place)."""
        self.weight.mul_(self.mask)

    def masked_weight(self) -> torch.Tensor:
        """``W ∘ M``: what the forward computes with."""
        return self.weight * self.mask

    def check_incoming(self, state_dict: dict, prefix: str) -> None:
        """Refuse a mask in ``state_dict`` that is no valid permutation pair, before anything is copied."""
        check_incoming_mask(state_dict, prefix, *self.plane(), self.compression)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.check_incoming(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compression={self.compression}"


def _refresh_after_load(module: MaskedWeight, incompatible_keys: object) -> None:
    # The loaded permutations define the mask: validate them, rebuild the dense mask and make the
    # stored weight agree with it, so a dense checkpoint loaded here becomes the masked model.
    module.mask = module._dense_mask(module.mpd_mask).to(module.weight.device)
    module.apply_mask_()


class MPDLinear(MaskedWeight, nn.Linear):
    """Training form of a compressed linear layer: ``y = x (W ∘ M)ᵀ + b``.

    The stored weight is kept zero off the mask, so ``state_dict`` holds the real model.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compression: int | None = None,
        mask: MPDMask | None = None,
        seed: int | None = None,
        permute: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_mask(compression, mask, seed, permute)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: MPDMask) -> "MPDLinear":
        """Wrap an existing ``nn.Linear``, reusing its parameter objects."""
        if mask.shape != (linear.out_features, linear.in_features):
            raise CompressionError(
                f"mask shape {mask.shape} does not match linear weight shape "
                f"{(linear.out_features, linear.in_features)}"
            )
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, mask=mask, device="meta")
        new._adopt(linear, mask)
        return new

    def plane(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return self.out_features, self.in_features

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.masked_weight(), self.bias)


# The constructor arguments of a convolution that a masked one keeps (groups is always 1).
CONV_ARGUMENTS = ("kernel_size", "stride", "padding", "dilation", "padding_mode")


class _MPDConvNd(MaskedWeight):
    """Training form of a compressed convolution: the mask on the channel plane, every kernel
    position alike (``M[o, i, ...] = (P_row B P_col)[o, i]``)."""

    in_channels: int
    out_channels: int
    groups: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        compression: int | None = None,
        mask: MPDMask | None = None,
        seed: int | None = None,
        permute: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # The torch convolution this class also derives from (nn.Conv1d or nn.Conv2d) comes next
        # in the method resolution order.
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )  # fmt: skip
        if self.groups != 1:
            raise CompressionError(
                f"{type(self).__name__} takes ungrouped convolutions (groups=1), got groups={self.groups}"
            )
        self._init_mask(compression, mask, seed, permute)

    @classmethod
    def from_conv(cls, conv: nn.Module, mask: MPDMask) -> "_MPDConvNd":
        """Wrap an existing convolution (``groups=1``), reusing its parameter objects."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            bias=conv.bias is not None,
            mask=mask,
            device="meta",
            **{name: getattr(conv, name) for name in CONV_ARGUMENTS},
        )
        new._adopt(conv, mask)
        return new

    def plane(self) -> tuple[int, int]:
        """``(out_channels, in_channels)``."""
        return self.out_channels, self.in_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)


class MPDConv1d(_MPDConvNd, nn.Conv1d):
    """A compressed ``nn.Conv1d`` in training form (see :class:`MaskedWeight`)."""


class MPDConv2d(_MPDConvNd, nn.Conv2d):
    """A compressed ``nn.Conv2d`` in training form (see :class:`MaskedWeight`)."""


MASKED_CONVS: dict[type[nn.Module], type[_MPDConvNd]] = {nn.Conv1d: MPDConv1d, nn.Conv2d: MPDConv2d}
