"""Consecutive compressed convolutions with one channel gather between them.

A channel permutation commutes with every module that treats channels alike and apart
(element-wise activations, pooling, and BatchNorm once its per-channel statistics and affine
parameters are permuted the same way). So in ``conv → BN → ReLU → pool → conv``, the first
convolution's output gather and the second's input gather fuse into one gather, applied after
the channel-wise modules, which run in the first convolution's block order. A dense convolution
right before or after the run is folded in: its output channels (or input channels) are stored
in the order the run reads (or writes), so that permutation costs nothing at run time.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ..errors import CompressionError
from ..kernels.torch_engine import tracing
from .packed import is_elementwise, padded_sources
from .packed_conv import BlockDiagonalConv, gather_channels

__all__ = ["PackedConvChain", "is_channelwise", "reordered", "conv_like", "valid_input_positions", "DENSE_CONVS"]

DENSE_CONVS = (nn.Conv1d, nn.Conv2d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)


# Drop whole channels at random: a channel permutation leaves the distribution of what they
# drop unchanged, as nn.Dropout's is for a feature permutation (and in eval they are identities).
_CHANNEL_DROPOUTS = (nn.Dropout1d, nn.Dropout2d, nn.FeatureAlphaDropout)


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
    )


def run_gap(gap: nn.Sequential | None, x: torch.Tensor) -> torch.Tensor:
    """``gap(x)``, where ``x`` is an activation the chain made itself. In plain inference a ReLU
    there runs in place: nothing else holds the tensor, and a fresh activation of a CNN is
    megabytes of memory the allocator hands back with its pages unmapped (on this CPU, ReLUs in
    place cut a packed ResNet-18's channels-last forward by a fifth). Modules with hooks run as
    modules."""
    if gap is None:
        return x
    if torch.is_grad_enabled() or tracing():
        return gap(x)
    for module in gap:
        x = torch.relu_(x) if type(module) is nn.ReLU and not _hooked(module) else module(x)
    return x


def is_channelwise(module: nn.Module) -> bool:
    """Whether ``module`` treats every channel alike and apart, so a channel permutation commutes
    with it (BatchNorm after its parameters are permuted the same way)."""
    if type(module) in _POOLS:
        return not getattr(module, "return_indices", False)
    return type(module) in (*_BATCH_NORMS, *_CHANNEL_DROPOUTS) or is_elementwise(module)


@torch.no_grad()
def reordered(module: nn.Module, sources: torch.Tensor) -> nn.Module:
    """``module`` acting on channels ``sources`` (new channel ``p`` is old channel ``sources[p]``)."""
    if type(module) not in _BATCH_NORMS:
        return module  # no per-channel state
    new = copy.deepcopy(module)
    new.num_features = sources.numel()
    for name in ("weight", "bias"):
        if getattr(module, name) is not None:
            setattr(new, name, nn.Parameter(getattr(module, name)[sources.to(module.weight.device)].clone()))
    for name in ("running_mean", "running_var"):
        if getattr(module, name) is not None:
            buffer = getattr(module, name)
            setattr(new, name, buffer[sources.to(buffer.device)].clone())
    return new


def conv_like(like: nn.Module, in_channels: int, out_channels: int) -> nn.Module:
    """A fresh ungrouped convolution of ``like``'s kind, kernel, stride, padding, dilation, bias
    setting, padding mode, device and dtype, with other channel counts."""
    w = like.weight
    return type(like)(
        in_channels,
        out_channels,
        like.kernel_size,
        like.stride,
        like.padding,
        like.dilation,
        1,
        like.bias is not None,
        like.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )


def _gap_modules(gap: nn.Sequential | None) -> list[nn.Module]:
    return [] if gap is None else list(gap)


class PackedConvChain(nn.Module):
    """``[head, head_gap] → layers[0] → gaps[0] → layers[1] → ... → layers[-1] [→ tail_gap] [→ tail]``.

    The channel-wise gap modules run in the block order of the layer before them (BatchNorms
    permuted and padded to that layer's ``c * max_rows`` channels; padding channels carry
    channel 0's statistics and are never read), and one gather per gap takes the next layer's
    input channels from them. ``head`` / ``tail`` are dense convolutions given already folded
    (:meth:`fold_head` / :meth:`fold_tail`). Without a tail, the channel-wise ``tail_gap`` still
    runs before the last gather, which then moves fewer values when it pools. :meth:`unfused`
    gives back the original modules.
    """

    def __init__(
        self,
        layers: list[BlockDiagonalConv],
        gaps: list[nn.Sequential],
        source_keys: list[str] | None = None,
        *,
        head: nn.Module | None = None,
        head_gap: nn.Sequential | None = None,
        tail_gap: nn.Sequential | None = None,
        tail: nn.Module | None = None,
    ) -> None:
        """``source_keys``: the Sequential keys of the fused modules in order (head, head gap,
        layers and gaps, tail gap, tail), so :meth:`unfused` restores them."""
        super().__init__()
        if not layers or len(gaps) != len(layers) - 1:
            raise CompressionError(f"{len(layers)} convolutions need {max(len(layers) - 1, 0)} gaps, got {len(gaps)}")
        dims = {len(layer.kernel_size) for layer in layers}
        if len(dims) != 1:
            raise CompressionError("a PackedConvChain joins convolutions of one dimensionality")
        for gap in [*gaps, head_gap, tail_gap]:
            for module in _gap_modules(gap):
                if not is_channelwise(module):
                    raise CompressionError(f"{module} is not channel-wise; it cannot sit inside a fused chain")
        for a, b in zip(layers, layers[1:]):
            if a.out_channels != b.in_channels:
                raise CompressionError(f"a layer has {a.out_channels} output channels, the next reads {b.in_channels}")
        if head_gap is not None and head is None:
            raise CompressionError("a head_gap needs a head")
        first, last = layers[0].layout, layers[-1].layout
        if head is not None and head.out_channels != first.compression * first.max_cols:
            raise CompressionError(f"a folded head must have {first.compression * first.max_cols} output channels")
        if tail is not None and tail.in_channels != last.compression * last.max_rows:
            raise CompressionError(f"a folded tail must have {last.compression * last.max_rows} input channels")
        self.layers = nn.ModuleList(layers)
        self.gaps = nn.ModuleList(gaps)
        self.head, self.head_gap, self.tail_gap, self.tail = head, head_gap, tail_gap, tail
        self.channel_dim = -1 - dims.pop()
        slots = len(self._unfused_slots())
        self.source_keys = list(source_keys) if source_keys is not None else [str(i) for i in range(slots)]
        if len(self.source_keys) != slots:
            raise CompressionError(f"source_keys needs {slots} keys, got {len(self.source_keys)}")
        self._build_links()
        self.register_load_state_dict_post_hook(_rebuild_chain_links)

    # -- folding ----------------------------------------------------------------------------------
    @staticmethod
    def block_order(layer: BlockDiagonalConv) -> torch.Tensor:
        """The original output channel behind each of ``layer``'s padded output positions
        (padding positions: channel 0)."""
        layout = layer.layout
        positions = layout.padded_row_positions().to(layer.row_order.device)
        return padded_sources(layer.row_order, positions, layout.compression * layout.max_rows)

    @staticmethod
    @torch.no_grad()
    def fold_head(dense: nn.Module, gap: list[nn.Module], first: BlockDiagonalConv) -> tuple[nn.Module, list]:
        """``dense`` (and the channel-wise ``gap`` after it) with output channels in the padded
        order ``first`` reads; padding channels are zero."""
        rows = first.in_gather.to(dense.weight.device)
        valid = torch.zeros_like(rows, dtype=torch.bool)
        valid[valid_input_positions(first)] = True
        folded = conv_like(dense, dense.in_channels, rows.numel())
        shape = (-1, *[1] * (dense.weight.dim() - 1))
        folded.weight.copy_(dense.weight[rows] * valid.view(shape))
        if dense.bias is not None:
            folded.bias.copy_(dense.bias[rows] * valid)
        return folded, [reordered(m, rows) for m in gap]

    @staticmethod
    @torch.no_grad()
    def fold_tail(dense: nn.Module, last: BlockDiagonalConv) -> nn.Module:
        """``dense`` with input channels in the padded order ``last`` writes (zero padding columns)."""
        layout = last.layout
        folded = conv_like(dense, layout.compression * layout.max_rows, dense.out_channels)
        folded.weight.zero_()
        folded.weight[:, last.out_gather.to(dense.weight.device)] = dense.weight
        if dense.bias is not None:
            folded.bias.copy_(dense.bias)
        return folded

    # -- forward ----------------------------------------------------------------------------------
    def _build_links(self) -> None:
        for i in range(1, len(self.layers)):
            link = self.layers[i - 1].out_gather[self.layers[i].in_gather]
            identity = torch.equal(link, torch.arange(link.numel(), device=link.device, dtype=link.dtype))
            self.register_buffer(f"link_{i}", None if identity else link, persistent=False)
        last = self.layers[-1]
        # The tail's padding columns read what the tail gap makes of zero (a BatchNorm's shift):
        # while gradients flow, masking them keeps their weights zero.
        columns = None
        if self.tail is not None and not last.layout.is_even:
            columns = torch.zeros(last.layout.compression * last.layout.max_rows, dtype=torch.bool)
            columns[last.out_gather.cpu()] = True
            columns = columns.view(1, -1, *[1] * len(last.kernel_size)).to(last.row_order.device)
        self.register_buffer("tail_columns", columns, persistent=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dim = self.channel_dim
        if self.head is not None:
            x = run_gap(self.head_gap, self.head(input))
        else:
            x = self.layers[0].to_blocks(input)
        for i, layer in enumerate(self.layers):
            x = layer.grouped(x)
            if i + 1 < len(self.layers):
                x = run_gap(self.gaps[i], x)
                link = getattr(self, f"link_{i + 1}")
                x = x if link is None else gather_channels(x, dim, link)
        x = run_gap(self.tail_gap, x)
        if self.tail is None:
            return self.layers[-1].from_blocks(x)
        weight = self.tail.weight
        if self.tail_columns is not None and torch.is_grad_enabled() and weight.requires_grad:
            return self.tail._conv_forward(x, weight * self.tail_columns, self.tail.bias)
        return self.tail(x)

    # -- back to the masked form ------------------------------------------------------------------
    def _unfused_slots(self) -> list[tuple[str, int | None, nn.Module | None]]:
        """The fused run in order as ``(role, layer index, module)``: role "head", "head_gap",
        "layer", "gap", "tail_gap" or "tail"."""
        slots: list[tuple[str, int | None, nn.Module | None]] = []
        if self.head is not None:
            slots += [("head", 0, self.head), *[("head_gap", 0, m) for m in _gap_modules(self.head_gap)]]
        for i, layer in enumerate(self.layers):
            if i:
                slots += [("gap", i - 1, m) for m in self.gaps[i - 1]]
            slots.append(("layer", i, layer))
        last = len(self.layers) - 1
        slots += [("tail_gap", last, m) for m in _gap_modules(self.tail_gap)]
        if self.tail is not None:
            slots.append(("tail", last, self.tail))
        return slots

    def layer_source_keys(self) -> list[str]:
        """The Sequential key each compressed convolution had before fusion."""
        return [key for key, (role, _, _) in zip(self.source_keys, self._unfused_slots()) if role == "layer"]

    @torch.no_grad()
    def unfused(self) -> list[tuple[str, nn.Module]]:
        """The modules this chain computes, with their original keys (masked convolutions, the
        gap modules in channel order, the head and tail as the dense convolutions they were)."""
        out = []
        for key, (role, i, module) in zip(self.source_keys, self._unfused_slots()):
            layer = self.layers[i]
            if role == "layer":
                module = layer.to_masked()
            elif role in ("gap", "tail_gap"):
                module = reordered(module, layer.out_gather)
            elif role == "head_gap":
                module = reordered(module, _original_positions(layer))
            elif role == "head":
                module = _unfolded(module, _original_positions(layer), rows=True)
            elif role == "tail":
                module = _unfolded(module, layer.out_gather, rows=False)
            out.append((key, module))
        return out


def valid_input_positions(layer: BlockDiagonalConv) -> torch.Tensor:
    """The padded input positions of ``layer`` that hold a real channel."""
    layout = layer.layout
    return layout.padded_col_positions().to(layer.in_gather.device)


def _original_positions(layer: BlockDiagonalConv) -> torch.Tensor:
    """For each original input channel of ``layer``, its padded input position."""
    positions = torch.empty(layer.in_channels, dtype=torch.int64, device=layer.in_gather.device)
    valid = valid_input_positions(layer)
    positions[layer.in_gather[valid]] = valid
    return positions


@torch.no_grad()
def _unfolded(folded: nn.Module, positions: torch.Tensor, rows: bool) -> nn.Module:
    """The dense convolution ``folded`` was made from: rows (output channels) or columns (input
    channels) taken back from ``positions``."""
    if rows:
        dense = conv_like(folded, folded.in_channels, positions.numel())
        dense.weight.copy_(folded.weight[positions])
        if folded.bias is not None:
            dense.bias.copy_(folded.bias[positions])
    else:
        dense = conv_like(folded, positions.numel(), folded.out_channels)
        dense.weight.copy_(folded.weight[:, positions])
        if folded.bias is not None:
            dense.bias.copy_(folded.bias)
    return dense


def _rebuild_chain_links(module: PackedConvChain, _keys) -> None:
    # A module-level function, not a lambda, so packed models pickle.
    module._build_links()
