"""Masks chosen from a trained weight: keep as much of its squared mass as the block layout allows.

A mask is a partition of the rows and of the columns into ``c`` groups of the layout's sizes
(group ``k`` of rows meets group ``k`` of columns); order inside a group does not matter. For a
trained weight the partition is a balanced co-clustering of ``W²``: starting from a seeded random
column partition, rows and columns are reassigned in turn, each to the group where it keeps the
most mass, under the groups' sizes (a greedy balanced assignment), until the kept mass stops
growing; after each greedy pass, pairs of items are exchanged between groups while that keeps
more mass. A few seeded restarts keep the best. A random mask keeps about ``1/c`` of the mass.
"""

from __future__ import annotations

import torch

from .errors import CompressionTypeError
from .layout import BlockLayout
from .masks import MPDMask

__all__ = ["mask_from_weight", "kept_mass"]


def kept_mass(weight: torch.Tensor, mask: MPDMask) -> float:
    """Fraction of ``sum(W²)`` that lies on the mask."""
    mass = weight.detach().double().square()
    total = float(mass.sum())
    return float((mass * mask.dense(torch.float64).to(mass.device)).sum()) / total if total else 0.0


def _balanced_assign(scores: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Group of each item (row of ``scores``, one score per group), group ``k`` taking exactly
    ``sizes[k]`` items: the best (item, group) pairs first, skipping full groups and placed items."""
    n, c = scores.shape
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    items, groups = (order // c).tolist(), (order % c).tolist()
    label = [-1] * n
    room = sizes.tolist()
    placed = 0
    for item, group in zip(items, groups):
        if label[item] < 0 and room[group] > 0:
            label[item] = group
            room[group] -= 1
            placed += 1
            if placed == n:
                break
    return torch.tensor(label, dtype=torch.int64)


def _swap_refine(labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Exchange items between every two groups while an exchange keeps more mass (sizes stay):
    for groups a and b, pair a's items that gain most by moving to b with b's items that gain
    most by moving to a, and swap the pairs whose gains add up to more than nothing."""
    labels = labels.clone()
    c = scores.shape[1]
    for _ in range(8):
        changed = False
        for a in range(c):
            for b in range(a + 1, c):
                in_a = torch.nonzero(labels == a).flatten()
                in_b = torch.nonzero(labels == b).flatten()
                gain_a = scores[in_a, b] - scores[in_a, a]
                gain_b = scores[in_b, a] - scores[in_b, b]
                ga, ia = torch.sort(gain_a, descending=True)
                gb, ib = torch.sort(gain_b, descending=True)
                k = min(len(ga), len(gb))
                take = int(((ga[:k] + gb[:k]) > 1e-12 * scores.abs().max()).sum())
                if take:
                    labels[in_a[ia[:take]]] = b
                    labels[in_b[ib[:take]]] = a
                    changed = True
        if not changed:
            break
    return labels


def _one_hot(labels: torch.Tensor, c: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, c).float()


def _orders(labels: torch.Tensor) -> torch.Tensor:
    # Group 0's members first, then group 1's...: the packed order a layout's blocks expect.
    return torch.argsort(labels, stable=True)


def mask_from_weight(
    weight: torch.Tensor, compression: int, *, seed: int = 0, restarts: int = 3, iterations: int = 20
) -> MPDMask:
    """The MPD mask of factor ``compression`` that keeps the most of ``weight``'s squared mass
    this search finds; deterministic for a seed."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise CompressionTypeError("weight must be a 2-D tensor (d_out x d_in)")
    d_out, d_in = weight.shape
    layout = BlockLayout.create(d_out, d_in, compression)
    c = layout.compression
    mass = weight.detach().float().square().cpu()  # float32: an LLM-size layer's W² is 235 MB already
    row_sizes, col_sizes = torch.tensor(layout.row_sizes), torch.tensor(layout.col_sizes)
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(max(1, restarts)):
        cols = torch.repeat_interleave(torch.arange(c), col_sizes)[torch.randperm(d_in, generator=generator)]
        kept = -1.0
        for _ in range(max(1, iterations)):
            row_scores = mass @ _one_hot(cols, c)
            rows = _swap_refine(_balanced_assign(row_scores, row_sizes), row_scores)
            col_scores = mass.t() @ _one_hot(rows, c)
            cols = _swap_refine(_balanced_assign(col_scores, col_sizes), col_scores)
            now = float(((_one_hot(rows, c).t() @ mass) * _one_hot(cols, c).t()).sum())
            if now <= kept:
                break
            kept = now
        if best is None or kept > best[0]:
            best = (kept, rows, cols)
    _, rows, cols = best
    return MPDMask(layout, _orders(rows), _orders(cols))
