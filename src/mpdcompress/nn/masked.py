"""``MPDLinear``: a dense ``nn.Linear`` whose weight is multiplied by a fixed MPD mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layout import BlockLayout
from ..core.masks import MPDMask, check_incoming_mask, make_mask
from ..errors import CompressionError, CompressionTypeError

__all__ = ["MPDLinear"]


class MPDLinear(nn.Linear):
    """Training form of a compressed linear layer: ``y = x (W ∘ M)ᵀ + b``.

    The stored weight is kept zero off the mask, so ``state_dict`` holds the real model. Masked
    entries get exactly zero gradient, so every ``torch.optim`` optimizer (momentum and weight
    decay included) leaves them at zero; :meth:`apply_mask_` re-zeroes them for optimizers that
    would not. The mask itself is stored as its two permutations plus the block count
    (``row_order``, ``col_order``, ``num_blocks`` buffers), so loading a ``state_dict`` restores
    the exact mask, and the dense bool mask is rebuilt from them (not saved).
    """

    row_order: torch.Tensor
    col_order: torch.Tensor
    num_blocks: torch.Tensor
    mask: torch.Tensor

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
        if mask is None:
            if compression is None:
                raise CompressionTypeError("MPDLinear needs compression= or mask=")
            mask = make_mask(out_features, in_features, compression, seed=seed, permute=permute)
        elif compression is not None and compression != mask.compression:
            raise CompressionError(f"compression={compression} disagrees with the mask's {mask.compression}")
        self._attach_mask(mask)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: MPDMask) -> "MPDLinear":
        """Wrap an existing ``nn.Linear``, reusing its parameter objects.

        Reusing the ``Parameter`` objects keeps an optimizer created before compression valid.
        """
        if mask.shape != (linear.out_features, linear.in_features):
            raise CompressionError(
                f"mask shape {mask.shape} does not match linear weight shape "
                f"{(linear.out_features, linear.in_features)}"
            )
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, mask=mask, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new._attach_mask(mask)
        return new

    @property
    def compression(self) -> int:
        return int(self.num_blocks)

    @property
    def mpd_mask(self) -> MPDMask:
        layout = BlockLayout.create(self.out_features, self.in_features, int(self.num_blocks))
        return MPDMask(layout, self.row_order.cpu(), self.col_order.cpu())

    def _attach_mask(self, mask: MPDMask) -> None:
        device = self.weight.device
        index_device = None if device.type == "meta" else device
        self.register_buffer("row_order", mask.row_order.to(index_device))
        self.register_buffer("col_order", mask.col_order.to(index_device))
        self.register_buffer("num_blocks", torch.tensor(mask.compression, dtype=torch.int64, device=index_device))
        self.register_buffer("mask", mask.dense().to(index_device), persistent=False)
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
            self.mask = mask.dense().to(self.weight.device)
        return self

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the stored weight off the mask (in place)."""
        self.weight.mul_(self.mask)

    def check_incoming(self, state_dict: dict, prefix: str) -> None:
        """Refuse a mask in ``state_dict`` that is no valid permutation pair, before anything is copied."""
        check_incoming_mask(state_dict, prefix, self.out_features, self.in_features, self.compression)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.check_incoming(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight * self.mask, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compression={self.compression}"


def _refresh_after_load(module: MPDLinear, incompatible_keys: object) -> None:
    # The loaded permutations define the mask: validate them, rebuild the dense mask and make the
    # stored weight agree with it, so a dense checkpoint loaded here becomes the masked model.
    mask = module.mpd_mask
    module.mask = mask.dense().to(module.weight.device)
    module.apply_mask_()
