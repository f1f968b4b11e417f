"""Residual streams: the channels a run of residual blocks reads and adds back to.

In ``conv → BN → ReLU → Residual → ReLU → Residual → ...`` every block reads the same channels
(its body's first convolution and its shortcut's read them) and adds its output back to them
(its body's last convolution and its shortcut's write them), until a block with a shortcut
convolution starts the next stream. Packed, each compressed convolution gathers its input
channels into block order and its output channels back: three gathers per block, the cost that
kept a packed ResNet from its multiply-add limit. When every compressed convolution that reads or
writes a stream uses one channel order (``MPDConfig(shared_streams=True)`` draws them so), the
whole stream can live in that order instead: :func:`relabel_streams_` renames the stream's
channels in every module that touches it (a function-preserving change), after which those
gathers are identities that the packed layers skip. Only the gather between a body's two
convolutions is left, the one that mixes the blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.conv_chain import DENSE_CONVS, is_channelwise, reordered
from ..nn.masked import MaskedWeight, MPDLinear
from ..nn.residual import Residual
from .masks import MPDMask, inverse_permutation, layer_seed

__all__ = ["ResidualStream", "residual_streams", "shared_stream_masks", "relabel_streams_", "shared_modules"]

# A module's place: its parent and its key there, so that it can be replaced.
Slot = tuple[nn.Module, str]


def _module(slot: Slot) -> nn.Module:
    parent, key = slot
    return parent._modules[key]


@dataclass
class ResidualStream:
    """The modules that touch one stream of ``channels`` channels: ``writers`` compute them
    (output channels), ``readers`` read them (input channels; a linear layer after a ``Flatten``
    reads each channel's positions in a row), ``on_stream`` are the channel-wise modules they
    pass through (BatchNorms, activations, pools)."""

    channels: int = 0
    writers: list[Slot] = field(default_factory=list)
    readers: list[Slot] = field(default_factory=list)
    on_stream: list[Slot] = field(default_factory=list)
    understood: bool = True

    def convs(self) -> list[tuple[str, nn.Module]]:
        """``("writer" | "reader", module)`` for each convolution that writes or reads the stream."""
        sides = [("writer", _module(s)) for s in self.writers] + [("reader", _module(s)) for s in self.readers]
        return [(side, m) for side, m in sides if _is_conv(m)]


def _is_conv(module: nn.Module) -> bool:
    if isinstance(module, MaskedWeight):
        return not isinstance(module, MPDLinear)
    return type(module) in DENSE_CONVS and module.groups == 1


def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, MPDLinear)


def _branch(parent: nn.Module, key: str) -> tuple[list[Slot], Slot, Slot, list[Slot]] | None:
    """A residual branch as (channel-wise modules on the input stream, the convolution reading it,
    the convolution writing the output stream, channel-wise modules after it), or None when the
    branch is not a convolution or a Sequential starting and ending with one."""
    module = parent._modules[key]
    if _is_conv(module):
        return [], (parent, key), (parent, key), []
    if type(module) is not nn.Sequential:
        return None
    items = list(module._modules.items())
    first = 0
    while first < len(items) and is_channelwise(items[first][1]):
        first += 1
    last = len(items) - 1
    while last >= first and is_channelwise(items[last][1]):
        last -= 1
    if last < first or not _is_conv(items[first][1]) or not _is_conv(items[last][1]):
        return None
    slots = [(module, k) for k, _ in items]
    return slots[:first], slots[first], slots[last], slots[last + 1 :]


def residual_streams(model: nn.Module) -> list[ResidualStream]:
    """Every residual stream of ``model`` whose every reader, writer and channel-wise module is
    known: written by a convolution, read by convolutions or by a ``Flatten`` then linear
    layer, inside one ``nn.Sequential``. Streams touching a module used at two places, or
    modules of other kinds, are left out (nothing may be renamed there)."""
    streams = []
    for seq in [m for m in model.modules() if type(m) is nn.Sequential]:
        streams += _sequential_streams(seq)
    streams = [s for s in streams if s.understood]
    for stream in streams:
        stream.channels = _module(stream.writers[0]).out_channels
    shared = shared_modules(model)
    return [s for s in streams if _consistent(s, shared)]


def _sequential_streams(seq: nn.Sequential) -> list[ResidualStream]:
    items = list(seq._modules.items())
    streams: list[ResidualStream] = []
    i = 0
    while i < len(items):
        if not isinstance(items[i][1], Residual):
            i += 1
            continue
        stream = ResidualStream()
        h = i - 1
        while h >= 0 and is_channelwise(items[h][1]):
            h -= 1
        if h >= 0 and _is_conv(items[h][1]):
            stream.writers.append((seq, items[h][0]))
            stream.on_stream += [(seq, k) for k, _ in items[h + 1 : i]]
        else:
            stream.understood = False  # nothing known writes it
        j = i
        while j < len(items) and (isinstance(items[j][1], Residual) or is_channelwise(items[j][1])):
            key, module = items[j]
            j += 1
            if not isinstance(module, Residual):
                stream.on_stream.append((seq, key))
                continue
            body = _branch(module, "body") if "body" in module._modules else None
            shortcut = _branch(module, "shortcut") if "shortcut" in module._modules else None
            if body is None or ("shortcut" in module._modules and shortcut is None):
                stream.understood = False
                streams.append(stream)
                stream = ResidualStream(understood=False)
                continue
            branches = [body] if shortcut is None else [body, shortcut]
            for before, reader, _, _ in branches:
                stream.on_stream += before
                stream.readers.append(reader)
            if shortcut is not None:
                streams.append(stream)
                stream = ResidualStream()
            for _, _, writer, after in branches:
                stream.writers.append(writer)
                stream.on_stream += after
        if j < len(items) and _is_conv(items[j][1]):
            stream.readers.append((seq, items[j][0]))
        elif (
            j + 1 < len(items)
            and type(items[j][1]) is nn.Flatten
            and (items[j][1].start_dim, items[j][1].end_dim) == (1, -1)
            and _is_linear(items[j + 1][1])
        ):
            stream.readers.append((seq, items[j + 1][0]))
        else:
            stream.understood = False  # read by something unknown, or outside this Sequential
        streams.append(stream)
        i = j
    return streams


def shared_modules(model: nn.Module) -> set[int]:
    """Ids of the modules that sit at more than one place in ``model``."""
    seen: set[int] = set()
    shared: set[int] = set()
    for parent in model.modules():
        for child in parent._modules.values():
            if child is not None:
                (shared if id(child) in seen else seen).add(id(child))
    return shared


def _consistent(stream: ResidualStream, shared: set[int]) -> bool:
    """Whether every module of ``stream`` agrees on its channel count and is used once."""
    writers = [_module(s) for s in stream.writers]
    slots = stream.writers + stream.readers + stream.on_stream
    if any(id(_module(s)) in shared for s in slots):
        return False
    if any(w.out_channels != stream.channels for w in writers):
        return False
    for reader in map(_module, stream.readers):
        width = reader.in_features if _is_linear(reader) else reader.in_channels
        if width % stream.channels or (not _is_linear(reader) and width != stream.channels):
            return False
    norms = [m for m in map(_module, stream.on_stream) if hasattr(m, "num_features")]
    return all(m.num_features == stream.channels for m in norms)


def shared_stream_masks(
    model: nn.Module, masks: Mapping[str, MPDMask], seed: int, permute: bool = True
) -> dict[str, MPDMask]:
    """``masks`` (by qualified layer name) with one channel order per residual stream: every
    compressed convolution writing a stream gets it as its row order, every one reading it as
    its column order, drawn from ``layer_seed(seed, "stream:" + first member)``. Streams whose
    members have different factors, or a channel count the factor does not divide, keep their
    independent masks."""
    names = {id(m): n for n, m in model.named_modules()}
    out = dict(masks)
    for stream in residual_streams(model):
        members = [(side, names[id(m)]) for side, m in stream.convs() if names[id(m)] in masks]
        factors = {out[name].compression for _, name in members}
        if not members or len(factors) != 1 or stream.channels % factors.pop():
            continue
        order = torch.arange(stream.channels)
        if permute:
            generator = torch.Generator().manual_seed(layer_seed(seed, "stream:" + members[0][1]))
            order = torch.randperm(stream.channels, generator=generator)
        for side, name in members:
            mask = out[name]
            rows, cols = (order.clone(), mask.col_order) if side == "writer" else (mask.row_order, order.clone())
            out[name] = MPDMask(mask.layout, rows, cols)
    return out


@torch.no_grad()
def relabel_streams_(model: nn.Module) -> int:
    """Store every residual stream of ``model`` whose compressed convolutions share one channel
    order in that order: each writer's output channels, each reader's input channels and each
    BatchNorm on the stream are renamed alike (modules replaced, never changed in place), so the
    model computes the same function and the packed convolutions' gathers on the stream become
    identities. Returns how many streams were renamed."""
    renamed = 0
    for stream in residual_streams(model):
        order = _shared_order(stream)
        if order is None:
            continue
        for slot in stream.writers:
            _replace(slot, _renamed(_module(slot), order, rows=True))
        for slot in stream.readers:
            _replace(slot, _renamed(_module(slot), order, rows=False))
        for slot in stream.on_stream:
            _replace(slot, reordered(_module(slot), order))
        renamed += 1
    return renamed


def _shared_order(stream: ResidualStream) -> torch.Tensor | None:
    """The channel order every compressed convolution of ``stream`` uses on it (row order of
    writers, column order of readers), or None if they differ, split it unevenly or there are
    none; None too for the identity, which needs no renaming."""
    orders = []
    for side, conv in stream.convs():
        if isinstance(conv, MaskedWeight):
            if stream.channels % conv.compression:
                return None
            orders.append((conv.row_order if side == "writer" else conv.col_order).cpu())
    if not orders or any(not torch.equal(o, orders[0]) for o in orders[1:]):
        return None
    return None if torch.equal(orders[0], torch.arange(stream.channels)) else orders[0]


def _replace(slot: Slot, module: nn.Module) -> None:
    parent, key = slot
    parent._modules[key] = module


def _renamed(module: nn.Module, order: torch.Tensor, *, rows: bool) -> nn.Module:
    """A copy of ``module`` whose output channels (``rows``) or input channels are ``order``'s:
    new channel ``p`` is old channel ``order[p]`` (for a linear layer after a ``Flatten``, each
    channel's block of positions moves with it). A compressed layer's mask is renamed alike."""
    index = order
    if not rows and _is_linear(module):
        positions = module.in_features // order.numel()
        index = (order[:, None] * positions + torch.arange(positions)).flatten()
    # The copy does not copy what is replaced below (the weight; the bias with the rows).
    replaced = [module.weight] + ([module.bias] if rows and module.bias is not None else [])
    new = copy.deepcopy(module, {id(p): p for p in replaced})
    device = module.weight.device
    new.weight = nn.Parameter(
        module.weight.index_select(0 if rows else 1, index.to(device)), requires_grad=module.weight.requires_grad
    )
    if rows and module.bias is not None:
        new.bias = nn.Parameter(module.bias[index.to(device)], requires_grad=module.bias.requires_grad)
    if isinstance(module, MaskedWeight):
        mask = module.mpd_mask
        inverse = inverse_permutation(index)
        if rows:
            new._attach_mask(MPDMask(mask.layout, inverse[mask.row_order], mask.col_order))
        else:
            new._attach_mask(MPDMask(mask.layout, mask.row_order, inverse[mask.col_order]))
    return new
