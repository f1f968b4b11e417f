"""The Triton engine: packed layers as torch custom ops backed by :mod:`.triton_kernels`.

One packed layer is one kernel launch (input gather, every block's GEMM, bias, element-wise op
and output scatter). Ops are registered with ``torch.library`` (fake tensors for tracing,
autograd formulas), so ``torch.compile(fullgraph=True)``, CUDA graphs and ``torch.export`` see
them as single opaque ops. The PyTorch engine (:mod:`.torch_engine`) is the reference every
kernel is tested against.
"""

from __future__ import annotations

import os
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import triton_kernels as tk
from . import tuning
from .dispatch import keepable, launch_plan_generation
from .quantized_blocks import QuantizedWeight
from .torch_engine import ChainWeights
from .tuning import TileConfig, batch_bucket, capturing, choose, interpreting

__all__ = ["run_chain_triton", "epilogue_code", "block_linear", "FEATURE_MAJOR_INPUT_MIN_BATCH"]

# From this batch size on, a batch-major input is transposed once before the first layer so the
# gathered loads read contiguous rows; smaller inputs are read in place (they are few bytes and
# the launch is weight-bound). The last layer likewise writes feature-major and transposes.
FEATURE_MAJOR_INPUT_MIN_BATCH = 64


# Tile of the split-K reduction (features, batch): it reads each partial sum once, so it only
# needs to stream; 16 batch entries is the most a batch-1-to-16 launch uses.
_SUM_FEATURES, _SUM_BATCH = 128, 16


def _cdiv(a: int, b: int) -> int:
    # Not triton.cdiv: that is a JIT function, ~8 µs of host time per call.
    return -(-a // b)


def _precision(dtype: torch.dtype) -> str:
    # fp32 runs as TF32 only when the user allowed TF32 matmuls in torch (the default is not to).
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _launch_options(cfg: TileConfig, dtype: torch.dtype) -> dict:
    """Meta-parameters both kernels take: precision, the interpreter's bf16 upcast, tile sizes."""
    return dict(
        PRECISION=_precision(dtype),
        UPCAST=_upcast(dtype),
        BLOCK_B=cfg.block_b,
        BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _feature_major(t: Tensor) -> bool:
    return t.shape[0] > 1 and t.stride(0) == 1


def _pitch(batch: int) -> int:
    """Elements between two features of a feature-major activation (0: batch-major).

    Rows start on multiples of 16 elements whatever the batch: Triton specialises integer
    arguments divisible by 16 (and 1), and only then vectorises and pipelines the loads that
    step by this stride. Not under torch.compile, whose functionalized trace lays a custom op's
    non-dense output out densely (Inductor then asserts the dense strides at run time)."""
    if torch.compiler.is_compiling() or batch <= 1:
        return batch
    return -(-batch // 16) * 16


def _new_activation(batch: int, features: int, like: Tensor, pitch: int) -> Tensor:
    if pitch:
        return like.new_empty_strided((batch, features), (1, pitch))
    return like.new_empty((batch, features))


def _layout_of(t: Tensor) -> int:
    """The ``pitch`` argument that lays a new activation out as ``t`` is."""
    return t.stride(1) if _feature_major(t) else 0


def _to_feature_major(x: Tensor) -> Tensor:
    return _new_activation(x.shape[0], x.shape[1], x, _pitch(x.shape[0])).copy_(x)


class _LinearLaunch:
    """One ``_block_linear`` launch with everything but the activations fixed: the tile (chosen,
    and measured on first use, for this batch bucket and layout), the grid and the arguments.
    Built per call, or once per batch size by a :class:`LaunchPlan`. ``weight``: float blocks,
    or integer blocks (forward only) that the kernel dequantizes as it loads their tiles."""

    def __init__(
        self,
        x: Tensor,
        in_index: Tensor,
        weight: Tensor | QuantizedWeight,
        weight_strides: tuple[int, int, int],
        rows: int,
        cols: int,
        bias: Optional[Tensor],
        out_index: Tensor,
        out: Tensor,
        activation: int,
        gate: Optional[Tensor] = None,
    ) -> None:
        self.batch, self.c, self.rows, self.cols = x.shape[0], weight.shape[0], rows, cols
        self.bias, self.out_index, self.activation = bias, out_index, activation
        quantized = isinstance(weight, QuantizedWeight)
        tensor = weight.qweight if quantized else weight
        self.operands = (in_index, tensor, bias if bias is not None else tensor, out_index)
        self.weight_strides = weight_strides
        # ``gate``: an input gradient through a ReLU reads the forward's output beside ``dz``.
        self.gate = gate if gate is not None else tensor
        self.gate_strides = (0, 0) if gate is None else gate.stride()
        self.dtype = _float_dtype(weight)
        if quantized:
            # Zero points have the scales' shape; both contiguous (no copy when they are), one pair
            # of strides addresses both.
            scales, zeros = weight.scales.contiguous(), weight.zero_points
            self.quantization = (scales, tensor if zeros is None else zeros.contiguous())
            self.scale_strides = (*scales.stride()[:2], weight.group_size)
            self.bits, self.has_zeros = weight.bits, zeros is not None
        else:
            self.quantization, self.scale_strides = (tensor, tensor), (0, 0, 1)
            self.bits, self.has_zeros = 0, False
        key = (rows, cols, self.c, str(x.dtype), _feature_major(x), _feature_major(out), activation, bias is not None)
        key += weight_strides  # a forward (rows, cols) and an input gradient (cols, rows) differ here
        key += (None if gate is None else _feature_major(gate), self.bits, self.has_zeros)
        self._use(choose("linear", self.batch, key, x.device, lambda cfg: self._use(cfg)(x, out)))

    def _use(self, cfg: TileConfig) -> "_LinearLaunch":
        self.split = cfg.split_k
        self.grid = (_cdiv(self.batch, cfg.block_b) * _cdiv(self.rows, cfg.block_r), self.c, cfg.split_k)
        self.sum_grid = (_cdiv(self.c * self.rows, _SUM_FEATURES), _cdiv(self.batch, _SUM_BATCH))
        self.options = dict(
            HAS_BIAS=self.bias is not None,
            ACT=self.activation,
            GATED=self.gate is not self.operands[1],
            SWAP_AB=cfg.swap_ab,
            SPLIT_K=cfg.split_k,
            BITS=self.bits,
            HAS_ZEROS=self.has_zeros,
            **_launch_options(cfg, self.dtype),
        )
        return self

    def __call__(self, x: Tensor, out: Tensor) -> None:
        # Split K: fp32 partial sums of every split, summed by a second launch.
        part = (
            out if self.split == 1 else x.new_empty((self.split * self.c * self.rows, self.batch), dtype=torch.float32)
        )
        tk._block_linear[self.grid](
            x,
            *self.operands,
            out,
            part,
            self.gate,
            *self.quantization,
            self.batch,
            self.rows,
            self.cols,
            *x.stride(),
            *out.stride(),
            *self.weight_strides,
            *self.gate_strides,
            *self.scale_strides,
            **self.options,
        )
        if self.split > 1:
            tk._split_k_sum[self.sum_grid](
                part,
                self.bias if self.bias is not None else part,
                self.out_index,
                out,
                self.batch,
                self.c * self.rows,
                out.stride(0),
                out.stride(1),
                HAS_BIAS=self.bias is not None,
                ACT=self.activation,
                SPLIT_K=self.split,
                BLOCK_F=_SUM_FEATURES,
                BLOCK_B=_SUM_BATCH,
            )


def _float_dtype(blocks: Tensor | QuantizedWeight) -> torch.dtype:
    """The float type the blocks compute in (integer blocks: their scales')."""
    return blocks.scales.dtype if isinstance(blocks, QuantizedWeight) else blocks.dtype


def _check(x: Tensor, blocks: Tensor | QuantizedWeight, bias: Optional[Tensor]) -> None:
    dtype = _float_dtype(blocks)
    if x.dtype != dtype or (bias is not None and bias.dtype != dtype):
        raise RuntimeError(
            f"packed layer: input dtype {x.dtype} does not match weight dtype {dtype}"
            + ("" if bias is None else f" / bias dtype {bias.dtype}")
        )


def _weight_strides(blocks: Tensor | QuantizedWeight) -> tuple[int, int, int]:
    """Strides of the blocks' (block, row, input) axes; of the bytes for 4-bit blocks, whose
    kernel reads input ``k`` from byte ``k // 2``."""
    tensor = blocks.qweight if isinstance(blocks, QuantizedWeight) else blocks
    return (tensor.stride(0), tensor.stride(1), tensor.stride(2))


def _float_blocks(blocks: Tensor | QuantizedWeight) -> Tensor:
    """Blocks as the custom ops take them: integer blocks (which only a launch plan runs as
    such) dequantized."""
    return blocks.dequantize() if isinstance(blocks, QuantizedWeight) else blocks


def _block_linear(
    x: Tensor,
    in_index: Tensor,
    blocks: Tensor,
    bias: Optional[Tensor],
    out_index: Tensor,
    out_features: int,
    activation: int,
    pitch: int,
    input_gaps: bool,
) -> Tensor:
    """``y[:, out_index] = act(x[:, in_index] · blocksᵀ + bias)`` per block, ``y`` (batch, out_features).

    ``pitch``: 0 for a batch-major ``y``, else the distance between its features (feature-major).
    ``input_gaps``: whether some input positions are read by no block column (see
    ``ChainWeights.input_gaps``); the input gradient must zero them."""
    _check(x, blocks, bias)
    c, rows, cols = blocks.shape
    out = _new_activation(x.shape[0], out_features, x, pitch)
    if x.shape[0]:
        strides = (blocks.stride(0), blocks.stride(1), blocks.stride(2))
        _LinearLaunch(x, in_index, blocks, strides, rows, cols, bias, out_index, out, activation)(x, out)
    return out


block_linear = torch.library.custom_op("mpdcompress::block_linear", _block_linear, mutates_args=())


@block_linear.register_fake
def _(x, in_index, blocks, bias, out_index, out_features, activation, pitch, input_gaps):
    return _new_activation(x.shape[0], out_features, x, pitch)


@torch.library.custom_op("mpdcompress::block_linear_input_grad", mutates_args=())
def block_linear_input_grad(
    dz: Tensor,
    out_index: Tensor,
    blocks: Tensor,
    in_index: Tensor,
    in_features: int,
    pitch: int,
    input_gaps: bool,
    gate: Optional[Tensor] = None,
) -> Tensor:
    """``dx[:, in_index] = dz[:, out_index] · blocks`` per block: the forward with the roles swapped.
    With ``gate`` (the forward's output of a ReLU layer), ``dz`` counts only where it is positive."""
    c, rows, cols = blocks.shape
    dx = _new_activation(dz.shape[0], in_features, dz, pitch)
    if input_gaps:  # positions no block column reads are never written: they must read as zero
        dx.zero_()
    if dz.shape[0]:
        strides = (blocks.stride(0), blocks.stride(2), blocks.stride(1))  # blocks transposed
        _LinearLaunch(dz, out_index, blocks, strides, cols, rows, None, in_index, dx, tk.ACT_NONE, gate)(dz, dx)
    return dx


@block_linear_input_grad.register_fake
def _(dz, out_index, blocks, in_index, in_features, pitch, input_gaps, gate=None):
    return _new_activation(dz.shape[0], in_features, dz, pitch)


@torch.library.custom_op("mpdcompress::block_weight_grad", mutates_args=())
def block_weight_grad(
    dz: Tensor,
    out_index: Tensor,
    x: Tensor,
    in_index: Tensor,
    rows: int,
    cols: int,
    gate: Optional[Tensor] = None,
    bias_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """``dW_k = dz[:, rows_k]ᵀ · x[:, cols_k]`` for every block, padding entries zero, and with
    ``bias_grad`` the bias gradient ``db_k = Σ_batch dz[:, rows_k]`` (else an empty tensor).
    With ``gate`` (the forward's output of a ReLU layer), ``dz`` counts only where it is positive."""
    c = in_index.shape[0] // cols
    dw, db = _weight_grad_outputs(dz, c, rows, cols, bias_grad)
    batch = x.shape[0]
    gated = gate if gate is not None else dz

    def run(cfg: TileConfig) -> None:
        grid = (_cdiv(rows, cfg.block_r) * _cdiv(cols, cfg.block_k), c)
        tk._block_weight_grad[grid](
            dz,
            out_index,
            x,
            in_index,
            dw,
            gated,
            db if bias_grad else dw,
            batch,
            rows,
            cols,
            *dz.stride(),
            *x.stride(),
            *gated.stride(),
            GATED=gate is not None,
            BIAS_GRAD=bias_grad,
            **_launch_options(cfg, x.dtype),
        )

    key = (rows, cols, c, str(x.dtype), _feature_major(x), _feature_major(dz))
    key += (None if gate is None else _feature_major(gate), bias_grad)
    run(choose("weight_grad", batch, key, x.device, run))
    return dw, db


def _weight_grad_outputs(dz: Tensor, c: int, rows: int, cols: int, bias_grad: bool) -> tuple[Tensor, Tensor]:
    # Every entry is written, a batch of 0 included (its programs store zero sums).
    return dz.new_empty((c, rows, cols)), dz.new_empty((c * rows if bias_grad else 0,))


@block_weight_grad.register_fake
def _(dz, out_index, x, in_index, rows, cols, gate=None, bias_grad=False):
    return _weight_grad_outputs(dz, in_index.shape[0] // cols, rows, cols, bias_grad)


def _setup_context(ctx, inputs, output) -> None:
    x, in_index, blocks, bias, out_index, out_features, activation, pitch, input_gaps = inputs
    if activation not in (tk.ACT_NONE, tk.ACT_RELU):
        raise RuntimeError("mpdcompress::block_linear is differentiable only without an epilogue or with ReLU")
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.input_gaps = input_gaps
    ctx.save_for_backward(x, in_index, blocks, out_index, output if activation == tk.ACT_RELU else None)


def _backward(ctx, grad):
    x, in_index, blocks, out_index, output = ctx.saved_tensors
    # The last layer's gradient comes batch-major (through the final ``.contiguous()``): the
    # kernels would gather it element by element, so large batches pay one transpose instead.
    if grad.shape[0] >= FEATURE_MAJOR_INPUT_MIN_BATCH and not _feature_major(grad):
        grad = _to_feature_major(grad)
    c, rows, cols = blocks.shape
    bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
    dx = dw = db = None
    # The ReLU's derivative (``output > 0``) and the bias gradient are applied inside the kernels.
    if ctx.needs_input_grad[0]:
        dx = block_linear_input_grad(
            grad, out_index, blocks, in_index, x.shape[1], _layout_of(x), ctx.input_gaps, output
        )
    if ctx.needs_input_grad[2]:
        dw, fused_db = block_weight_grad(grad, out_index, x, in_index, rows, cols, output, bias_grad)
        db = fused_db if bias_grad else None
    elif bias_grad:  # frozen blocks, a trained bias
        dz = grad if output is None else grad * (output > 0)
        db = dz.sum(0).index_select(0, out_index.clamp(min=0).long()) * (out_index >= 0)
    return dx, None, dw, db, None, None, None, None, None


block_linear.register_autograd(_backward, setup_context=_setup_context)


# -- chains -----------------------------------------------------------------------------------------
_EPILOGUES: dict[type[nn.Module], int] = {nn.ReLU: tk.ACT_RELU, nn.SiLU: tk.ACT_SILU}


def epilogue_code(module: nn.Module | None) -> int | None:
    """The kernel epilogue equal to ``module`` (an element-wise module or a Sequential of them),
    or None when it cannot be fused (the chain then applies the module between two launches)."""
    if module is None:
        return tk.ACT_NONE
    ops = list(module) if isinstance(module, nn.Sequential) else [module]
    code = tk.ACT_NONE
    for op in ops:
        if isinstance(op, (nn.Identity, nn.Dropout)) and (type(op) is nn.Identity or not op.training or op.p == 0):
            continue
        if type(op) is nn.GELU:
            this = tk.ACT_GELU if op.approximate == "none" else tk.ACT_GELU_TANH
        else:
            this = _EPILOGUES.get(type(op))
        if this is None or code != tk.ACT_NONE:
            return None
        code = this
    return code


def _autocast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None or not t.is_floating_point() else t.to(dtype)


def _plain_eager(x: Tensor) -> bool:
    # Outside tracing (no compile, no export, no dispatch mode), inference calls the launcher
    # directly: the custom-op dispatcher adds host time per layer that a small batch cannot hide.
    return type(x) is Tensor and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def _epilogue(act, trains: bool) -> tuple[int, Optional[Callable[[Tensor], Tensor]]]:
    """The kernel epilogue for the element-wise ``act`` after a layer, and what is left to apply
    after the launch (None when the kernel applies it all)."""
    # Plain callables (not modules) are applied as they are, between two launches.
    code = epilogue_code(act) if act is None or isinstance(act, nn.Module) else None
    if code is None or (trains and code not in (tk.ACT_NONE, tk.ACT_RELU)):
        return tk.ACT_NONE, act
    return code, None


def _output_pitch(batch: int, last: bool) -> int:
    # Between layers activations are feature-major; the last layer writes batch-major for the
    # caller unless the batch is large enough that a final transpose beats scattered stores.
    return _pitch(batch) if not last or batch >= FEATURE_MAJOR_INPUT_MIN_BATCH else 0


def run_chain_triton(x: Tensor, weights: ChainWeights) -> Tensor:
    """The packed chain, one custom op per layer; same contract as the PyTorch engine."""
    flat = x.dim() == 2  # the common case: no reshape either way (host time at batch 1)
    lead = x.shape[:-1]
    h = x if flat else x.reshape(-1, x.shape[-1])
    batch = h.shape[0]
    cast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    h = _autocast(h, cast)
    if batch >= FEATURE_MAJOR_INPUT_MIN_BATCH:
        h = _to_feature_major(h)
    n = len(weights.blocks)
    for i in range(n):
        blocks, bias = _autocast(_float_blocks(weights.blocks[i]), cast), _autocast(weights.biases[i], cast)
        last = i == n - 1
        act = None if last else weights.activations[i]
        trains = torch.is_grad_enabled() and (
            blocks.requires_grad or h.requires_grad or (bias is not None and bias.requires_grad)
        )
        code, act = _epilogue(act, trains)
        pitch = _output_pitch(batch, last)
        op = block_linear if trains or not _plain_eager(h) else _block_linear
        h = op(
            h,
            weights.in_index[i],
            blocks,
            bias,
            weights.out_index[i],
            weights.out_features[i],
            code,
            pitch,
            weights.input_gaps[i],
        )
        if act is not None:
            h = act(h)
    if _feature_major(h):
        h = h.contiguous()
    return h if flat else h.reshape(*lead, h.shape[-1])


# -- launch plans: eager inference with the host work done once ------------------------------------
_PLANS_PER_MODULE = 16  # batch sizes remembered; a module serving more starts over
_plans: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class LaunchPlan:
    """A packed module's eager inference at one batch size and input layout with every launch
    built (operands, tile, grid, options): a call allocates the activations and launches, and
    nothing else runs in Python: at batch 1 a GPU hides none of the host's time."""

    def __init__(self, batch: int, generation: int, layout: tuple[bool, bool]) -> None:
        self.batch, self.generation = batch, generation
        # Whether the input is made feature-major before the first launch, and whether the last
        # launch writes feature-major (then one transpose) rather than scattering batch-major.
        self.transpose_input, self.feature_major_output = layout
        self.transpose_output = False
        # Per layer: the launch, the output's shape and strides (None: batch-major), what to
        # apply after the launch.
        self.steps: list[tuple[_LinearLaunch, tuple, Optional[tuple], Optional[Callable[[Tensor], Tensor]]]] = []

    @classmethod
    def record(
        cls, x: Tensor, weights: ChainWeights, generation: int, layout: tuple[bool, bool]
    ) -> tuple["LaunchPlan", Tensor]:
        """Run the chain on ``x`` (batch-major or any 2-D layout, batch ≥ 1) and keep its launches."""
        plan = cls(x.shape[0], generation, layout)
        h = _to_feature_major(x) if plan.transpose_input else x
        n = len(weights.blocks)
        for i in range(n):
            blocks, bias = weights.blocks[i], weights.biases[i]
            _check(h, blocks, bias)
            code, act = _epilogue(None if i == n - 1 else weights.activations[i], trains=False)
            pitch = _pitch(plan.batch) if i < n - 1 or plan.feature_major_output else 0
            out = _new_activation(plan.batch, weights.out_features[i], h, pitch)
            c, rows, cols = blocks.shape
            launch = _LinearLaunch(
                h,
                weights.in_index[i],
                blocks,
                _weight_strides(blocks),
                rows,
                cols,
                bias,
                weights.out_index[i],
                out,
                code,
            )
            launch(h, out)
            plan.steps.append((launch, (plan.batch, weights.out_features[i]), (1, pitch) if pitch else None, act))
            h = out if act is None else act(out)
        plan.transpose_output = _feature_major(h)
        return plan, h.contiguous() if plan.transpose_output else h

    def __call__(self, x: Tensor) -> Tensor:
        h = _to_feature_major(x) if self.transpose_input else x
        for launch, shape, strides, act in self.steps:
            out = h.new_empty(shape) if strides is None else h.new_empty_strided(shape, strides)
            launch(h, out)
            h = out if act is None else act(out)
        return h.contiguous() if self.transpose_output else h


# (transpose the input first, write the last output feature-major): which wins depends on the
# GPU, the shapes and the batch, so a GPU measures the four once per chain shape and batch bucket.
_LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]
_layouts_chosen: dict[tuple, tuple[bool, bool]] = {}


def _measures_layouts(device: torch.device) -> bool:
    return not interpreting() and os.environ.get("MPDCOMPRESS_AUTOTUNE", "1") != "0" and not capturing(device)


def _layout(x: Tensor, weights: ChainWeights, generation: int) -> tuple[bool, bool]:
    """The activation layout of a new launch plan: measured on a GPU (once per chain shape, dtype
    and batch bucket), else the rule of the general path (feature-major from 64 rows)."""
    batch = x.shape[0]
    guess = (batch >= FEATURE_MAJOR_INPUT_MIN_BATCH, batch >= FEATURE_MAJOR_INPUT_MIN_BATCH)
    if batch < 2 or not _measures_layouts(x.device):
        return guess
    shapes = tuple((tuple(b.shape), _weight_strides(b), getattr(b, "bits", 0)) for b in weights.blocks)
    key = (batch_bucket(batch), x.dtype, x.device, x.stride(1) == 1, shapes, tuple(weights.out_features))
    if key not in _layouts_chosen:
        plans = {layout: LaunchPlan.record(x, weights, generation, layout)[0] for layout in _LAYOUTS}
        timings = tuning.measure(_LAYOUTS, lambda layout: plans[layout](x))
        _layouts_chosen[key] = min(timings, key=timings.get) if timings else guess
    return _layouts_chosen[key]


def run_packed_triton(x: Tensor, module: nn.Module) -> Tensor:
    """``module`` (anything with ``chain_weights``) applied to ``x`` on the Triton engine: eager
    inference (no autograd, no autocast, no tracing) replays a cached :class:`LaunchPlan`;
    everything else runs :func:`run_chain_triton`."""
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cuda" if x.is_cuda else x.device.type):
        return run_chain_triton(x, module.chain_weights(kernel_indices=True))
    h = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    plans = _plans.get(module)
    key = (h.shape[0], h.stride(), h.dtype, h.get_device())  # get_device: an int, cheaper than .device
    plan = None if plans is None else plans.get(key)
    generation = launch_plan_generation()
    if plan is not None and plan.generation == generation and _plain_eager(x):
        out = plan(h)
    else:
        weights = module.chain_weights(kernel_indices=True)
        # A plan records tiles: none is recorded while a CUDA graph is captured (tiles are not
        # measured then) or while tracing.
        if not h.shape[0] or not keepable(weights) or not _plain_eager(x) or capturing(x.device):
            return run_chain_triton(x, weights)
        if plans is None or len(plans) >= _PLANS_PER_MODULE:
            plans = _plans[module] = {}
        plans[key], out = LaunchPlan.record(h, weights, generation, _layout(h, weights, generation))
    return out if h is x else out.reshape(*x.shape[:-1], out.shape[-1])
