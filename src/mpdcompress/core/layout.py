"""Block layout of a permuted block-diagonal mask: how rows and columns split into ``c`` groups."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import CompressionError, CompressionTypeError

__all__ = ["BlockLayout", "split_sizes", "validate_compression"]


def _where(name: str | None) -> str:
    return f"layer {name!r}" if name else "layer"


def validate_compression(d_out: int, d_in: int, compression: object, name: str | None = None) -> int:
    """Return ``compression`` as an int after checking ``1 <= c <= min(d_out, d_in)``.

    Raises ``TypeError`` for non-integers (bools included) and ``ValueError`` for out-of-range
    values; both messages name the layer and the valid range so a user compressing a large
    model can tell which layer refused.
    """
    for dim_name, dim in (("d_out", d_out), ("d_in", d_in)):
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise CompressionTypeError(f"{_where(name)}: {dim_name} must be an int, got {type(dim).__name__}")
        if dim < 1:
            raise CompressionError(f"{_where(name)}: {dim_name} must be >= 1, got {dim}")
    upper = min(int(d_out), int(d_in))
    valid = f"valid range for a {d_out}x{d_in} weight is 1..{upper}"
    if isinstance(compression, bool) or not isinstance(compression, numbers.Integral):
        if isinstance(compression, numbers.Real) and float(compression).is_integer():
            raise CompressionTypeError(
                f"{_where(name)}: compression must be an int, got {compression!r} (pass {int(compression)}); {valid}"
            )
        raise CompressionTypeError(
            f"{_where(name)}: compression must be an int, got {type(compression).__name__} {compression!r}; {valid}"
        )
    c = int(compression)
    if not 1 <= c <= upper:
        raise CompressionError(f"{_where(name)}: compression {c} is out of range; {valid}")
    return c


def split_sizes(n: int, c: int) -> tuple[int, ...]:
    """Split ``n`` into ``c`` sizes that differ by at most one, larger ones first."""
    q, r = divmod(n, c)
    return tuple(q + 1 if k < r else q for k in range(c))


@dataclass(frozen=True)
class BlockLayout:
    """Row/column groups of a ``d_out x d_in`` block-diagonal matrix with ``c`` blocks.

    Block ``k`` spans rows ``row_offsets[k] : row_offsets[k] + row_sizes[k]`` and the matching
    column range. Packed storage pads every block to ``max_rows x max_cols`` so all ``c`` GEMMs
    are one ``bmm``; sizes differ by at most one, so padding costs under ``1/size`` of a block.
    """

    d_out: int
    d_in: int
    compression: int

    @classmethod
    def create(cls, d_out: int, d_in: int, compression: object, name: str | None = None) -> "BlockLayout":
        return cls(int(d_out), int(d_in), validate_compression(d_out, d_in, compression, name))

    def __post_init__(self) -> None:
        validate_compression(self.d_out, self.d_in, self.compression)

    @cached_property
    def row_sizes(self) -> tuple[int, ...]:
        return split_sizes(self.d_out, self.compression)

    @cached_property
    def col_sizes(self) -> tuple[int, ...]:
        return split_sizes(self.d_in, self.compression)

    @cached_property
    def row_offsets(self) -> tuple[int, ...]:
        return _offsets(self.row_sizes)

    @cached_property
    def col_offsets(self) -> tuple[int, ...]:
        return _offsets(self.col_sizes)

    @property
    def max_rows(self) -> int:
        return self.row_sizes[0]

    @property
    def max_cols(self) -> int:
        return self.col_sizes[0]

    @property
    def is_even(self) -> bool:
        """True when no block needs padding (both dimensions divisible by ``c``)."""
        return self.d_out % self.compression == 0 and self.d_in % self.compression == 0

    @property
    def nnz(self) -> int:
        """Number of ones in the block-diagonal matrix: the weights a compressed layer keeps."""
        return sum(r * s for r, s in zip(self.row_sizes, self.col_sizes))

    @property
    def padded_numel(self) -> int:
        return self.compression * self.max_rows * self.max_cols

    @property
    def density(self) -> float:
        return self.nnz / (self.d_out * self.d_in)

    def row_groups(self) -> torch.Tensor:
        """Block index of each row of the (unpermuted) block-diagonal matrix."""
        return _groups(self.row_sizes)

    def col_groups(self) -> torch.Tensor:
        return _groups(self.col_sizes)

    def block_diagonal(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """The 0/1 matrix ``B``."""
        return (self.row_groups()[:, None] == self.col_groups()[None, :]).to(dtype)

    def padded_row_positions(self) -> torch.Tensor:
        """For each row of ``B``, its position in the padded ``c * max_rows`` packed output."""
        return _padded_positions(self.row_sizes, self.max_rows)

    def padded_col_positions(self) -> torch.Tensor:
        return _padded_positions(self.col_sizes, self.max_cols)

    def padding_mask(self) -> torch.Tensor:
        """``(c, max_rows, max_cols)`` bool tensor: True where a padded block holds a real weight."""
        rows = torch.arange(self.max_rows, device="cpu")[None, :] < torch.tensor(self.row_sizes, device="cpu")[:, None]
        cols = torch.arange(self.max_cols, device="cpu")[None, :] < torch.tensor(self.col_sizes, device="cpu")[:, None]
        return rows[:, :, None] & cols[:, None, :]

    def nonzero_padding(self, blocks: torch.Tensor, bias: torch.Tensor | None) -> str | None:
        """``"weight_blocks"`` or ``"bias"`` if that packed tensor is not zero (NaN included) at a
        padding position, else None (``blocks``: ``(c, max_rows, max_cols, *kernel)``). Nonzero padding makes a packed layer compute something
        other than its masked form (and differently with and without autograd)."""
        if self.is_even:
            return None
        padding = ~self.padding_mask().to(blocks.device)
        # A packed convolution's blocks carry its kernel positions as trailing dimensions.
        padding = padding.view(*padding.shape, *[1] * (blocks.dim() - 3))
        if bool((blocks * padding).any()):
            return "weight_blocks"
        if bias is not None:
            padded = torch.ones(bias.numel(), dtype=torch.bool, device=bias.device)
            padded[self.padded_row_positions().to(bias.device)] = False
            if bool(bias[padded].any()):
                return "bias"
        return None


def _offsets(sizes: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return tuple(out)


def _groups(sizes: tuple[int, ...]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes), device="cpu"), torch.tensor(sizes, device="cpu"))


def _padded_positions(sizes: tuple[int, ...], block: int) -> torch.Tensor:
    groups = _groups(sizes)
    starts = torch.tensor(_offsets(sizes), device="cpu")
    within = torch.arange(sum(sizes), device="cpu") - starts[groups]
    return groups * block + within
