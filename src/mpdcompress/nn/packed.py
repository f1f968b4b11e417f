"""Packed block-diagonal form: only the ``c`` blocks are stored, plus gather indices.

``BlockDiagonalLinear`` is one compressed layer; ``PackedChain`` runs ``Linear → f → Linear ...``
with the output permutation of each layer and the input permutation of the next fused into one
gather. Both are ordinary trainable modules (parameters are the blocks and the bias).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core.layout import BlockLayout
from ..core.masks import MPDMask, check_incoming_mask
from ..errors import CompressionError
from ..kernels import ChainWeights, run_packed
from ..kernels.dispatch import forget_launch_plans
from .masked import MPDLinear

__all__ = ["PackedBlocks", "BlockDiagonalLinear", "PackedChain", "is_elementwise", "ELEMENTWISE_MODULES"]

# Modules that act on each feature independently and identically, so they commute with any
# permutation of the features and may sit between two fused layers.
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.Dropout,
    nn.AlphaDropout,
)


def is_elementwise(module: nn.Module) -> bool:
    """Whether ``module`` acts on each element alone, so that a permutation commutes with it."""
    if isinstance(module, nn.PReLU):
        return module.num_parameters == 1
    return type(module) in ELEMENTWISE_MODULES


def padded_sources(order: torch.Tensor, positions: torch.Tensor, length: int, fill: int = 0) -> torch.Tensor:
    """The original index behind every padded packed position.

    Packed position ``i`` holds original index ``order[i]`` and sits at padded position
    ``positions[i]``. Padding positions read ``fill``: 0 for the gathers of the PyTorch engine
    (padding weights are zero, so any valid index is exact), -1 for the Triton kernels, which
    skip it.
    """
    sources = torch.full((length,), fill, dtype=torch.int64, device=order.device)
    sources[positions] = order
    return sources


def _rebuild_indices(module: "PackedBlocks", _keys) -> None:
    # A module-level function, not a lambda, so packed models pickle.
    module._build_indices()


class ForgetsLaunchPlans:
    """For modules the engines run: any change that may give their tensors another identity,
    dtype or device (``.to()``, ``load_state_dict``, assigning or registering a tensor or module)
    makes the Triton engine's cached launch plans stale. In-place updates (optimizer steps,
    ``load_state_dict`` copies) keep plans valid: a launch reads the tensors' current values."""

    def __setattr__(self, name, value) -> None:
        forget_launch_plans()
        super().__setattr__(name, value)

    def register_buffer(self, *args, **kwargs) -> None:
        forget_launch_plans()
        super().register_buffer(*args, **kwargs)

    def register_parameter(self, *args, **kwargs) -> None:
        forget_launch_plans()
        super().register_parameter(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        forget_launch_plans()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        forget_launch_plans()
        super()._load_from_state_dict(*args, **kwargs)


class PackedBlocks(ForgetsLaunchPlans):
    """What the packed layers share: the mask as buffers (``row_order``, ``col_order``,
    ``num_blocks``) and padded blocks (``weight_blocks``) whose padding stays zero."""

    weight_blocks: nn.Parameter
    # What runs the block GEMMs instead, when set: an export form (see files.executorch).
    export_gemm: Any = None
    bias: nn.Parameter | None
    row_order: torch.Tensor
    col_order: torch.Tensor
    num_blocks: torch.Tensor
    padding_mask: torch.Tensor | None
    # Quantization-aware training (set by mpdcompress.fake_quantize_): blocks -> the blocks
    # rounded as quantize_ will store them, with a straight-through gradient.
    fake_quant: Callable[[torch.Tensor], torch.Tensor] | None = None

    def plane(self) -> tuple[int, int]:
        """``(d_out, d_in)``: the shape of the matrix the mask lives on."""
        raise NotImplementedError

    def _build_indices(self) -> None:
        """The gathers (non-persistent buffers) that the forward reads, from the mask's buffers."""
        raise NotImplementedError

    def _init_blocks(self, mask: MPDMask, weight_blocks: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight_blocks = nn.Parameter(weight_blocks)
        self.bias = None if bias is None else nn.Parameter(bias)
        self._init_mask(mask, weight_blocks.device)

    def _init_mask(self, mask: MPDMask, device: torch.device) -> None:
        self.register_buffer("row_order", mask.row_order.to(device))
        self.register_buffer("col_order", mask.col_order.to(device))
        self.register_buffer("num_blocks", torch.tensor(mask.compression, device=device))
        self._build_indices()
        self.register_load_state_dict_post_hook(_rebuild_indices)

    def stored_shape(self, layout: BlockLayout) -> tuple[int, ...]:
        """The shape ``weight_blocks`` has for ``layout``."""
        raise NotImplementedError

    def as_blocks(self, blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        """``blocks`` (as stored) viewed as ``(c, max_rows, max_cols, ...)``."""
        return blocks

    @property
    def layout(self) -> BlockLayout:
        """How the rows and columns split into blocks."""
        return BlockLayout.create(*self.plane(), int(self.num_blocks))

    @property
    def compression(self) -> int:
        """The factor ``c``: the number of blocks."""
        return int(self.num_blocks)

    @property
    def mpd_mask(self) -> MPDMask:
        """The layer's mask (validated from its buffers)."""
        return MPDMask(self.layout, self.row_order.cpu(), self.col_order.cpu())

    def effective_blocks(self) -> torch.Tensor:
        """The blocks with padding forced to zero while gradients can reach it (compact training),
        rounded to their integer levels during quantization-aware training."""
        w = self.weight_blocks
        if self.padding_mask is not None and torch.is_grad_enabled() and w.requires_grad:
            w = w * self.padding_mask
        return w if self.fake_quant is None else self.fake_quant(w)

    def engine_blocks(self, kernel_indices: bool) -> torch.Tensor:
        """What the engine multiplies with (``kernel_indices``: for the Triton engine): the blocks,
        or for layers with their own CPU kernels (or an export form: ``export_gemm``) an object the
        PyTorch engine calls instead."""
        return self.effective_blocks() if self.export_gemm is None else self.export_gemm

    def check_incoming(self, state_dict: dict, prefix: str) -> None:
        """Refuse what a ``load_state_dict`` would put here that is not a valid packed layer: a
        mask that is no permutation, or nonzero padding (checked before anything is copied)."""
        check_incoming_mask(state_dict, prefix, *self.plane(), self.compression)
        c = int(state_dict.get(prefix + "num_blocks", self.compression))
        layout = BlockLayout.create(*self.plane(), c)
        blocks, bias = state_dict.get(prefix + "weight_blocks"), state_dict.get(prefix + "bias")
        if not isinstance(blocks, torch.Tensor) or tuple(blocks.shape) != self.stored_shape(layout):
            return  # a missing or misshapen tensor: load_state_dict reports it itself
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c * layout.max_rows,):
            bias = None
        where = layout.nonzero_padding(self.as_blocks(blocks, layout), bias)
        if where is not None:
            raise CompressionError(
                f"{prefix}{where}: padding entries are not zero (a packed layer's padding must stay zero, "
                "or it computes something other than its masked form)"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.check_incoming(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class BlockDiagonalLinear(PackedBlocks, nn.Module):
    """A compressed linear layer stored as ``c`` padded blocks ``(c, max_rows, max_cols)``.

    Computes exactly the masked layer it was packed from. ``bias`` is kept in packed, padded
    output order (padding entries are zero and never read).
    """

    row_order: torch.Tensor
    col_order: torch.Tensor
    num_blocks: torch.Tensor
    in_gather: torch.Tensor
    out_gather: torch.Tensor
    padding_mask: torch.Tensor | None

    def __init__(self, mask: MPDMask, weight_blocks: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        layout = mask.layout
        expected = (layout.compression, layout.max_rows, layout.max_cols)
        if tuple(weight_blocks.shape) != expected:
            raise CompressionError(f"weight_blocks must have shape {expected}, got {tuple(weight_blocks.shape)}")
        if bias is not None and tuple(bias.shape) != (layout.compression * layout.max_rows,):
            raise CompressionError(
                f"packed bias must have shape {(layout.compression * layout.max_rows,)}, got {tuple(bias.shape)}"
            )
        self.in_features, self.out_features = layout.d_in, layout.d_out
        self._init_blocks(mask, weight_blocks, bias)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_masked(cls, layer: MPDLinear) -> "BlockDiagonalLinear":
        return cls.from_dense(layer.weight, layer.bias, layer.mpd_mask)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, mask: MPDMask) -> "BlockDiagonalLinear":
        """Pack the entries of ``weight`` that lie on ``mask`` (entries off the mask are dropped).

        Only the blocks are gathered, so packing needs ~1/c of the dense weight's memory.
        """
        layout = mask.layout
        if tuple(weight.shape) != mask.shape:
            raise CompressionError(f"weight shape {tuple(weight.shape)} does not match mask shape {mask.shape}")
        device = weight.device
        c, br, bc = layout.compression, layout.max_rows, layout.max_cols
        pr = layout.padded_row_positions().to(device)
        pc = layout.padded_col_positions().to(device)
        rows = padded_sources(mask.row_order.to(device), pr, c * br)
        cols = padded_sources(mask.col_order.to(device), pc, c * bc)
        blocks = weight[rows.view(c, br, 1), cols.view(c, 1, bc)]
        if not layout.is_even:
            blocks = blocks * layout.padding_mask().to(device)
        packed_bias = None
        if bias is not None:
            packed_bias = bias.new_zeros(c * br)
            packed_bias[pr] = bias[mask.row_order.to(device)]
        return cls(mask, blocks.contiguous(), packed_bias)

    # -- views of the layer ---------------------------------------------------------------------
    def plane(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return self.out_features, self.in_features

    def stored_shape(self, layout: BlockLayout) -> tuple[int, ...]:
        """``(c, max_rows, max_cols)``."""
        return layout.compression, layout.max_rows, layout.max_cols

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The ``d_out x d_in`` masked dense weight this layer computes with."""
        layout = self.layout
        pr = layout.padded_row_positions().to(self.row_order.device)
        pc = layout.padded_col_positions().to(self.row_order.device)
        padded = torch.block_diag(*self.weight_blocks.unbind(0))
        dense = self.weight_blocks.new_zeros(layout.d_out, layout.d_in)
        dense[self.row_order[:, None], self.col_order[None, :]] = padded[pr][:, pc]
        return dense

    @torch.no_grad()
    def dense_bias(self) -> torch.Tensor | None:
        """The bias in original output order."""
        return None if self.bias is None else self.bias[self.out_gather]

    @torch.no_grad()
    def to_masked(self) -> MPDLinear:
        layer = MPDLinear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            mask=self.mpd_mask,
            device=self.weight_blocks.device,
            dtype=self.weight_blocks.dtype,
        )
        layer.weight.copy_(self.dense_weight())
        if self.bias is not None:
            layer.bias.copy_(self.dense_bias())
        return layer

    # -- forward ----------------------------------------------------------------------------------
    def _build_indices(self) -> None:
        layout = self.layout
        mask = MPDMask(layout, self.row_order.cpu(), self.col_order.cpu())  # validates loaded orders
        device = self.row_order.device
        pr = layout.padded_row_positions()
        pc = layout.padded_col_positions()
        in_gather = padded_sources(mask.col_order, pc, layout.compression * layout.max_cols)
        out_gather = torch.empty(layout.d_out, dtype=torch.int64)
        out_gather[mask.row_order] = pr
        self.register_buffer("in_gather", in_gather.to(device), persistent=False)
        self.register_buffer("out_gather", out_gather.to(device), persistent=False)
        kernel_in = padded_sources(mask.col_order, pc, layout.compression * layout.max_cols, fill=-1)
        kernel_out = padded_sources(mask.row_order, pr, layout.compression * layout.max_rows, fill=-1)
        self.register_buffer("kernel_in_index", kernel_in.to(torch.int32).to(device), persistent=False)
        self.register_buffer("kernel_out_index", kernel_out.to(torch.int32).to(device), persistent=False)
        padding = None if layout.is_even else layout.padding_mask().to(device)
        self.register_buffer("padding_mask", padding, persistent=False)

    def chain_weights(self, kernel_indices: bool = True) -> ChainWeights:
        """This layer as a one-layer chain (``kernel_indices``: also what the Triton engine reads)."""
        weights = ChainWeights([self.in_gather, self.out_gather], [self.engine_blocks(kernel_indices)], [self.bias], [])
        if kernel_indices:
            weights.in_index, weights.out_index = [self.kernel_in_index], [self.kernel_out_index]
            weights.input_gaps = [False]
            weights.out_features = [self.out_features]
        return weights

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return run_packed(input, self)

    def extra_repr(self) -> str:
        layout = self.layout
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"compression={layout.compression}, blocks={layout.compression}x{layout.max_rows}x{layout.max_cols}, "
            f"bias={self.bias is not None}"
        )


def _linear_like(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An ``nn.Linear`` of another shape with ``like``'s bias setting, device and dtype."""
    w = like.weight
    return nn.Linear(in_features, out_features, like.bias is not None, device=w.device, dtype=w.dtype)


def _ops(gap: nn.Module | None) -> list[nn.Module]:
    if gap is None:
        return []
    return list(gap) if isinstance(gap, nn.Sequential) else [gap]


class PackedChain(ForgetsLaunchPlans, nn.Module):
    """``layers[0] → activations[0] → layers[1] → ... → layers[-1]`` with fused permutations.

    A dense ``nn.Linear`` right before the chain (``head``, then the element-wise ``head_gap``)
    or right after it (``tail_gap``, then ``tail``) can be folded in: the head's output rows are
    stored in the order the first packed layer reads, the tail's input columns in the order the
    last packed layer writes, so those two permutations cost nothing at run time. The folded
    weights are the dense ones with rows / columns reordered and zero rows / columns at padding
    positions; :meth:`unfused` restores the originals exactly.
    """

    def __init__(
        self,
        layers: list[BlockDiagonalLinear],
        activations: list[nn.Module],
        source_keys: list[str] | None = None,
        *,
        head: nn.Linear | None = None,
        head_gap: nn.Module | None = None,
        tail_gap: nn.Module | None = None,
        tail: nn.Linear | None = None,
    ) -> None:
        """``source_keys``: the keys the fused modules had in their ``nn.Sequential`` (one per
        module, in order: head, head gap, layers and activations, tail gap, tail), so
        :meth:`unfused` can restore them. ``head`` and ``tail`` are given already folded (see
        :meth:`fold_head` / :meth:`fold_tail`)."""
        super().__init__()
        if not layers:
            raise CompressionError("a PackedChain needs at least one layer")
        if len(activations) != len(layers) - 1:
            raise CompressionError(f"{len(layers)} layers need {len(layers) - 1} activations, got {len(activations)}")
        for i, act in enumerate([*activations, head_gap, tail_gap]):
            if not all(is_elementwise(op) for op in _ops(act)):
                raise CompressionError(
                    f"activation {i} ({act}) is not element-wise; it cannot sit inside a fused chain"
                )
        if (head_gap is not None and head is None) or (tail_gap is not None and tail is None):
            raise CompressionError("head_gap / tail_gap need a head / tail")
        for i in range(len(layers) - 1):
            if layers[i].out_features != layers[i + 1].in_features:
                raise CompressionError(
                    f"layer {i} has {layers[i].out_features} outputs but layer {i + 1} "
                    f"expects {layers[i + 1].in_features} inputs"
                )
        first, last = layers[0].layout, layers[-1].layout
        if head is not None and head.out_features != first.compression * first.max_cols:
            raise CompressionError(
                f"a folded head must have {first.compression * first.max_cols} outputs, got {head.out_features}"
            )
        if tail is not None and tail.in_features != last.compression * last.max_rows:
            raise CompressionError(
                f"a folded tail must have {last.compression * last.max_rows} inputs, got {tail.in_features}"
            )
        self.layers = nn.ModuleList(layers)
        self.activations = nn.ModuleList(activations)
        self.head, self.head_gap, self.tail_gap, self.tail = head, head_gap, tail_gap, tail
        n_modules = len(self._unfused_slots())
        if source_keys is None:
            source_keys = [str(i) for i in range(n_modules)]
        if len(source_keys) != n_modules:
            raise CompressionError(f"source_keys needs {n_modules} keys, got {len(source_keys)}")
        self.source_keys = list(source_keys)
        self._build_fused_gathers()
        self.register_load_state_dict_post_hook(_rebuild_chain_indices)

    @property
    def in_features(self) -> int:
        return self.head.in_features if self.head is not None else self.layers[0].in_features

    @property
    def out_features(self) -> int:
        return self.tail.out_features if self.tail is not None else self.layers[-1].out_features

    # -- folding dense neighbours ------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def fold_head(dense: nn.Linear, first: BlockDiagonalLinear) -> nn.Linear:
        """``dense`` with its output rows in the padded order ``first`` reads (zero padding rows)."""
        valid = (first.kernel_in_index >= 0).to(dense.weight.device)
        rows = first.in_gather.to(dense.weight.device)
        folded = _linear_like(dense, dense.in_features, rows.numel())
        folded.weight.copy_(dense.weight[rows] * valid[:, None])
        if dense.bias is not None:
            folded.bias.copy_(dense.bias[rows] * valid)
        return folded

    @staticmethod
    @torch.no_grad()
    def fold_tail(dense: nn.Linear, last: BlockDiagonalLinear) -> nn.Linear:
        """``dense`` with its input columns in the padded order ``last`` writes (zero padding columns)."""
        layout = last.layout
        folded = _linear_like(dense, layout.compression * layout.max_rows, dense.out_features)
        folded.weight.zero_()
        folded.weight[:, last.out_gather.to(dense.weight.device)] = dense.weight
        if dense.bias is not None:
            folded.bias.copy_(dense.bias)
        return folded

    @torch.no_grad()
    def _unfolded_head(self) -> nn.Linear:
        first = self.layers[0]
        positions = torch.empty(first.in_features, dtype=torch.int64, device=first.in_gather.device)
        valid = first.kernel_in_index >= 0
        positions[first.in_gather[valid]] = torch.nonzero(valid).flatten()
        head = self.head
        dense = _linear_like(head, head.in_features, first.in_features)
        dense.weight.copy_(head.weight[positions.to(head.weight.device)])
        if head.bias is not None:
            dense.bias.copy_(head.bias[positions.to(head.weight.device)])
        return dense

    @torch.no_grad()
    def _unfolded_tail(self) -> nn.Linear:
        last, tail = self.layers[-1], self.tail
        dense = _linear_like(tail, last.out_features, tail.out_features)
        dense.weight.copy_(tail.weight[:, last.out_gather.to(tail.weight.device)])
        if tail.bias is not None:
            dense.bias.copy_(tail.bias)
        return dense

    # -- forward ----------------------------------------------------------------------------------
    def _build_fused_gathers(self) -> None:
        for i in range(1, len(self.layers)):
            fused = self.layers[i - 1].out_gather[self.layers[i].in_gather]
            # Masks chosen jointly (masks="weights-joint") leave nothing to permute between layers.
            identity = torch.equal(fused, torch.arange(fused.numel(), device=fused.device, dtype=fused.dtype))
            self.register_buffer(f"fused_gather_{i}", None if identity else fused, persistent=False)
        # With a folded head the first layer reads its input in place (padding columns skipped);
        # with a folded tail the last layer writes every padded row in place (the tail's padding
        # columns are zero).
        first, last = self.layers[0], self.layers[-1]
        positions = torch.arange(first.kernel_in_index.numel(), dtype=torch.int32, device=first.kernel_in_index.device)
        self.register_buffer("head_in_index", torch.where(first.kernel_in_index >= 0, positions, -1), persistent=False)
        rows = last.kernel_out_index.numel()
        self.register_buffer(
            "tail_out_index",
            torch.arange(rows, dtype=torch.int32, device=last.kernel_out_index.device),
            persistent=False,
        )
        # The tail's padding columns read f(0) of the tail gap, which is not zero for Sigmoid,
        # Softplus and the like: while gradients flow, masking them keeps their weights zero.
        valid = None if self.tail is None or last.layout.is_even else last.kernel_out_index >= 0
        self.register_buffer("tail_columns", valid, persistent=False)
        # Read here, where the layout is at hand, not per call (num_blocks is a device tensor).
        self._head_input_gaps = self.head is not None and not first.layout.is_even

    def chain_weights(self, kernel_indices: bool = True) -> ChainWeights:
        """The chain as plain tensors (``kernel_indices``: also what the Triton engine reads)."""
        n = len(self.layers)
        gathers = [None if self.head is not None else self.layers[0].in_gather]
        gathers += [getattr(self, f"fused_gather_{i}") for i in range(1, n)]
        gathers.append(None if self.tail is not None else self.layers[-1].out_gather)
        weights = ChainWeights(
            gathers,
            [layer.engine_blocks(kernel_indices) for layer in self.layers],
            [layer.bias for layer in self.layers],
            self.activations,  # the module list itself: an activation swapped in is seen by cached weights
        )
        if kernel_indices:
            in_index = [layer.kernel_in_index for layer in self.layers]
            out_index = [layer.kernel_out_index for layer in self.layers]
            out_features = [layer.out_features for layer in self.layers]
            if self.head is not None:
                in_index[0] = self.head_in_index
            if self.tail is not None:
                out_index[-1] = self.tail_out_index
                out_features[-1] = self.tail_out_index.numel()
            weights.in_index, weights.out_index, weights.out_features = in_index, out_index, out_features
            weights.input_gaps = [self._head_input_gaps] + [False] * (n - 1)
        return weights

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        h = input
        if self.head is not None:
            h = self.head(h)
            if self.head_gap is not None:
                h = self.head_gap(h)
        h = run_packed(h, self)
        if self.tail is not None:
            if self.tail_gap is not None:
                h = self.tail_gap(h)
            h = self._apply_tail(h)
        return h

    def _apply_tail(self, h: torch.Tensor) -> torch.Tensor:
        # Only a float tail trains; a quantized one (no nn.Linear) dequantizes on each read of its
        # weight, or has none in an export form.
        trains = isinstance(self.tail, nn.Linear) and self.tail.weight.requires_grad
        if self.tail_columns is not None and torch.is_grad_enabled() and trains:
            return nn.functional.linear(h, self.tail.weight * self.tail_columns, self.tail.bias)
        return self.tail(h)

    # -- back to the masked form ----------------------------------------------------------------------
    def _unfused_slots(self) -> list[nn.Module | int | str]:
        """The fused run in order: modules as they are, layer indices, and "head" / "tail"."""
        slots: list[nn.Module | int | str] = []
        if self.head is not None:
            slots += ["head", *_ops(self.head_gap)]
        for i in range(len(self.layers)):
            if i:
                slots.extend(_ops(self.activations[i - 1]))
            slots.append(i)
        if self.tail is not None:
            slots += [*_ops(self.tail_gap), "tail"]
        return slots

    def layer_source_keys(self) -> list[str]:
        """The Sequential key each compressed layer had before fusion."""
        return [key for key, slot in zip(self.source_keys, self._unfused_slots()) if isinstance(slot, int)]

    def unfused(self) -> list[tuple[str, nn.Module]]:
        """The modules this chain computes, with their original keys: ``MPDLinear, act, ...``
        (and the head and tail as the dense layers they were)."""

        def restore(slot: nn.Module | int | str) -> nn.Module:
            if slot == "head":
                return self._unfolded_head()
            if slot == "tail":
                return self._unfolded_tail()
            return self.layers[slot].to_masked() if isinstance(slot, int) else slot

        return [(key, restore(slot)) for key, slot in zip(self.source_keys, self._unfused_slots())]


def _rebuild_chain_indices(module: PackedChain, _keys) -> None:
    # A module-level function, not a lambda, so packed models pickle.
    module._build_fused_gathers()
