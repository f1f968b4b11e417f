"""ExecuTorch export (PyTorch's mobile and edge runtime): ``torch.export`` → XNNPACK → ``.pte``.

The packed forward exports as gathers, batched matrix products and element-wise ops, which the
XNNPACK backend runs; a quantized model's dequantization exports with it (core ATen ops only).
``pip install "mpdcompress[mobile]"`` installs ExecuTorch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import ConfigError, ExportError, MissingDependencyError
from .export_inputs import DynamicDims, Inputs, check_runs_on, dynamic_shapes, quiet_export, split_inputs

__all__ = ["export_executorch", "run_executorch"]


def _executorch():
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise MissingDependencyError(f'ExecuTorch export needs executorch (pip install "mpdcompress[mobile]"): {exc}')
    return XnnpackPartitioner, to_edge_transform_and_lower


def export_executorch(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    dynamic_dims: DynamicDims | tuple[DynamicDims, ...] | dict[str, DynamicDims] | None = None,
    max_size: int = 256,
) -> Path:
    """Export ``model`` (packed, quantized or not) to an ExecuTorch program lowered to XNNPACK;
    returns the path of the ``.pte`` file.

    ``example_inputs`` and ``dynamic_dims`` as for :func:`~mpdcompress.export_onnx` (by default
    dimension 0 of every input is a dynamic batch), each dynamic dimension at most ``max_size``:
    ExecuTorch plans its memory for the largest shapes ahead of time, so the bound is what the
    program reserves. Check the file with :func:`run_executorch`.
    """
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 2:
        raise ConfigError(f"max_size must be an int of at least 2, got {max_size!r}")
    partitioner, lower = _executorch()
    args, kwargs = split_inputs(example_inputs)
    dims = dynamic_shapes(args, kwargs, dynamic_dims, dynamic_batch, max_size)
    try:
        with (
            quiet_export(model),
            torch.no_grad(),
        ):  # eval mode first, so the check forward moves no BatchNorm statistics
            check_runs_on(model, args, kwargs)
            program = torch.export.export(model, args, kwargs or None, dynamic_shapes=dims)
            buffer = lower(program, partitioner=[partitioner()]).to_executorch().buffer
    except ExportError:
        raise
    except Exception as exc:  # torch.export and the lowering raise many unrelated types
        raise ExportError(f"ExecuTorch export failed: {exc}") from exc
    return atomic_path(Path(path), lambda tmp: tmp.write_bytes(buffer))


def run_executorch(path: str | os.PathLike, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run the ``forward`` method of a ``.pte`` file in ExecuTorch's runtime on ``inputs``."""
    try:
        from executorch.runtime import Runtime
    except ImportError as exc:
        raise MissingDependencyError(f'running a .pte file needs executorch (pip install "mpdcompress[mobile]"): {exc}')
    method = Runtime.get().load_program(Path(path)).load_method("forward")
    return list(method.execute(list(inputs)))
