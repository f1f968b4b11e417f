"""ONNX export of packed models (Gather + batched MatMul + Add, opset >= 17)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path
from .errors import ConfigError, ExportError
from .kernels import use_engine

__all__ = ["export_onnx", "ExportError", "MIN_OPSET", "max_opset"]

MIN_OPSET = 17  # LayerNormalization and the batched MatMul patterns the packed graph uses


def max_opset() -> int:
    """The newest opset the installed ``onnx`` package knows (torch exports up to it or refuses)."""
    try:
        import onnx
    except ImportError:
        return MIN_OPSET + 1
    return int(onnx.defs.onnx_opset_version())


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` (packed or not) to ONNX with a dynamic batch dimension; returns the path.

    The packed forward traces to ``Gather`` (permutations), ``MatMul`` on ``(c, ., .)`` tensors
    (the block GEMMs) and ``Add``, which every ONNX runtime executes natively: the export always
    traces the PyTorch engine, whatever engine runs the model in this process.
    """
    if not MIN_OPSET <= opset <= max_opset():
        raise ConfigError(f"opset must be in {MIN_OPSET}..{max_opset()}, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)
    # The exporter reports progress on stdout, logs and warns about optional packages; a library
    # stays quiet, and leaves the caller's model mode and logging as it found them.
    logger = logging.getLogger("torch.onnx")
    level, modes = logger.level, [(module, module.training) for module in model.modules()]
    logger.setLevel(logging.ERROR)
    model.eval()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), use_engine("torch"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example_input,),
                dynamo=True,
                opset_version=opset,
                external_data=False,
                input_names=["input"],
                output_names=["output"],
                verbose=False,
                **kwargs,
            )
    except Exception as exc:  # the exporter raises many unrelated types; one precise one for callers
        raise ExportError(f"ONNX export failed: {exc}") from exc
    finally:
        logger.setLevel(level)
        for module, training in modes:
            module.training = training
    written = dict(program.model.opset_imports).get("", opset)
    if written != opset:  # torch falls back to another opset without failing
        raise ExportError(f"ONNX export wrote opset {written} where opset {opset} was asked for")
    return atomic_path(path, lambda tmp: program.save(str(tmp)))
