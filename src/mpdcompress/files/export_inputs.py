"""The example inputs an exporter traces with (ONNX, ExecuTorch): their forms, the dynamic
dimensions named on them, and one eager check that the model takes them."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ConfigError, ExportError, first_line
from ..kernels import use_engine

__all__ = ["Inputs", "DynamicDims", "split_inputs", "dynamic_shapes", "check_runs_on", "quiet_export"]

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
DynamicDims = dict[int, str]


def check_runs_on(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """One eager forward on the example, so that inputs the model cannot take are refused with
    the model's own error instead of a tracer's."""
    try:
        with torch.no_grad(), use_engine("torch"):
            model(*args, **kwargs)
    except Exception as exc:
        shapes = [tuple(t.shape) for t in args] + [f"{k}={tuple(t.shape)}" for k, t in kwargs.items()]
        raise ExportError(f"the model does not run on the example inputs {shapes}: {first_line(exc)}") from None


def split_inputs(inputs: Inputs) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """``(positional, keyword)`` tensors of an example: one tensor, a tuple or a dict of them."""
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


def dynamic_shapes(args, kwargs, dynamic_dims, dynamic_batch: bool, max_size: int = 1 << 20):
    """torch.export's ``dynamic_shapes`` for the inputs: one ``Dim`` per distinct name, each up
    to ``max_size``."""
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
            {axis: dims.setdefault(name, torch.export.Dim(name, min=1, max=max_size)) for axis, name in spec.items()}
        )
    # Inputs come either all positional or all by keyword (split_inputs).
    if kwargs:
        return dict(zip(kwargs, specs))
    return tuple(specs)


@contextlib.contextmanager
def quiet_export(model: nn.Module) -> Iterator[None]:
    """The model in eval mode on the PyTorch engine, traced without a key-value cache, with the
    exporters' stdout, logs and warnings silenced; modes, logging and config restored after.

    Exporters report progress on stdout, log whole stack traces of failed tracing steps and warn
    about optional packages: a library stays quiet, and the ExportError raised says what failed.
    A transformers decoder returns its key-value cache (a DynamicCache object no exporter can
    describe) unless told not to: an exported graph maps inputs to outputs.
    """
    logger = logging.getLogger("torch")
    level, modes = logger.level, [(module, module.training) for module in model.modules()]
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    logger.setLevel(logging.CRITICAL)
    model.eval()
    if use_cache:
        config.use_cache = False
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), use_engine("torch"):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        for module, training in modes:
            module.training = training
        if use_cache:
            config.use_cache = use_cache
