"""Tile sizes for the Triton kernels: candidates per batch bucket, measured once per shape.

Triton's own ``@autotune`` re-checks its cache key on every call, which cost 35-70 µs of host
time per launch on an H100 (as much as a dense ``nn.Linear``). Here the choice is made once per
(kernel, batch bucket, complete launch key, GPU model) and later launches only look up a dict.
Choices persist in a small JSON file per GPU model (``~/.cache/mpdcompress/tiles.json``, or
``MPDCOMPRESS_TILE_CACHE``), so a process measures only what no earlier one did.

Nothing is measured while a CUDA graph is being captured (the bucket's first candidate is used,
not cached, with a warning: call :func:`mpdcompress.tune` before capturing), under Triton's
interpreter, or when ``MPDCOMPRESS_AUTOTUNE=0``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import EngineUnavailableError

__all__ = ["TileConfig", "batch_bucket", "choose", "interpreting", "candidates", "cache_path", "capturing", "measure"]


@dataclass(frozen=True)
class TileConfig:
    """One tile choice of the Triton kernels: tile sizes along batch, rows and columns, warps, stages."""

    block_b: int  # batch entries per program (for the weight gradient: the reduction step)
    block_r: int  # block rows per program
    block_k: int  # block columns per step (for the weight gradient: columns per program)
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False  # linear only: the block's rows on the MMA's M dimension (small batches)
    split_k: int = 1  # linear only: programs sharing one tile's columns (batch 1)


# Triton reads TRITON_INTERPRET when its kernels are defined, so it is read once here too (a
# per-call environment lookup was host time on every launch).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """Whether Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _INTERPRETING


# The interpreter runs every program in Python: one small tile keeps test shapes multi-tile.
_INTERPRETER = TileConfig(16, 16, 16, 1, 1)


def batch_bucket(batch: int) -> int:
    """Powers of two up to 4096: nearby batch sizes share one measured choice."""
    return 1 if batch <= 1 else 1 << (min(batch, 4096) - 1).bit_length()


# (block_b, block_r, block_k, num_warps, num_stages[, swap_ab, split_k]). Small batches read
# weights (GEMV-like): many narrow row tiles so every SM streams weights, split K at batch 1, and
# swapped tiles whose M dimension is the block's rows; large batches are GEMMs: big square tiles.
# Which wins where is for the measurement to say (``choose``), not for these lists.
# fmt: off
_WEIGHT_GRAD = [(32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (32, 128, 64, 4, 3), (64, 128, 128, 8, 3),
                (32, 128, 128, 8, 4), (64, 64, 128, 4, 4), (16, 32, 64, 4, 4), (128, 64, 64, 4, 3)]
_LINEAR_BY_BUCKET = [  # (largest batch bucket, candidates); None: every larger bucket
    (1, [(16, 32, 128, 4, 4), (16, 16, 128, 4, 4), (16, 64, 128, 4, 4, True), (16, 128, 64, 4, 4, True),
         (16, 32, 128, 4, 4, False, 4), (16, 16, 256, 4, 3, False, 8), (16, 64, 128, 4, 4, True, 4),
         (16, 64, 64, 4, 4, True, 8)]),
    (16, [(16, 32, 128, 4, 4), (16, 16, 128, 4, 4), (16, 32, 256, 4, 3), (16, 64, 64, 4, 5),
          (16, 64, 128, 4, 4, True), (16, 128, 64, 4, 3, True), (16, 128, 128, 8, 3, True),
          (16, 64, 256, 4, 3, True)]),
    (128, [(32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (64, 128, 64, 4, 3),
           (16, 64, 128, 4, 4), (128, 64, 64, 8, 3), (32, 128, 64, 4, 4, True), (64, 128, 64, 4, 3, True)]),
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


# Per GPU model: launch key (as text) -> chosen tile; loaded from the cache file on first use.
_chosen: dict[str, dict[str, TileConfig]] = {}
# The same choices by (kernel, bucket, launch key, device) as given: the per-call lookup, which
# builds no text and asks the driver nothing.
_recent: dict[tuple, TileConfig] = {}
_warned: set[str] = set()


def cache_path() -> Path:
    """The file that keeps measured tile choices: ``$MPDCOMPRESS_TILE_CACHE`` or ``~/.cache/mpdcompress/tiles.json``."""
    return Path(os.environ.get("MPDCOMPRESS_TILE_CACHE") or Path.home() / ".cache" / "mpdcompress" / "tiles.json")


def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):  # no cache yet, or a damaged one: measure again
        return {}
    return data if isinstance(data, dict) else {}


def _table(device: torch.device) -> dict[str, TileConfig]:
    gpu = _gpu_name(device)
    if gpu not in _chosen:
        stored = _read_cache().get(gpu, {})
        table = {}
        for key, fields in stored.items() if isinstance(stored, dict) else ():
            try:
                table[key] = TileConfig(**fields)
            except TypeError:  # written by another version of the kernels
                continue
        _chosen[gpu] = table
    return _chosen[gpu]


def _save(device: torch.device) -> None:
    from ..atomic import write_atomic

    data = _read_cache()
    data[_gpu_name(device)] = {key: asdict(cfg) for key, cfg in _chosen[_gpu_name(device)].items()}
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_path(), lambda f: f.write(json.dumps(data, indent=1, sort_keys=True).encode()))
    except OSError as exc:  # a read-only home: the choice still holds for this process
        warnings.warn(f"mpdcompress: cannot write the tile cache {cache_path()}: {exc}", stacklevel=3)


def measure(options: list, run: Callable[[object], object]) -> dict:
    """Milliseconds of ``run(option)`` for each option that fits the GPU (Triton's ``do_bench``)."""
    from triton.testing import do_bench

    timings = {}
    for config in options:
        try:
            timings[config] = do_bench(lambda config=config: run(config), warmup=5, rep=25)
        except Exception as exc:  # a tile that needs more shared memory than the GPU has
            if "out of resource" not in str(exc).lower() and "OutOfResources" not in type(exc).__name__:
                raise
    return timings


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def choose(
    kernel: str, batch: int, shape_key: tuple, device: torch.device, run: Callable[[TileConfig], object]
) -> TileConfig:
    """The tile config for this call; ``run(config)`` launches the kernel (used to time candidates).
    ``shape_key`` must hold everything the launch specialises on (sizes, dtype, strides, flags)."""
    if interpreting():
        return _INTERPRETER
    bucket = batch_bucket(batch)
    recent = _recent.get((kernel, bucket, shape_key, device))
    if recent is not None:
        return recent
    key = repr((kernel, bucket, *shape_key))
    table = _table(device)
    chosen = table.get(key)
    if chosen is not None:
        _recent[kernel, bucket, shape_key, device] = chosen
        return chosen
    options = candidates(kernel, bucket)
    if os.environ.get("MPDCOMPRESS_AUTOTUNE", "1") == "0":
        return options[0]
    if capturing(device):
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"mpdcompress: no measured tile for {kernel} at batch {batch} while capturing a CUDA graph; "
                "the graph keeps an untuned tile. Call mpdcompress.tune(model, example_input) before capturing.",
                stacklevel=2,
            )
        return options[0]
    timings = measure(options, run)
    if not timings:
        raise EngineUnavailableError(f"no tile configuration of {kernel} fits this GPU for shape {shape_key}")
    table[key] = _recent[kernel, bucket, shape_key, device] = min(timings, key=timings.get)
    _save(device)
    return table[key]
