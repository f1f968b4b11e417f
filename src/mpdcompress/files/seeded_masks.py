"""Masks stored as the seed that drew them, for the smallest files.

A random MPD mask is drawn from ``layer_seed(config.seed, name)`` (:func:`~mpdcompress.core.masks.make_mask`),
so a file that records the compression config can leave a layer's row and column orders out and
draw them again on load: for LeNet-300-100 at c = 16 with int4 blocks the orders are ~2.9 KB of a
~20 KB file. What makes this safe is a SHA-256 of the orders in the manifest: the orders drawn at
load time must match it, or the file is refused by name. They would not match where torch draws
other permutations from the same seed (``torch.randperm`` is not promised to stay the same across
torch releases), so such files suit deployment with a known torch; files that must load anywhere
keep their orders (the default). Weight-chosen, loaded or hand-made masks are kept as stored
orders whatever is asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import MPDConfig
from ..core.masks import layer_seed, make_mask
from ..errors import ModelFileError, MPDCompressError
from .header import tensor_digest

__all__ = ["MASK_STORAGE", "seeded_layers", "drawn_orders"]

MASK_STORAGE = ("orders", "seed")
_SUFFIXES = ("row_order", "col_order")


def _orders_digest(row_order: torch.Tensor, col_order: torch.Tensor) -> str:
    return tensor_digest(torch.cat([row_order.reshape(-1), col_order.reshape(-1)]).to(torch.int64).cpu())


def _drawn(config: MPDConfig, layer: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = make_mask(
        layer["d_out"],
        layer["d_in"],
        layer["compression"],
        seed=layer_seed(config.seed, layer["source"]),
        permute=config.permute,
    )
    return mask.row_order, mask.col_order


def seeded_layers(
    layers: dict[str, dict[str, Any]], modules: dict[str, nn.Module], config: MPDConfig | None
) -> dict[str, str]:
    """Of the manifest's ``layers`` (their modules by the same names), those whose orders are the
    ones ``config`` draws, with the digest of those orders: what a file may store as the seed."""
    if config is None or config.masks != "random":
        return {}
    seeded = {}
    for name, entry in layers.items():
        module = modules[name]
        row, col = _drawn(config, entry)
        if torch.equal(module.row_order.cpu().to(torch.int64), row) and torch.equal(
            module.col_order.cpu().to(torch.int64), col
        ):
            seeded[name] = _orders_digest(row, col)
    return seeded


def drawn_orders(manifest: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The orders a file leaves to its seed, drawn again and checked against their digests."""
    seeded = manifest.get("seeded_orders", {})
    if not seeded:
        return {}
    try:
        config = MPDConfig(**manifest["config"])
    except (MPDCompressError, TypeError) as exc:
        raise ModelFileError(f"{path}: the recorded compression config is invalid: {exc}") from None
    if config.masks != "random":
        raise ModelFileError(f"{path}: masks stored as seeds, but the recorded config chose masks={config.masks!r}")
    tensors = {}
    for name, digest in seeded.items():
        row, col = _drawn(config, manifest["layers"][name])
        if _orders_digest(row, col) != digest:
            raise ModelFileError(
                f"{path}: layer {name!r} stores its mask as seed {config.seed}, and this torch "
                f"({torch.__version__}) draws other permutations from it than the writer's did; load the file "
                "with the writer's torch and save it with mask_storage='orders'"
            )
        tensors[f"{name}.row_order"], tensors[f"{name}.col_order"] = row, col
    return tensors
