"""Masks chosen from a trained weight: keep as much of its squared mass as the block layout allows.

The mass may be weighted per input by the second moment of the inputs the layer sees
(``W_ij² E[x_j²]``), which counts what a dropped weight takes from the output.

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

from ..errors import CompressionError, CompressionTypeError
from .layout import BlockLayout
from .masks import MPDMask

__all__ = ["mask_from_weight", "masks_for_layers", "kept_mass"]


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


def _partition(
    sizes: dict[str, torch.Tensor],
    edges: list[tuple[torch.Tensor, str, str]],
    c: int,
    *,
    seed: int,
    restarts: int,
    iterations: int,
) -> dict[str, torch.Tensor]:
    """Group labels of every axis that keep the most mass: ``edges`` are ``(mass, row axis, column
    axis)``, an entry kept when its row and column fall in the same group. Each axis in turn is
    reassigned given the others (greedy balanced assignment, then swaps), until the kept mass
    stops growing; the best of a few seeded restarts wins."""
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    for _ in range(max(1, restarts)):
        # The first axis is assigned first, from random labels of the others.
        labels = {
            axis: torch.repeat_interleave(torch.arange(c), n)[torch.randperm(int(n.sum()), generator=generator)]
            for axis, n in list(sizes.items())[1:]
        }
        kept = -1.0
        for _ in range(max(1, iterations)):
            for axis in sizes:
                scores = torch.zeros(int(sizes[axis].sum()), c)
                for mass, rows, cols in edges:
                    if rows == axis:
                        scores += mass @ _one_hot(labels[cols], c)
                    if cols == axis:
                        scores += mass.t() @ _one_hot(labels[rows], c)
                labels[axis] = _swap_refine(_balanced_assign(scores, sizes[axis]), scores)
            now = sum(
                float(((_one_hot(labels[rows], c).t() @ mass) * _one_hot(labels[cols], c).t()).sum())
                for mass, rows, cols in edges
            )
            if now <= kept:
                break
            kept = now
        if best is None or kept > best[0]:
            best = (kept, labels)
    return best[1]


def _mass(weight: object, input_moment: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise CompressionTypeError("weight must be a 2-D tensor (d_out x d_in)")
    mass = weight.detach().float().square().cpu()  # float32: an LLM-size layer's W² is 235 MB already
    if input_moment is not None:
        if not isinstance(input_moment, torch.Tensor) or input_moment.shape != mass.shape[1:]:
            raise CompressionTypeError(f"input_moment must be a tensor of {mass.shape[1]} values, one per input")
        mass.mul_(input_moment.detach().float().cpu().clamp_min(0))
    return mass


def mask_from_weight(
    weight: torch.Tensor,
    compression: int,
    *,
    input_moment: torch.Tensor | None = None,
    seed: int = 0,
    restarts: int = 3,
    iterations: int = 20,
) -> MPDMask:
    """The MPD mask of factor ``compression`` that keeps the most of ``weight``'s squared mass
    this search finds; deterministic for a seed. With ``input_moment`` (``E[x_j²]`` of each
    input, see :func:`~mpdcompress.posthoc.calibrate.input_moments`) the mass is ``W_ij² E[x_j²]``."""
    mass = _mass(weight, input_moment)
    layout = BlockLayout.create(*mass.shape, compression)
    sizes = {"rows": torch.tensor(layout.row_sizes), "cols": torch.tensor(layout.col_sizes)}
    labels = _partition(
        sizes, [(mass, "rows", "cols")], layout.compression, seed=seed, restarts=restarts, iterations=iterations
    )
    return MPDMask(layout, _orders(labels["rows"]), _orders(labels["cols"]))


def masks_for_layers(
    weights: dict[str, torch.Tensor],
    joined: list[tuple[str, str]],
    compression: int,
    *,
    input_moments: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    restarts: int = 3,
    iterations: int = 20,
) -> dict[str, MPDMask]:
    """Masks for layers of which some are joined by element-wise operations: for each
    ``(producer, consumer)`` in ``joined``, the producer's outputs are the consumer's inputs (an
    MLP's up and gate projections feed its down projection; one layer of a stack feeds the next).
    Those hidden units can be regrouped freely, so one grouping serves the producer's rows and the
    consumer's columns, chosen for the mass of every layer together, and both masks put a group's
    units in the same order: the permutation between the layers is then a no-op.
    ``input_moments`` weighs each layer's mass by its inputs' ``E[x²]``, as in :func:`mask_from_weight`."""
    moments = input_moments or {}
    masses = {name: _mass(w, moments.get(name)) for name, w in weights.items()}
    axis = {(name, side): (name, side) for name in masses for side in ("in", "out")}

    def root(key):
        while axis[key] != key:
            key = axis[key]
        return key

    for producer, consumer in joined:
        if producer not in masses or consumer not in masses:
            raise CompressionError(f"joined layers {producer!r} -> {consumer!r} are not among the weights")
        if masses[producer].shape[0] != masses[consumer].shape[1]:
            raise CompressionError(
                f"{producer!r} writes {masses[producer].shape[0]} features but {consumer!r} reads "
                f"{masses[consumer].shape[1]}: they cannot be joined"
            )
        axis[root((consumer, "in"))] = root((producer, "out"))
    layouts = {name: BlockLayout.create(*m.shape, compression, name) for name, m in masses.items()}
    sizes: dict[str, torch.Tensor] = {}
    edges = []
    for name, mass in masses.items():
        rows, cols = (f"{root((name, side))}" for side in ("out", "in"))
        sizes[rows] = torch.tensor(layouts[name].row_sizes)
        sizes[cols] = torch.tensor(layouts[name].col_sizes)
        edges.append((mass, rows, cols))
    # Joined axes first: they are the ones many layers pull on.
    shared = {str(root(k)) for k in axis if root(k) != k}
    sizes = {a: sizes[a] for a in sorted(sizes, key=lambda a: a not in shared)}
    c = next(iter(layouts.values())).compression
    labels = _partition(sizes, edges, c, seed=seed, restarts=restarts, iterations=iterations)
    return {
        name: MPDMask(layouts[name], _orders(labels[rows]), _orders(labels[cols]))
        for (_, rows, cols), name in zip(edges, masses)
    }
