"""Checks ``load`` makes on a model built from a file, beyond the file's own consistency: the
masked weights really are masked, a template really is the file's architecture, and the model
runs on the input shape the file records (a file that loads must be a model that runs)."""

from __future__ import annotations

import math
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..core.layout import BlockLayout
from ..core.masks import MPDMask
from ..errors import CompressionError, ModelFileError, UnsupportedArchitectureError, first_line
from ..kernels.quantized_blocks import QuantizedWeight
from ..nn.quantized import QuantizedLinear, quantized_problem
from .architecture import describe
from .layer_kinds import PACKED_KINDS, QUANTIZED_KINDS

__all__ = ["check_layer_tensors", "check_quantized_dense", "check_template", "check_runs"]


def check_layer_tensors(state: dict[str, torch.Tensor], manifest: dict[str, Any], path: Path) -> None:
    """What ``save`` never writes: nonzero padding in an uneven packed layer (the packed model
    would compute something other than its masked form, and differently with and without
    autograd), or nonzero weights off a masked layer's mask (loading would zero them silently)."""
    for name, layer in manifest["layers"].items():
        layout = BlockLayout.create(layer["d_out"], layer["d_in"], layer["compression"], name)
        if layer["kind"] in QUANTIZED_KINDS:
            problem = quantized_problem(_quantized_weight(state, name, layer, layout), layout)
            if problem is not None:
                raise ModelFileError(f"{path}: {name}: {problem}")
            continue
        if layer["kind"] in PACKED_KINDS:
            blocks = state[f"{name}.weight_blocks"]
            if layer["kind"] == "BlockDiagonalConv":  # stored as the grouped convolution's weight
                blocks = blocks.reshape(layout.compression, layout.max_rows, *blocks.shape[1:])
            where = layout.nonzero_padding(blocks, state.get(f"{name}.bias"))
            if where is not None:
                raise ModelFileError(f"{path}: padding entries of {name}.{where} are not zero")
            continue
        mask = MPDMask(layout, state[f"{name}.row_order"].long(), state[f"{name}.col_order"].long()).dense()
        weight = state[f"{name}.weight"]
        mask = mask.view(*mask.shape, *[1] * (weight.dim() - 2))  # a convolution's, at every kernel position
        if bool(weight.masked_fill(mask, 0).any()):
            raise ModelFileError(f"{path}: {name}.weight holds nonzero values off its mask")


def check_quantized_dense(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """The same checks for the quantized dense layers the architecture holds (scales finite and
    positive, zero points in range, the padding nibble zero)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            try:
                module.check_incoming(state, f"{name}.")
            except CompressionError as exc:
                raise ModelFileError(f"{path}: {exc}") from None


def _quantized_weight(state: dict[str, torch.Tensor], name: str, layer: dict[str, Any], layout: BlockLayout):
    c, rows, cols = layout.compression, layout.max_rows, layout.max_cols
    kernel = layer.get("kernel_size") or []
    shape = (c * rows, cols, *kernel) if kernel else (c, rows, cols)
    quantization = layer["quantization"]
    group = cols * math.prod(kernel) if quantization["bits"] == 8 else quantization["group_size"]
    return QuantizedWeight(
        state[f"{name}.qweight"],
        state[f"{name}.scales"],
        state.get(f"{name}.zero_points"),
        quantization["bits"],
        shape,
        group,
    )


def check_template(model: nn.Module, manifest: dict[str, Any], path: Path) -> None:
    """The template, compressed as the file says, must have the file's whole architecture
    (a Tanh where the file has a ReLU loads the same tensors into another function)."""
    recorded = manifest.get("architecture")
    if recorded is None:
        return
    try:
        built = describe(model)
    except UnsupportedArchitectureError:
        return  # custom modules: the file cannot record them either
    if built != recorded:
        raise ModelFileError(
            f"{path}: the model given is not the file's architecture ({_first_difference(built, recorded)})"
        )


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}".strip("."))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"at {where or 'the root'}: the model has {str(a)[:80]}, the file {str(b)[:80]}"


def check_runs(model: nn.Module, manifest: dict[str, Any], path: Path) -> None:
    """One forward on the meta device (shapes only, nothing allocated) on the recorded input
    shape: layers that do not fit each other, nesting deeper than Python's stack, tensors of
    dtypes that cannot meet are refused here rather than at the user's first call. Only for
    models made of the modules a file can describe (all of which run on meta): the forward of a
    user's own module may do what meta tensors cannot (``.item()``)."""
    input_shape = manifest.get("input_shape")
    if input_shape is None:
        return
    try:
        describe(model)
    except UnsupportedArchitectureError:
        return
    tensors = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    on_meta = {name: torch.empty_like(t, device="meta") for name, t in tensors}
    floats = [t.dtype for t in on_meta.values() if t.is_floating_point()]
    first = next((m for m in model.modules() if not isinstance(m, (nn.Sequential, nn.ModuleList))), None)
    if isinstance(first, nn.Embedding):
        x = torch.empty((1, *input_shape), dtype=torch.int64, device="meta")
    else:
        x = torch.empty((1, *input_shape), dtype=floats[0] if floats else torch.float32, device="meta")
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            functional_call(model, on_meta, (x,))
    except NotImplementedError:
        return  # an operation without a meta kernel: nothing is known either way
    except Exception as exc:  # RecursionError included
        raise ModelFileError(
            f"{path}: the model cannot run on its recorded input shape {tuple(input_shape)}: {first_line(exc)}"
        ) from None
    finally:
        for module, mode in training:
            module.training = mode
