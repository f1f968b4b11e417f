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

from ..atomic import atomic_path
from ..errors import ConfigError, ExportError, first_line
from ..kernels import use_engine

__all__ = ["export_onnx", "ExportError", "MIN_OPSET", "max_opset"]

MIN_OPSET = 17  # LayerNormalization and the batched MatMul patterns the packed graph uses


def max_opset() -> int:
    """The newest opset the installed ``onnx`` package knows (torch exports up to it or refuses)."""
    try:
        import onnx
    except ImportError:
        return MIN_OPSET + 1
    return int(onnx.defs.onnx_opset_version())


Inputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
DynamicDims = dict[int, str]


def export_onnx(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    dynamic_dims: DynamicDims | tuple[DynamicDims, ...] | dict[str, DynamicDims] | None = None,
) -> Path:
    """Export ``model`` (packed or not) to ONNX; returns the path.

    A ``transformers`` model is exported without its key-value cache (``use_cache`` is off for
    the export and restored after).

    ``example_inputs``: one tensor, a tuple of positional tensors, or a dict of keyword tensors
    (``{"input_ids": ..., "attention_mask": ...}``), with the dtypes the model takes (token ids
    for a model that starts with an embedding). ``dynamic_dims`` names the dimensions that may
    change at run time, per input (``{0: "batch", 1: "sequence"}``; a tuple or dict of those for
    several inputs); a name used by several inputs is one dimension. By default (and with
    ``dynamic_batch``) dimension 0 of every input is the dynamic ``batch``.

    The packed forward traces to ``Gather`` (permutations), ``MatMul`` on ``(c, ., .)`` tensors
    (the block GEMMs) and ``Add``, which every ONNX runtime executes natively: the export always
    traces the PyTorch engine, whatever engine runs the model in this process.
    """
    if not MIN_OPSET <= opset <= max_opset():
        raise ConfigError(f"opset must be in {MIN_OPSET}..{max_opset()}, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, kwargs = _split_inputs(example_inputs)
    names = [*(["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]), *kwargs]
    options = {"input_names": names}
    dims = _dynamic_shapes(args, kwargs, dynamic_dims, dynamic_batch)
    if dims is not None:
        options["dynamic_shapes"] = dims
    # The exporter reports progress on stdout, logs and warns about optional packages; a library
    # stays quiet, and leaves the caller's model mode and logging as it found them.
    # torch also logs whole stack traces of failed tracing steps before it raises: the raised
    # ExportError says what failed.
    logger = logging.getLogger("torch")
    level, modes = logger.level, [(module, module.training) for module in model.modules()]
    logger.setLevel(logging.CRITICAL)
    model.eval()
    # A transformers decoder returns its key-value cache (a DynamicCache object the exporter
    # cannot describe) unless told not to: an exported graph maps inputs to outputs, no cache.
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False
    try:
        _check_runs(model, args, kwargs)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), use_engine("torch"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                opset_version=opset,
                external_data=False,
                output_names=["output"],
                verbose=False,
                **options,
            )
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many unrelated types; one precise one for callers
        raise ExportError(f"ONNX export failed: {exc}") from exc
    finally:
        logger.setLevel(level)
        for module, training in modes:
            module.training = training
        if use_cache:
            config.use_cache = use_cache
    written = dict(program.model.opset_imports).get("", opset)
    if written != opset:  # torch falls back to another opset without failing
        raise ExportError(f"ONNX export wrote opset {written} where opset {opset} was asked for")
    return atomic_path(path, lambda tmp: program.save(str(tmp)))


def _check_runs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """One eager forward on the example, so that inputs the model cannot take are refused with
    the model's own error instead of a tracer's."""
    try:
        with torch.no_grad(), use_engine("torch"):
            model(*args, **kwargs)
    except Exception as exc:
        shapes = [tuple(t.shape) for t in args] + [f"{k}={tuple(t.shape)}" for k, t in kwargs.items()]
        raise ExportError(f"the model does not run on the example inputs {shapes}: {first_line(exc)}") from None


def _split_inputs(inputs: Inputs) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        values = inputs.items()
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        values = enumerate(inputs)
        args, kwargs = tuple(inputs), {}
    else:
        raise ConfigError(f"example inputs must be a tensor, a tuple or a dict of tensors, not {type(inputs).__name__}")
    for key, value in values:
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"example input {key!r} is a {type(value).__name__}, not a tensor")
    if not args and not kwargs:
        raise ConfigError("no example inputs")
    return args, kwargs


def _dynamic_shapes(args, kwargs, dynamic_dims, dynamic_batch: bool):
    """torch.export's ``dynamic_shapes`` for the inputs: one ``Dim`` per distinct name."""
    count = len(args) + len(kwargs)
    if dynamic_dims is None:
        if not dynamic_batch:
            return None
        per_input = [{0: "batch"}] * count
    elif isinstance(dynamic_dims, dict) and all(isinstance(k, int) for k in dynamic_dims):
        per_input = [dynamic_dims] * count  # one spec for every input
    elif isinstance(dynamic_dims, dict):
        unknown = sorted(set(dynamic_dims) - set(kwargs))
        if unknown:
            raise ConfigError(f"dynamic_dims names inputs the example does not have: {unknown}")
        per_input = [dynamic_dims.get(name, {}) for name in kwargs]
    else:
        per_input = list(dynamic_dims)
        if len(per_input) != count:
            raise ConfigError(f"dynamic_dims has {len(per_input)} entries for {count} inputs")
    dims: dict[str, torch.export.Dim] = {}
    tensors = [*args, *kwargs.values()]
    specs = []
    for tensor, spec in zip(tensors, per_input):
        for axis in spec:
            if not 0 <= axis < tensor.dim():
                raise ConfigError(f"dynamic dimension {axis} does not exist on an input of shape {tuple(tensor.shape)}")
            if tensor.shape[axis] < 2:
                # torch.export treats sizes 0 and 1 as special and would fix the dimension.
                raise ConfigError(f"the example's size along dynamic dimension {axis} must be at least 2")
        specs.append(
            {axis: dims.setdefault(name, torch.export.Dim(name, min=1, max=1 << 20)) for axis, name in spec.items()}
        )
    # Inputs come either all positional or all by keyword (_split_inputs).
    if kwargs:
        return dict(zip(kwargs, specs))
    return tuple(specs)
