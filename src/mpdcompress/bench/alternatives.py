"""What a user would pick instead of MPD on a GPU, built for one layer shape.

* ``monarch``: a Monarch layer (Dao et al., 2022) with the same parameter count as the MPD layer:
  two block-diagonal factors with a stride permutation between them, run as HazyResearch's
  ``blockdiag_butterfly_multiply`` runs it in PyTorch (two ``bmm`` and two reshapes);
* ``semi_structured``: the weight pruned to 2:4 (the two largest of every four inputs) and run
  through ``torch.sparse.to_sparse_semi_structured`` (CUTLASS / cuSPARSELt, 16-bit types); it
  keeps 1/2 of the weights whatever ``c`` is, so it is the "2× compression on tensor cores" row.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

__all__ = ["MonarchLinear", "monarch_width", "semi_structured_linear"]


def monarch_width(d_out: int, d_in: int, compression: int) -> int:
    """Inner width per block ``q`` so that ``q (d_in + d_out) ≈ d_in d_out / c`` (MPD's count)."""
    return max(1, round(d_in * d_out / (compression * (d_in + d_out))))


class MonarchLinear(nn.Module):
    """``y = P₂ B₂ P B₁ x + b`` with ``nblocks`` blocks per factor; ``P`` is the stride permutation."""

    def __init__(self, d_in: int, d_out: int, compression: int, nblocks: int = 4, device=None, dtype=None) -> None:
        super().__init__()
        if d_in % nblocks or d_out % nblocks:
            raise ValueError(f"Monarch with {nblocks} blocks needs d_in and d_out divisible by it, got {d_in}, {d_out}")
        q = monarch_width(d_out, d_in, compression)
        kw = dict(device=device, dtype=dtype)
        self.nblocks, self.q = nblocks, q
        self.w1 = nn.Parameter(torch.randn(nblocks, q, d_in // nblocks, **kw) * (nblocks / d_in) ** 0.5)
        self.w2 = nn.Parameter(torch.randn(nblocks, d_out // nblocks, q, **kw) * q**-0.5)
        self.bias = nn.Parameter(torch.zeros(d_out, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        b, q = self.nblocks, self.q
        h = torch.bmm(x.view(batch, b, -1).transpose(0, 1), self.w1.transpose(1, 2))  # (b, batch, q)
        h = h.transpose(0, 1).reshape(batch, q, b).permute(2, 0, 1)  # the stride permutation
        y = torch.bmm(h, self.w2.transpose(1, 2))  # (b, batch, d_out / b)
        return y.transpose(0, 1).reshape(batch, -1) + self.bias


def semi_structured_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ x Wᵀ + b`` with ``W`` pruned to 2:4 and stored semi-structured (raises where unsupported)."""
    from torch.sparse import to_sparse_semi_structured

    groups = weight.detach().reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    pruned = (groups * keep).reshape_as(weight)
    with warnings.catch_warnings():  # torch marks semi-structured sparsity as a prototype
        warnings.simplefilter("ignore", UserWarning)
        sparse = to_sparse_semi_structured(pruned)
    return lambda x: nn.functional.linear(x, sparse, bias)
