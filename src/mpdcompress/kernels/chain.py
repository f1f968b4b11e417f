"""The packed forward: gather → ``c`` block GEMMs (+bias) → element-wise op → gather → ... → gather.

A chain of ``n`` compressed layers runs with ``n + 1`` gathers. Activations are kept
feature-major (``(features, batch)``) between layers: gathering rows of a feature-major tensor
copies contiguous rows, and ``bmm(blocks, x.view(c, b_in, batch))`` needs no transposes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["ChainWeights", "run_chain"]


@dataclass
class ChainWeights:
    """Everything the forward needs, as plain tensors (no modules), in packed padded order.

    ``gathers[0]`` picks the padded block inputs of layer 0 from the original input features;
    ``gathers[i]`` (0 < i < n) picks layer i's padded inputs from layer i-1's padded outputs;
    ``gathers[n]`` picks the original output features from the last layer's padded outputs.
    """

    gathers: Sequence[torch.Tensor]
    blocks: Sequence[torch.Tensor]  # (c, max_rows, max_cols) each
    biases: Sequence[torch.Tensor | None]  # (c * max_rows,) each, or None
    activations: Sequence[Callable[[torch.Tensor], torch.Tensor]]  # n - 1 element-wise ops


def run_chain(x: torch.Tensor, weights: ChainWeights) -> torch.Tensor:
    """Apply the packed chain to ``x`` of shape ``(..., d_in)``; returns ``(..., d_out)``."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    batch = x2d.shape[0]
    h = x2d.t().index_select(0, weights.gathers[0])
    last = len(weights.blocks) - 1
    for i, (blocks, bias) in enumerate(zip(weights.blocks, weights.biases)):
        c, rows, cols = blocks.shape
        h3 = h.view(c, cols, batch)
        if bias is None:
            h = torch.bmm(blocks, h3)
        else:
            h = torch.baddbmm(bias.view(c, rows, 1), blocks, h3)
        h = h.view(c * rows, batch)
        if i < last:
            h = weights.activations[i](h).index_select(0, weights.gathers[i + 1])
    out = h.t().index_select(1, weights.gathers[-1])
    return out.reshape(*lead, out.shape[-1])
