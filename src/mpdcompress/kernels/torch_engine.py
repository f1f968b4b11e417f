"""The PyTorch engine: gather → ``c`` block GEMMs (+bias) → element-wise op → gather → ... → gather.

It runs on every device and is the reference the Triton engine is tested against. A chain of
``n`` compressed layers runs with ``n + 1`` gathers. Layouts were chosen by measurement on a
2-core CPU (the design notes' section on fusion):

* between layers, activations are feature-major ``(features, batch)``: the fused gather then
  copies whole contiguous rows, ~10x faster than gathering columns of a ``(batch, features)``
  tensor, and ``bmm(blocks, h.view(c, cols, batch))`` needs no transpose;
* the user's batch-major input and output are converted inside the first and last GEMM (BLAS
  reads and writes transposed operands for free), never by a separate transpose copy;
* in eager calls at batch 1, the chain runs batch-major: every block GEMM then multiplies a row
  by the transposed block, which MKL ran 1.26-1.33x faster on the AlexNet FC and transformer MLP
  stacks (2 threads; benchmarks/small_batch_layout.py). From 2 rows up feature-major won on
  those stacks in most cases on 2 threads (on 1 thread batch-major won up to 8-24 rows).

Without autograd, the last GEMM writes straight into batch-major output through ``out=``; with
autograd (training the packed form) or under tracing it uses the functional ops plus one copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

__all__ = ["BlockGemm", "ChainWeights", "run_chain_torch", "tracing", "BATCH_MAJOR_BELOW"]

# Batches smaller than this run the whole chain batch-major (see the module notes).
BATCH_MAJOR_BELOW = 2


class BlockGemm(Protocol):
    """Blocks that run their own GEMMs (integer kernels): ``shape`` is ``(c, rows, cols)``."""

    shape: tuple[int, ...]

    def batch_major(self, a: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def feature_major(self, a: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


@dataclass
class ChainWeights:
    """Everything the forward needs, as plain tensors (no modules), in packed padded order.

    ``gathers[0]`` picks the padded block inputs of layer 0 from the original input features;
    ``gathers[i]`` (0 < i < n) picks layer i's padded inputs from layer i-1's padded outputs
    (None: they are the same, as jointly chosen masks make them);
    ``gathers[n]`` picks the original output features from the last layer's padded outputs.
    ``gathers[0]`` / ``gathers[n]`` are None where a folded dense neighbour reads or writes the
    padded order directly (the input is then already ``(..., c * max_cols)``, the output stays
    ``(..., c * max_rows)``).
    """

    gathers: Sequence[torch.Tensor | None]
    # (c, max_rows, max_cols) each, or an object with that ``shape`` that runs its own block GEMMs
    # (``batch_major`` / ``feature_major``, as DynamicInt8Blocks does)
    blocks: Sequence[torch.Tensor | BlockGemm]
    biases: Sequence[torch.Tensor | None]  # (c * max_rows,) each, or None
    activations: Sequence[Callable[[torch.Tensor], torch.Tensor]]  # n - 1 element-wise ops
    # Per layer, for engines that gather inside the GEMM (Triton): the position in the layer's own
    # input of each padded block column and in its own output of each padded block row, -1 for
    # padding (int32, ``c * max_cols`` and ``c * max_rows`` long), and the layer's output width.
    in_index: Sequence[torch.Tensor] | None = None
    out_index: Sequence[torch.Tensor] | None = None
    out_features: Sequence[int] | None = None
    # Per layer: whether its input has positions no block column reads (a folded head's padding),
    # which an input gradient must fill with zeros: known from the layout, so no kernel asks the
    # GPU (a host sync) whether ``in_index`` holds a -1.
    input_gaps: Sequence[bool] | None = None


def tracing() -> bool:
    """Whether a tracer (TorchScript, ``torch.compile``, ``torch.export``) is running the code."""
    return (
        torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    )


def _functional_only(x: torch.Tensor, weights: ChainWeights, traced: bool) -> bool:
    # out= bypasses autograd and autocast and is opaque to tracers, so it is only used in plain
    # eager inference.
    if traced:
        return True
    if x.is_meta:  # shape inference (torch has no autocast state for the meta device)
        return True
    if torch.is_autocast_enabled(x.device.type):
        return True
    if not torch.is_grad_enabled():
        return False
    # Gradients flow through the input too: a frozen packed model behind trained layers, or
    # gradients with respect to the input itself (saliency, adversarial examples).
    return x.requires_grad or any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (*weights.blocks, *weights.biases)
    )


def _block_gemm_to_batch_major(
    a: torch.Tensor, blocks: torch.Tensor | BlockGemm, bias: torch.Tensor | None, functional: bool
) -> torch.Tensor:
    """``a`` (c, batch, cols) → ``(batch, c * rows)`` = per-block ``a_k @ blocks_kᵀ + bias_k``."""
    if not isinstance(blocks, torch.Tensor):
        return blocks.batch_major(a, bias)
    c, rows, _ = blocks.shape
    batch = a.shape[1]
    bt = blocks.transpose(1, 2)
    if functional:
        y = torch.bmm(a, bt) if bias is None else torch.baddbmm(bias.view(c, 1, rows), a, bt)
        return y.transpose(0, 1).reshape(batch, c * rows)
    out = torch.empty(batch, c, rows, dtype=torch.result_type(a, blocks), device=a.device)
    if bias is None:
        torch.bmm(a, bt, out=out.transpose(0, 1))
    else:
        torch.baddbmm(bias.view(c, 1, rows), a, bt, out=out.transpose(0, 1))
    return out.view(batch, c * rows)


def _block_gemm_to_feature_major(
    a: torch.Tensor, blocks: torch.Tensor | BlockGemm, bias: torch.Tensor | None
) -> torch.Tensor:
    """``a`` (c, cols, batch), any strides → ``(c * rows, batch)``."""
    if not isinstance(blocks, torch.Tensor):
        return blocks.feature_major(a, bias)
    c, rows, _ = blocks.shape
    y = torch.bmm(blocks, a) if bias is None else torch.baddbmm(bias.view(c, rows, 1), blocks, a)
    return y.view(c * rows, a.shape[-1])


def run_chain_torch(x: torch.Tensor, weights: ChainWeights) -> torch.Tensor:
    """Apply the packed chain to ``x`` of shape ``(..., d_in)``; returns ``(..., d_out)``."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    batch = x2d.shape[0]
    traced = tracing()
    functional = _functional_only(x, weights, traced)
    n = len(weights.blocks)
    first = weights.blocks[0]
    if weights.gathers[0] is not None:
        x2d = x2d.index_select(1, weights.gathers[0])
    xg = x2d.reshape(batch, first.shape[0], first.shape[2])
    # Traced graphs keep one layout for every batch: a branch on it would pin an exported
    # dynamic batch dimension to one side of the threshold.
    if n == 1 or (type(batch) is int and batch < BATCH_MAJOR_BELOW and not traced):
        y = _block_gemm_to_batch_major(xg.transpose(0, 1), first, weights.biases[0], functional)
        for i in range(1, n):
            blocks = weights.blocks[i]
            h = weights.activations[i - 1](y)
            h = h if weights.gathers[i] is None else h.index_select(1, weights.gathers[i])
            a = h.view(batch, blocks.shape[0], blocks.shape[2]).transpose(0, 1)
            y = _block_gemm_to_batch_major(a, blocks, weights.biases[i], functional)
    else:
        h = _block_gemm_to_feature_major(xg.permute(1, 2, 0), first, weights.biases[0])
        for i in range(1, n):
            blocks = weights.blocks[i]
            c, _, cols = blocks.shape
            h = weights.activations[i - 1](h)
            h = (h if weights.gathers[i] is None else h.index_select(0, weights.gathers[i])).view(c, cols, batch)
            if i < n - 1:
                h = _block_gemm_to_feature_major(h, blocks, weights.biases[i])
            else:
                y = _block_gemm_to_batch_major(h.transpose(1, 2), blocks, weights.biases[i], functional)
    out = y if weights.gathers[-1] is None else y.index_select(1, weights.gathers[-1])
    return out.reshape(*lead, out.shape[-1])
