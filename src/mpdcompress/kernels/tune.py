"""Measure the Triton engine's tiles for a model ahead of time, outside any CUDA-graph capture."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from . import tuning
from .dispatch import use_engine

__all__ = ["tune"]


def tune(
    model: nn.Module, example_input: torch.Tensor, *, batch_sizes: Sequence[int] | None = None, training: bool = False
) -> int:
    """Run ``model`` on the Triton engine once per batch size so that every kernel it launches
    has its tile measured and stored in the tile cache (see :mod:`mpdcompress.kernels.tuning`).

    Call it before capturing CUDA graphs (``torch.compile(mode="reduce-overhead")`` included),
    which would otherwise keep an untuned tile. ``example_input`` is one batch of real or random
    input; ``batch_sizes`` (default: its own) are made from its first row. ``training`` also runs
    the backward (input and weight gradients, through ``torch.autograd.grad``: no ``.grad`` of
    the model changes). Returns how many tile choices the cache now holds for this GPU.
    """
    if os.environ.get("MPDCOMPRESS_AUTOTUNE", "1") == "0":
        raise ConfigError("MPDCOMPRESS_AUTOTUNE=0 switches tile measurement off; unset it to tune")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        raise ConfigError("example_input must be a tensor with a batch dimension")
    if tuning.capturing(example_input.device):
        raise ConfigError("tune() measures kernels, which cannot happen inside a CUDA-graph capture")
    sizes = list(batch_sizes) if batch_sizes is not None else [example_input.shape[0]]
    if not sizes or any(type(b) is not int or b < 1 for b in sizes):
        raise ConfigError(f"batch_sizes must be positive integers, got {sizes}")
    params = [p for p in model.parameters() if p.requires_grad]
    with use_engine("triton"):
        for batch in sizes:
            x = example_input[:1].expand(batch, *example_input.shape[1:]).clone()
            if not training:
                with torch.no_grad():
                    model(x)
                continue
            if x.is_floating_point():
                x.requires_grad_(True)
            out = model(x)
            inputs = params + ([x] if x.requires_grad else [])
            torch.autograd.grad(out.float().sum(), inputs, allow_unused=True)
    return len(tuning._table(example_input.device))
