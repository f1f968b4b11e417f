"""ExecuTorch export (PyTorch's mobile and edge runtime): ``torch.export`` → XNNPACK → ``.pte``.

The packed forward exports as gathers, one linear per block (XNNPACK runs those far faster than
a batched matrix product) and element-wise ops, which the XNNPACK backend runs. A quantized model
exports its batched products and its dequantization (core ATen ops only), so it computes exactly
the weight-only result but dequantizes its blocks at every call. With ``int8_activations``,
symmetric quantized linear layers export instead as XNNPACK's own quantized kernels run them:
per block, activations quantized to int8 per row on the fly, times the block's int8 or int4
integers (:class:`Int8ActivationBlocks`). ``pip install "mpdcompress[mobile]"`` installs
ExecuTorch.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path
from ..errors import ConfigError, ExportError, MissingDependencyError
from ..kernels.quantized_blocks import SYMMETRIC_INT4_ZERO, QuantizedWeight, unpack_int4
from ..nn.packed import BlockDiagonalLinear
from ..nn.quantized import QuantizedBlockDiagonalLinear, QuantizedBlocks, QuantizedLinear
from .block_forms import PerBlockProducts, set_export_form
from .export_inputs import DynamicDims, Inputs, check_runs_on, dynamic_shapes, quiet_export, split_inputs

__all__ = ["export_executorch", "run_executorch", "Int8ActivationBlocks"]


def _executorch():
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise MissingDependencyError(f'ExecuTorch export needs executorch (pip install "mpdcompress[mobile]"): {exc}')
    return XnnpackPartitioner, to_edge_transform_and_lower


class FloatBlockLinears(PerBlockProducts):
    """Float blocks as per-block linear layers, each block a constant of the program: XNNPACK runs
    a linear with constant weights far faster than a batched matrix product (a probe of 8 blocks of
    512 x 2048 ran 8x faster at batch 1)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.shape = tuple(blocks.shape)
        self.blocks = [b.detach().clone() for b in blocks.unbind(0)]

    def _block(self, k: int, a: torch.Tensor) -> torch.Tensor:
        return F.linear(a, self.blocks[k])


class Int8ActivationBlocks(PerBlockProducts):
    """Integer blocks in the form ExecuTorch's XNNPACK backend runs quantized: per block, torchao's
    per-row int8 quantization of the activations and the block's integers dequantized by torchao's
    ``dequantize_affine`` into ``linear``, the pattern XNNPACK's partitioner lowers to its
    kernels for int8 activations times int8 or int4 weights. Built before tracing, so that each
    block's integers, scales and zero points are constants of the program."""

    def __init__(self, weight: QuantizedWeight) -> None:
        from ..core.quantize import _primitives  # registers torchao's operators; says what to install

        _primitives()
        c, rows = weight.qweight.shape[:2]
        self.shape = (c, rows, weight.inputs)
        self.group = weight.group_size
        self.padded = weight.scales.shape[-1] * self.group  # whole groups: the activations are padded with zeros
        if weight.bits == 8:
            q, zeros, self.range = weight.qweight, None, (-128, 127)
        else:  # torchao's int4 is int8 in -8..7: nibbles and zero points shift by 8 alike
            q = (unpack_int4(weight.qweight)[..., : weight.inputs] - SYMMETRIC_INT4_ZERO).to(torch.int8)
            zeros = None if weight.zero_points is None else (weight.zero_points.to(torch.int16) - 8).to(torch.int8)
            self.range = (-8, 7)
        q = F.pad(q, (0, self.padded - weight.inputs))
        zeros = torch.zeros_like(weight.scales, dtype=torch.int8) if zeros is None else zeros
        self.blocks = [(q[k].clone(), weight.scales[k].float().clone(), zeros[k].clone()) for k in range(c)]

    def _block(self, k: int, a: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.torchao
        if self.padded != self.shape[2]:
            a = F.pad(a, (0, self.padded - self.shape[2]))
        per_row = [1, self.padded]
        scale, zero = ops.choose_qparams_affine(a, "ASYMMETRIC", per_row, torch.int8, -128, 127, None, None, torch.int8)
        a = ops.dequantize_affine(
            ops.quantize_affine(a, per_row, scale, zero, torch.int8, -128, 127),
            per_row,
            scale,
            zero,
            torch.int8,
            -128,
            127,
        )
        q, scales, zeros = self.blocks[k]
        w = ops.dequantize_affine(q, [1, self.group], scales, zeros, torch.int8, *self.range)
        return F.linear(a, w)


class XnnpackDequantizedBlocks(PerBlockProducts):
    """Integer blocks dequantized in the program by operators XNNPACK runs, then one linear per
    block. XNNPACK has no kernel for float activations times integer weights, and ExecuTorch's
    portable operators, which would take integer casts and nibble arithmetic, ran a block 30-100x
    slower than its float linear; but XNNPACK converts int8 to float (``dequantize_per_tensor``
    with scale 1), does float arithmetic, and runs a linear whose weights the program computes.
    So int8 rows become ``float(q) * scale``; int4 bytes are stored as int8 (minus 128) holding,
    per group, input ``j`` in the low nibble and input ``j + group / 2`` in the high one, split in
    float (``hi = floor(b / 16)``, ``lo = b - 16 hi``, exact for integers), so each half of every
    group is one linear over the matching half of the input: no interleaving copy. The weights
    are exactly the dequantized blocks (one rounding, of the product by the scale); int4 sums two
    linears, so its output differs from the weight-only one by float rounding."""

    def __init__(self, weight: QuantizedWeight) -> None:
        from torch.ao.quantization.fx import _decomposed  # noqa: F401 (registers quantized_decomposed)

        c, rows = weight.qweight.shape[:2]
        self.shape = (c, rows, weight.inputs)
        self.bits, self.group = weight.bits, weight.group_size
        scales = weight.scales.float()
        if weight.bits == 8:
            self.blocks = [(q.clone(), s.clone(), None) for q, s in zip(weight.qweight.unbind(0), scales.unbind(0))]
            return
        groups = scales.shape[-1]
        nibbles = F.pad(unpack_int4(weight.qweight)[..., : weight.inputs], (0, groups * self.group - weight.inputs))
        halves = nibbles.unflatten(-1, (groups, 2, self.group // 2))
        stored = (halves[..., 0, :] + 16 * halves[..., 1, :] - 128).to(torch.int8)  # (c, rows, groups, group / 2)
        zeros = weight.zero_points  # symmetric: the constant 8, no tensor in the program
        self.blocks = [
            (
                stored[k].clone(),
                scales[k].unsqueeze(-1).clone(),
                SYMMETRIC_INT4_ZERO if zeros is None else zeros[k].float().unsqueeze(-1).clone(),
            )
            for k in range(c)
        ]

    def _block(self, k: int, a: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        q, scales, zeros = self.blocks[k]
        if self.bits == 8:
            return F.linear(a, ops.dequantize_per_tensor(q, 1.0, 0, -128, 127, torch.int8) * scales)
        rows, groups, half = q.shape
        stored = ops.dequantize_per_tensor(q, 1.0, -128, -128, 127, torch.int8)  # the bytes, 0..255
        high = torch.floor(stored * 0.0625)
        low = stored - 16 * high
        a = F.pad(a, (0, groups * 2 * half - a.shape[-1])).unflatten(-1, (groups, 2, half))
        y = F.linear(a[..., 0, :].flatten(-2), ((low - zeros) * scales).reshape(rows, -1))
        return y + F.linear(a[..., 1, :].flatten(-2), ((high - zeros) * scales).reshape(rows, -1))


class SlicedLocalResponseNorm(nn.Module):
    """``nn.LocalResponseNorm`` from channel slices: torch lowers it to ``avg_pool3d``, for which
    ExecuTorch has no kernel; the same window sum as ``size`` shifted slices of the padded
    squares (XNNPACK pads, slices and adds), equal to torch's up to the order of the sum."""

    def __init__(self, norm: nn.LocalResponseNorm) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = norm.size, norm.alpha, norm.beta, norm.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        pad = [0, 0] * (x.dim() - 2) + [self.size // 2, (self.size - 1) // 2]
        squares = F.pad(x * x, pad)
        window = sum(squares[:, j : j + channels] for j in range(self.size))
        return x / (window * (self.alpha / self.size) + self.k) ** self.beta


def _local_response_norm_form(model: nn.Module) -> None:
    """Every ``nn.LocalResponseNorm`` of ``model`` (an export copy) as :class:`SlicedLocalResponseNorm`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LocalResponseNorm):
                setattr(parent, name, SlicedLocalResponseNorm(child))


def _float_block_form(model: nn.Module) -> None:
    """Float packed linear layers of ``model`` (an export copy) run as :class:`FloatBlockLinears`."""
    for layer in model.modules():
        if isinstance(layer, BlockDiagonalLinear) and not isinstance(layer, QuantizedBlocks):
            with torch.no_grad():
                layer.export_gemm = FloatBlockLinears(layer.effective_blocks())
            layer.register_parameter("weight_blocks", None)  # unused now; a program would store it too


def _int8_activation_form(model: nn.Module) -> None:
    """Symmetric quantized linear layers (packed and dense) of ``model`` (an export copy) run as
    :class:`Int8ActivationBlocks`. Convolutions and asymmetric int4 layers stay weight-only:
    XNNPACK's quantized kernels take neither: its blockwise int4 weights have one scale per block
    and a fixed zero point of 8, so per-group zero points would be lost (outputs were 20 % off)."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, (QuantizedBlockDiagonalLinear, QuantizedLinear)) and m.zero_points is None
    ]
    if not layers:
        raise ConfigError(
            "int8_activations: the model has no symmetric quantized linear layer (quantize_ it first; "
            "asymmetric int4 and convolutions stay weight-only)"
        )
    for layer in layers:
        set_export_form(layer, Int8ActivationBlocks(layer.quantized_weight()))


def _weight_only_form(model: nn.Module) -> None:
    """Quantized linear layers (packed and dense) of ``model`` (an export copy) that no other form
    took run as :class:`XnnpackDequantizedBlocks`."""
    for layer in model.modules():
        if isinstance(layer, (QuantizedBlockDiagonalLinear, QuantizedLinear)) and layer.export_gemm is None:
            set_export_form(layer, XnnpackDequantizedBlocks(layer.quantized_weight()))


def export_executorch(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    dynamic_dims: DynamicDims | tuple[DynamicDims, ...] | dict[str, DynamicDims] | None = None,
    max_size: int = 256,
    int8_activations: bool = False,
) -> Path:
    """Export ``model`` (packed, quantized or not) to an ExecuTorch program lowered to XNNPACK;
    returns the path of the ``.pte`` file.

    ``example_inputs`` and ``dynamic_dims`` as for :func:`~mpdcompress.export_onnx` (by default
    dimension 0 of every input is a dynamic batch), each dynamic dimension at most ``max_size``:
    ExecuTorch plans its memory for the largest shapes ahead of time, so the bound is what the
    program reserves. Check the file with :func:`run_executorch`.

    A quantized model exports exactly (weight-only: its blocks dequantized at every call). With
    ``int8_activations`` its symmetric quantized linear layers run in XNNPACK's quantized kernels
    instead, activations rounded to int8 per row on the fly: faster, and close to but not exactly
    the weight-only output (needs torchao); convolutions and asymmetric int4 stay weight-only.
    """
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 2:
        raise ConfigError(f"max_size must be an int of at least 2, got {max_size!r}")
    partitioner, lower = _executorch()
    model = copy.deepcopy(model)  # the export forms are set on a copy
    _local_response_norm_form(model)
    _float_block_form(model)
    if int8_activations:
        _int8_activation_form(model)
    _weight_only_form(model)
    args, kwargs = split_inputs(example_inputs)
    dims = dynamic_shapes(args, kwargs, dynamic_dims, dynamic_batch, max_size)
    try:
        with (
            quiet_export(model),
            torch.no_grad(),
        ):  # eval mode first, so the check forward moves no BatchNorm statistics
            check_runs_on(model, args, kwargs)
            program = torch.export.export(model, args, kwargs or None, dynamic_shapes=dims)
            # The second partitioner takes the linears whose weights the program computes
            # (XnnpackDequantizedBlocks); the first keeps constant weights prepacked.
            partitioners = [partitioner(), partitioner(force_non_static_weights_for_f32_linear=True)]
            lowered = lower(program, partitioner=partitioners).to_executorch()
            _refuse_missing_kernels(lowered)
            buffer = lowered.buffer
    except ExportError:
        raise
    except Exception as exc:  # torch.export and the lowering raise many unrelated types
        raise ExportError(f"ExecuTorch export failed: {exc}") from exc
    return atomic_path(Path(path), lambda tmp: tmp.write_bytes(buffer))


def _refuse_missing_kernels(lowered) -> None:
    """Refuse a program with operators outside XNNPACK that the installed ExecuTorch runtime has
    no kernel for (``nn.AvgPool3d``'s ``avg_pool3d``, say): it would be written, then fail to load
    with an error code."""
    try:
        from executorch.extension.pybindings.portable_lib import _get_operator_names
    except ImportError:  # no runtime here to check against
        return
    known = set(_get_operator_names())
    needed = {
        node.target.name()
        for node in lowered.exported_program().graph_module.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
    }
    missing = sorted(needed - known)
    if missing:
        raise ExportError(
            f"the ExecuTorch runtime installed here has no kernel for {', '.join(missing)}, which the program "
            "needs outside XNNPACK, so the program would not load"
        )


def run_executorch(path: str | os.PathLike, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run the ``forward`` method of a ``.pte`` file in ExecuTorch's runtime on ``inputs``."""
    try:
        from executorch.runtime import Runtime
    except ImportError as exc:
        raise MissingDependencyError(f'running a .pte file needs executorch (pip install "mpdcompress[mobile]"): {exc}')
    method = Runtime.get().load_program(Path(path)).load_method("forward")
    return list(method.execute(list(inputs)))
