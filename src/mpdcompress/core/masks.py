"""Seeded permuted block-diagonal masks ``M = P_row · B · P_col``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..errors import CompressionError, CompressionTypeError, ConfigError
from .layout import BlockLayout

__all__ = ["check_incoming_mask", "MPDMask", "make_mask", "layer_seed", "check_permutation", "inverse_permutation"]


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed derived from the model seed and the layer's qualified name.

    Hashing the name (rather than counting layers) keeps each layer's mask fixed when the user
    changes which layers are compressed, and is identical on every machine and process.
    """
    digest = hashlib.sha256(f"mpdcompress:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``perm``: ``inverse[perm[i]] = i``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv


def check_permutation(perm: object, n: int, what: str) -> torch.Tensor:
    """Return ``perm`` as an int64 tensor after checking it is a permutation of ``range(n)``."""
    if not isinstance(perm, torch.Tensor):
        raise CompressionTypeError(f"{what} must be a torch.Tensor, got {type(perm).__name__}")
    if perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
        raise CompressionTypeError(f"{what} must have an integer dtype, got {perm.dtype}")
    if perm.dim() != 1 or perm.numel() != n:
        raise CompressionError(f"{what} must be 1-D of length {n}, got shape {tuple(perm.shape)}")
    perm = perm.to(torch.int64)
    if n and (int(perm.min()) < 0 or int(perm.max()) >= n):
        raise CompressionError(f"{what} has entries outside 0..{n - 1}")
    if torch.unique(perm).numel() != n:
        raise CompressionError(f"{what} is not a permutation: it repeats some indices")
    return perm


@dataclass(frozen=True)
class MPDMask:
    """A block layout plus the row/column orders that permute it.

    ``row_order[i]`` is the original row that sits at packed row ``i`` (likewise columns), so
    ``W[row_order][:, col_order]`` of a masked weight is block-diagonal, and the dense mask is
    ``M[row_order[i], col_order[j]] = B[i, j]``. Identity orders give the non-permuted ablation.
    """

    layout: BlockLayout
    row_order: torch.Tensor
    col_order: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "row_order", check_permutation(self.row_order, self.layout.d_out, "row_order"))
        object.__setattr__(self, "col_order", check_permutation(self.col_order, self.layout.d_in, "col_order"))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.layout.d_out, self.layout.d_in)

    @property
    def compression(self) -> int:
        return self.layout.compression

    @property
    def density(self) -> float:
        return self.layout.density

    @property
    def is_permuted(self) -> bool:
        ident_r = torch.equal(self.row_order, torch.arange(self.layout.d_out, device=self.row_order.device))
        ident_c = torch.equal(self.col_order, torch.arange(self.layout.d_in, device=self.col_order.device))
        return not (ident_r and ident_c)

    def inverse_row_order(self) -> torch.Tensor:
        return inverse_permutation(self.row_order)

    def inverse_col_order(self) -> torch.Tensor:
        return inverse_permutation(self.col_order)

    def row_groups(self) -> torch.Tensor:
        """Block index of each original row."""
        group = torch.empty(self.layout.d_out, dtype=torch.int64, device=self.row_order.device)
        group[self.row_order] = self.layout.row_groups()
        return group

    def col_groups(self) -> torch.Tensor:
        """Block index of each original column."""
        group = torch.empty(self.layout.d_in, dtype=torch.int64, device=self.col_order.device)
        group[self.col_order] = self.layout.col_groups()
        return group

    def dense(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """The ``d_out x d_in`` 0/1 mask."""
        return (self.row_groups()[:, None] == self.col_groups()[None, :]).to(dtype)


def make_mask(
    d_out: int,
    d_in: int,
    compression: object,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    permute: bool = True,
    name: str | None = None,
) -> MPDMask:
    """Draw an MPD mask for a ``d_out x d_in`` weight.

    Give ``seed`` (same seed, same mask on any machine) or a ``torch.Generator``; with neither,
    the global torch RNG is used. ``permute=False`` returns the plain block-diagonal mask.
    """
    layout = BlockLayout.create(d_out, d_in, compression, name)
    if seed is not None and generator is not None:
        raise ConfigError("pass either seed or generator, not both")
    if not permute:
        return MPDMask(layout, torch.arange(layout.d_out, device="cpu"), torch.arange(layout.d_in, device="cpu"))
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise CompressionTypeError(f"seed must be an int, got {type(seed).__name__}")
        generator = torch.Generator().manual_seed(seed)
    # Permutations are drawn on the CPU so the mask does not depend on the device's RNG (nor on a
    # default device such as torch.device("meta") around the call).
    row_order = torch.randperm(layout.d_out, generator=generator, device="cpu")
    col_order = torch.randperm(layout.d_in, generator=generator, device="cpu")
    return MPDMask(layout, row_order, col_order)


def check_incoming_mask(state_dict: dict, prefix: str, d_out: int, d_in: int, compression: int) -> None:
    """Validate the mask a ``load_state_dict`` is about to put into a compressed layer, before any
    of its buffers is replaced: a refused load leaves the layer as it was."""
    rows, cols = state_dict.get(prefix + "row_order"), state_dict.get(prefix + "col_order")
    blocks = state_dict.get(prefix + "num_blocks", compression)
    if rows is None or cols is None:
        return  # missing keys: load_state_dict reports them itself
    try:
        c = int(blocks)
    except (TypeError, ValueError, RuntimeError):
        raise CompressionTypeError(f"{prefix}num_blocks must be one integer, got {blocks!r}"[:200]) from None
    MPDMask(BlockLayout.create(d_out, d_in, c, prefix.rstrip(".") or None), rows, cols)
