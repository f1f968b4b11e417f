"""Tile sizes for the Triton kernels: candidates per batch bucket, measured once per shape.

Triton's own ``@autotune`` re-checks its cache key on every call, which cost 35-70 µs of host
time per launch on an H100 (as much as a dense ``nn.Linear``). Here the choice is made once per
(kernel, batch bucket, block shape, dtype, device) and later launches only look up a dict.

Tuning is skipped (the bucket's first candidate is used, not cached) while a CUDA graph is being
captured, under Triton's interpreter, and when ``MPDCOMPRESS_AUTOTUNE=0``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import EngineUnavailableError

__all__ = ["TileConfig", "batch_bucket", "choose", "interpreting", "candidates"]


@dataclass(frozen=True)
class TileConfig:
    block_b: int  # batch entries per program (for the weight gradient: the reduction step)
    block_r: int  # block rows per program
    block_k: int  # block columns per step (for the weight gradient: columns per program)
    num_warps: int = 4
    num_stages: int = 3


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The interpreter runs every program in Python: one small tile keeps test shapes multi-tile.
_INTERPRETER = TileConfig(16, 16, 16, 1, 1)


def batch_bucket(batch: int) -> int:
    """Powers of two up to 4096: nearby batch sizes share one measured choice."""
    bucket = 1
    while bucket < min(batch, 4096):
        bucket *= 2
    return bucket


# (block_b, block_r, block_k, num_warps, num_stages). Small batches read weights (GEMV-like):
# many narrow row tiles so every SM streams weights; large batches are GEMMs: big square tiles.
# fmt: off
_WEIGHT_GRAD = [(32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (32, 128, 64, 4, 3), (64, 128, 128, 8, 3),
                (32, 128, 128, 8, 4), (64, 64, 128, 4, 4), (16, 32, 64, 4, 4), (128, 64, 64, 4, 3)]
_LINEAR_BY_BUCKET = [  # (largest batch bucket, candidates); None: every larger bucket
    (16, [(16, 32, 128, 4, 4), (16, 16, 128, 4, 4), (16, 16, 256, 4, 3), (16, 32, 256, 4, 3),
          (16, 64, 128, 4, 4), (16, 64, 64, 4, 5), (16, 32, 64, 2, 5), (16, 16, 64, 2, 6)]),
    (128, [(32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (64, 128, 64, 4, 3),
           (16, 64, 128, 4, 4), (32, 32, 128, 4, 4), (64, 32, 64, 4, 4), (128, 64, 64, 8, 3)]),
    (None, [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
            (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 128, 128, 8, 3)]),
]
# fmt: on


def candidates(kernel: str, bucket: int) -> list[TileConfig]:
    """Tiles worth trying for ``kernel`` ("linear" or "weight_grad") at this batch bucket."""
    if kernel == "weight_grad":
        rows = _WEIGHT_GRAD
    else:
        rows = next(rows for ceiling, rows in _LINEAR_BY_BUCKET if ceiling is None or bucket <= ceiling)
    return [TileConfig(*row) for row in rows]


_chosen: dict[tuple, TileConfig] = {}


def choose(
    kernel: str, batch: int, shape_key: tuple, device: torch.device, run: Callable[[TileConfig], object]
) -> TileConfig:
    """The tile config for this call; ``run(config)`` launches the kernel (used to time candidates)."""
    if interpreting():
        return _INTERPRETER
    bucket = batch_bucket(batch)
    key = (kernel, bucket, shape_key, device.index)
    chosen = _chosen.get(key)
    if chosen is not None:
        return chosen
    options = candidates(kernel, bucket)
    if os.environ.get("MPDCOMPRESS_AUTOTUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        return options[0]
    from triton.testing import do_bench

    timings = {}
    for config in options:
        try:
            timings[config] = do_bench(lambda config=config: run(config), warmup=5, rep=25)
        except Exception as exc:  # a tile that needs more shared memory than the GPU has
            if "out of resource" not in str(exc).lower() and "OutOfResources" not in type(exc).__name__:
                raise
    if not timings:
        raise EngineUnavailableError(f"no tile configuration of {kernel} fits this GPU for shape {shape_key}")
    _chosen[key] = min(timings, key=timings.get)
    return _chosen[key]
