"""Model-level conversions: dense → masked (``mpdify``), masked → packed (``pack``) and back."""

from __future__ import annotations

import copy
import functools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import CompressionError, CompressionTypeError, UnknownNameError
from ..nn.conv_chain import DENSE_CONVS, PackedConvChain, is_channelwise, reordered
from ..nn.loading import guard_state_dict_loading
from ..nn.masked import MASKED_CONVS, MaskedWeight, MPDLinear
from ..nn.packed import BlockDiagonalLinear, PackedChain, is_elementwise
from ..nn.packed_conv import BlockDiagonalConv
from ..progress import Progress, reporting
from .config import MPDConfig
from .layout import validate_compression
from .mask_search import mask_from_weight, masks_for_layers
from .masks import MPDMask, layer_seed, make_mask
from .roles import mlp_pairs
from .streams import relabel_streams_, shared_modules, shared_stream_masks

__all__ = [
    "mpdify_",
    "mpdify",
    "pack",
    "unpack",
    "apply_masks_",
    "compressed_layers",
    "packed_layer_sources",
    "conv_skip_reason",
    "LayerFilter",
]

# torchao's convention: filter_fn(module, fully qualified name) -> compress it?
LayerFilter = Callable[[nn.Module, str], bool]
# A packed layer of either kind, and everything pack() produces.
_PACKED = (BlockDiagonalLinear, PackedChain, BlockDiagonalConv, PackedConvChain)


def mpdify_(
    model: nn.Module,
    config: MPDConfig | int | Mapping[str, int],
    *,
    filter_fn: LayerFilter | None = None,
    input_moments: Mapping[str, torch.Tensor] | None = None,
    progress: Progress = None,
    **options: Any,
) -> nn.Module:
    """Compress ``model`` in place: selected ``nn.Linear`` layers (and ``transformers``' ``Conv1D``,
    GPT-2's transposed linear) become :class:`MPDLinear`.

    ``config`` is an :class:`MPDConfig`, or its ``compression`` (one factor, or a mapping from
    qualified layer names to factors) with the other options as keywords: ``seed``,
    ``permute``, ``mode``, ``init``. ``filter_fn(module, name)`` further selects layers, as in
    torchao's ``quantize_``.

    By default (``init="dense"``) every kept weight keeps its value: compressing a trained model
    only zeroes what the mask drops. ``init="block"`` (for training from scratch) rescales each
    kept row and its bias by ``sqrt(d_in / block_width)``, the initialization ``nn.Linear`` gives
    a layer whose fan-in is the block width. ``mode="compact"`` goes on to :func:`pack` in place:
    the result trains directly in block-diagonal form (parameters are only the blocks, ~1/c of
    the masked form's compute and weight/optimizer memory; same function class, same gradients).

    Each layer's mask is drawn from ``layer_seed(seed, name)``, so the same seed gives the same
    masks in every process. Existing parameter objects are kept, so an optimizer built before
    this call stays valid (except a ``Conv1D``'s weight, which is transposed into a new
    parameter: build the optimizer after compressing GPT-2). Layers can be selected by what they
    do in a transformer with ``filter_fn=select_roles("mlp")`` (see :mod:`mpdcompress.core.roles`).
    A model built on the meta device gets its masks back when ``to_empty`` materializes it.
    ``input_moments`` (from :func:`~mpdcompress.posthoc.calibrate.input_moments`) makes weight-chosen
    masks keep the most of ``W² E[x²]`` instead of ``W²``; see also
    :func:`~mpdcompress.posthoc.calibrate.compress_calibrated`. The search for weight-chosen masks
    reports ``{"mask", "index", "masks"}`` to ``progress`` (:mod:`mpdcompress.progress`: by
    default a bar when standard error is a terminal). Returns ``model`` (or the new layer when ``model`` itself is an
    ``nn.Linear``); the config is kept as ``mpd_config`` on it and recorded by :func:`save`.

    With ``convs=True``, ``nn.Conv1d`` / ``nn.Conv2d`` layers become :class:`MPDConv1d` /
    :class:`MPDConv2d` (the mask on the channel plane, alike at every kernel position; packed,
    a grouped convolution). Convolutions that :func:`conv_skip_reason` names a reason for (a
    first layer reading image channels, grouped and depthwise convolutions, fewer channels
    than ``c``, non-zero padding modes) are left dense; ``model.mpd_skipped`` maps their names
    to the reasons. ``filter_fn`` is then called for convolutions too.
    """
    if not isinstance(model, nn.Module):
        raise CompressionTypeError(f"mpdify_ takes a torch.nn.Module, got {type(model).__name__}")
    config = MPDConfig.of(config, **options)
    candidates, factors, skipped = _selected_factors(model, config, filter_fn)
    _refuse_unsafe_layers(model, {name: candidates[name] for name in factors})
    if config.masks.startswith("weights") and any(candidates[name].weight.device.type == "meta" for name in factors):
        raise CompressionError(
            "masks='weights' chooses masks from the weights, and a model on the meta device has none yet: "
            "load its weights first"
        )
    if input_moments is not None and not config.masks.startswith("weights"):
        raise CompressionError("input_moments weigh the mass of weight-chosen masks: use masks='weights'")
    # Every mask is made (and every factor validated) before any layer changes: a refused call
    # leaves the model as it was.
    searched = config.masks.startswith("weights")
    with reporting(progress if searched else False, "choosing masks", "layer", done="index", total="masks") as report:
        planned = _planned_masks(model, config, candidates, factors, dict(input_moments or {}), report)
    replacements: dict[int, MaskedWeight] = {}
    for key, (layer, mask) in planned.items():
        if type(layer) in MASKED_CONVS:
            replacements[key] = MASKED_CONVS[type(layer)].from_conv(layer, mask)
        else:
            replacements[key] = MPDLinear.from_linear(layer, mask)
        if config.init == "block":
            _block_fan_in_(replacements[key])
    model = _replace_modules(model, lambda m: replacements.get(id(m)))
    if any(is_transposed_linear(candidates[name]) for name in factors):
        _guard_save_pretrained(
            model,
            "its Conv1D layers became MPDLinear layers holding the transposed weight, which from_pretrained "
            "would read with the wrong shape",
        )
    if config.mode == "compact":
        # Compact training keeps dense neighbours as they are: the trainer's checkpoints and the
        # mask study address them by their Sequential keys.
        model = pack(model, inplace=True, fold_dense=False)
    model.mpd_config = config
    if config.convs:
        model.mpd_skipped = skipped
    return guard_state_dict_loading(model)


def _selected_factors(
    model: nn.Module, config: MPDConfig, filter_fn: LayerFilter | None
) -> tuple[dict[str, nn.Module], dict[str, int], dict[str, str]]:
    """The layers that could be compressed by name, the factor of each selected one, and the
    convolutions the default rules leave dense with the reason."""
    linears = {
        name: module
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) and not isinstance(module, MPDLinear)) or is_transposed_linear(module)
    }
    convs = {name: module for name, module in model.named_modules() if type(module) in MASKED_CONVS}
    candidates = {**linears, **convs}
    compression = config.compression
    skipped: dict[str, str] = {}
    if isinstance(compression, Mapping):
        unknown = sorted(set(compression) - set(candidates))
        if unknown:
            raise UnknownNameError(
                f"compression names layers that are not uncompressed nn.Linear or nn.Conv1d/2d modules: {unknown}"
            )
        factors = dict(compression)
    else:
        factors = {name: compression for name in linears}
        for name, conv in convs.items() if config.convs else ():
            reason = conv_skip_reason(conv, compression)
            if reason is None:
                factors[name] = compression
            else:
                skipped[name] = reason
    if filter_fn is not None:
        factors = {name: c for name, c in factors.items() if filter_fn(candidates[name], name)}
    if not factors:
        if not linears and compressed_layers(model):
            raise CompressionError("model is already compressed (it has MPD layers and no plain nn.Linear left)")
        if config.convs and convs:
            left = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
            raise CompressionError(
                "no nn.Linear or convolution was selected for compression"
                + (f" (convolutions left dense: {left})" if left else "")
            )
        hint = " (convolutions are compressed with convs=True)" if convs and not config.convs else ""
        raise CompressionError("no nn.Linear layer was selected for compression" + hint)
    return candidates, factors, skipped


def _planned_masks(
    model: nn.Module,
    config: MPDConfig,
    candidates: dict[str, nn.Module],
    factors: dict[str, int],
    moments: dict[str, torch.Tensor],
    report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[int, tuple[nn.Module, MPDMask]]:
    """Each selected layer (a Conv1D already turned into its nn.Linear) with its mask, by the id
    of the module it replaces; ``report`` gets ``{"mask", "index", "masks"}`` after each."""
    joint = {}
    if config.masks == "weights-joint":  # convolutions get their weight-chosen masks one by one
        linears = {name: m for name, m in candidates.items() if type(m) not in MASKED_CONVS}
        joint = _joint_weight_masks(
            model, linears, {n: c for n, c in factors.items() if n in linears}, config.seed, moments
        )
    planned: dict[int, tuple[nn.Module, MPDMask]] = {}
    for name, c in factors.items():
        layer = candidates[name]
        if id(layer) in planned:
            continue
        original = layer
        if is_transposed_linear(layer):
            layer = _linear_from_transposed(layer)
        d_out, d_in = _plane(layer)
        label = name or type(model).__name__
        if name in joint:
            mask = joint[name]
        elif config.masks.startswith("weights"):
            validate_compression(d_out, d_in, c, label)
            mask = mask_from_weight(
                _plane_magnitude(layer.weight), c, input_moment=moments.get(name), seed=layer_seed(config.seed, name)
            )
        else:
            mask = make_mask(d_out, d_in, c, seed=layer_seed(config.seed, name), permute=config.permute, name=label)
        planned[id(original)] = layer, mask
        if report is not None:
            report({"mask": name, "index": len(planned), "masks": len(factors)})
    if config.shared_streams:
        convs = {name: planned[id(candidates[name])][1] for name in factors if type(candidates[name]) in MASKED_CONVS}
        for name, mask in shared_stream_masks(model, convs, config.seed, config.permute).items():
            planned[id(candidates[name])] = candidates[name], mask
    return planned


def conv_skip_reason(conv: nn.Module, compression: int) -> str | None:
    """Why ``mpdify_(..., convs=True)`` leaves this convolution dense, or None to compress it."""
    if conv.groups > 1:
        if conv.groups == conv.in_channels:
            return "depthwise convolution: each output reads one channel, nothing to compress"
        return f"grouped convolution (groups={conv.groups}): name it or filter it out to decide"
    if conv.in_channels <= 4:
        return f"reads {conv.in_channels} input channels (the image): too few to split into blocks"
    if min(conv.in_channels, conv.out_channels) < compression:
        return f"{conv.in_channels}->{conv.out_channels} channels: fewer than c={compression}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: packed convolutions pad with zeros"
    return None


def _plane(layer: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of the matrix a layer's mask lives on."""
    if type(layer) in MASKED_CONVS:
        return layer.out_channels, layer.in_channels
    return layer.out_features, layer.in_features


def _plane_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D weight whose squares are a channel pair's squared mass over every kernel position."""
    return weight if weight.dim() == 2 else weight.detach().flatten(2).square().sum(2).sqrt()


def mpdify(
    model: nn.Module,
    compression: int | Mapping[str, int],
    *,
    filter: Callable[[str, nn.Linear], bool] | None = None,
    seed: int = 0,
    permute: bool = True,
    mode: str = "masked",
    init: str = "dense",
) -> nn.Module:
    """Deprecated name of :func:`mpdify_` (which it calls); ``filter(name, module)`` takes its
    arguments in the other order than ``filter_fn``. Note that ``init`` now defaults to
    ``"dense"`` here too: pass ``init="block"`` to train from scratch as before."""
    warnings.warn(
        "mpdify() is deprecated and will be removed in mpdcompress 0.3; use mpdify_(model, config, "
        "filter_fn=...), which works in place like mpdify and takes filter_fn(module, name) as torchao does",
        DeprecationWarning,
        stacklevel=2,
    )
    filter_fn = None if filter is None else (lambda module, name: filter(name, module))
    return mpdify_(model, MPDConfig(compression, seed=seed, permute=permute, mode=mode, init=init), filter_fn=filter_fn)


def _refuse_save_pretrained(reason: str, *args: Any, **kwargs: Any) -> None:
    raise CompressionError(
        f"save_pretrained cannot save this compressed model: {reason}; save it with "
        "mpdcompress.files.hf.save_compressed(model, folder) and read it back with load_compressed"
    )


def _guard_save_pretrained(model: nn.Module, reason: str) -> None:
    """Make a transformers model's ``save_pretrained`` refuse, naming ``save_compressed``, where
    the folder it writes would come back as another model (a module-level partial, so the model
    still deep-copies and pickles)."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = functools.partial(_refuse_save_pretrained, reason)


def _refuse_unsafe_layers(model: nn.Module, selected: dict[str, nn.Linear]) -> None:
    """Refuse, before changing anything, every selected layer whose mask would not be applied
    everywhere its weight is read, so compressing it would silently give a wrong model."""
    owners: dict[int, dict[int, str]] = {}  # parameter -> {owning module: a name it has there}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), {}).setdefault(id(module), f"{name}.{pname}" if name else pname)
    for name, linear in selected.items():
        label = name or type(model).__name__
        hint = "; leave it out with filter_fn"
        if parametrize.is_parametrized(linear):
            raise CompressionError(f"layer {label!r} has a parametrized weight (weight_norm, ...)" + hint)
        if type(linear) in MASKED_CONVS:
            if linear.groups > 1:
                raise CompressionError(
                    f"layer {label!r} is a grouped convolution (groups={linear.groups}): mpdcompress compresses "
                    "ungrouped convolutions only" + hint
                )
            if linear.padding_mode != "zeros":
                raise CompressionError(
                    f"layer {label!r} pads with padding_mode={linear.padding_mode!r}: packed convolutions pad "
                    "with zeros only" + hint
                )
        elif type(linear) is not nn.Linear and not is_transposed_linear(linear):
            raise CompressionError(
                f"layer {label!r} is a {type(linear).__module__}.{type(linear).__name__}, not a plain nn.Linear: "
                "its own forward, or its parent module (nn.MultiheadAttention reads out_proj.weight directly), "
                "would bypass the mask" + hint
            )
        # The same module used at several places is fine (one mask for every use); another module
        # holding the same tensor is a tie the mask would break.
        tied = sorted(other for owner, other in owners.get(id(linear.weight), {}).items() if owner != id(linear))
        if tied:
            raise CompressionError(
                f"layer {label!r} shares its weight with {', '.join(tied)} (tied weights): masking it would zero "
                "entries of the other use too" + hint
            )


def _joint_weight_masks(
    model: nn.Module,
    linears: dict[str, nn.Module],
    factors: dict[str, int],
    seed: int,
    moments: dict[str, torch.Tensor],
) -> dict[str, MPDMask]:
    """Weight-chosen masks of the selected layers that feed each other through element-wise
    modules (an MLP's up/gate and down projections; consecutive layers of a Sequential), chosen
    together so that the hidden units between them are grouped once (mask_search.masks_for_layers)."""
    pairs = [*mlp_pairs(factors), *_sequential_pairs(model, factors)]
    pairs = [(a, b) for a, b in pairs if factors[a] == factors[b] and linears[a] is not linears[b]]
    # Layers joined directly or through others are searched together.
    group = {name: {name} for name in factors}
    for a, b in pairs:
        if group[a] is not group[b]:
            merged = group[a] | group[b]
            for name in merged:
                group[name] = merged
    masks: dict[str, MPDMask] = {}
    for members in {id(g): g for g in group.values() if len(g) > 1}.values():
        names = sorted(members)
        weights = {n: linears[n].weight.t() if is_transposed_linear(linears[n]) else linears[n].weight for n in names}
        joined = [(a, b) for a, b in pairs if a in members]
        masks.update(
            masks_for_layers(
                weights,
                joined,
                factors[names[0]],
                input_moments={n: moments[n] for n in names if n in moments},
                seed=layer_seed(seed, names[0]),
            )
        )
    return masks


def _sequential_pairs(model: nn.Module, selected: Mapping[str, int]) -> list[tuple[str, str]]:
    """``(producer, consumer)`` layers of ``selected`` that follow each other in an ``nn.Sequential``
    with only element-wise modules between them."""
    pairs = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        previous = None
        for key, child in seq.named_children():
            name = f"{prefix}.{key}" if prefix else key
            if name in selected:
                if previous is not None:
                    pairs.append((previous, name))
                previous = name
            elif not is_elementwise(child):
                previous = None
    return pairs


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is ``transformers``' ``Conv1D`` (GPT-2's linear layer, weight stored
    ``d_in x d_out``), recognised without importing ``transformers``."""
    return (
        type(module).__name__ == "Conv1D"
        and type(module).__module__.startswith("transformers")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and tuple(module.weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
    )


def _linear_from_transposed(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes what a ``Conv1D`` computes. Its weight is a new parameter
    (the transpose of the old one), so an optimizer must be built after compression; the bias
    parameter is kept."""
    linear = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device="meta")
    with torch.no_grad():
        weight = conv.weight.detach().t().contiguous()
    linear.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    linear.bias = conv.bias
    return linear


@torch.no_grad()
def _block_fan_in_(layer: MaskedWeight) -> None:
    """Rescale weights and bias as if the layer had been built with the block width as fan-in."""
    mask = layer.mpd_mask
    layout = mask.layout
    widths = torch.tensor(layout.col_sizes, dtype=torch.float64)[mask.row_groups()]
    scale = (layout.d_in / widths).sqrt().to(layer.weight.dtype).to(layer.weight.device)
    layer.weight.mul_(scale.view(-1, *[1] * (layer.weight.dim() - 1)))
    if layer.bias is not None:
        layer.bias.mul_(scale)


def pack(model: nn.Module, *, inplace: bool = False, fold_dense: bool = True) -> nn.Module:
    """Turn every :class:`MPDLinear` into packed block-diagonal form.

    Inside each ``nn.Sequential``, runs ``MPDLinear → element-wise modules → MPDLinear ...``
    become one :class:`PackedChain` (one gather between consecutive layers) under the key of the
    run's first module, so the Sequential gets shorter while every other module keeps its key;
    other ``MPDLinear`` layers become :class:`BlockDiagonalLinear`. With ``fold_dense`` (the
    default), a plain ``nn.Linear`` just before or after such a run (element-wise modules between
    allowed) joins it, its weight reordered so that the run's input or output permutation costs
    nothing at run time. With ``fold_dense``, residual streams whose compressed convolutions
    share one channel order (``MPDConfig(shared_streams=True)``) are first stored in that order
    (:func:`~mpdcompress.core.streams.relabel_streams_`), so their gathers vanish; :func:`unpack`
    of such a model gives the masked model with those channels renamed (the same function).
    The result computes the same function as the masked model. Unless ``inplace``, ``model`` is
    untouched.
    """
    masked = [m for m in model.modules() if isinstance(m, MaskedWeight)]
    if not masked:
        raise CompressionError("nothing to pack: the model has no MPDLinear or MPDConv layer (mpdify_ it first)")
    if any(m.weight.device.type == "meta" for m in masked):
        raise CompressionError("cannot pack a model on the meta device: its weights have no values yet")
    for layer in masked:  # every mask is checked before the first layer is packed
        layer.mpd_mask
    if not inplace:
        model = _copy_except(model, MaskedWeight)
    with torch.no_grad():
        if fold_dense:
            relabel_streams_(model)
        shared = shared_modules(model)
        for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
            _fuse_conv_sequential(seq, fold_dense, shared)
            _fuse_sequential(seq, fold_dense, shared)
        packed = _replace_modules(model, _pack_one)
    _guard_save_pretrained(
        packed, "its packed layers are not transformers layers: from_pretrained would initialize them at random"
    )
    return guard_state_dict_loading(packed)


def _pack_one(module: nn.Module) -> nn.Module | None:
    if isinstance(module, MPDLinear):
        return BlockDiagonalLinear.from_masked(module)
    if isinstance(module, MaskedWeight):
        return BlockDiagonalConv.from_masked(module)
    return None


def unpack(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Inverse of :func:`pack`: packed layers back to :class:`MPDLinear` (masked dense form)."""
    if not any(isinstance(m, _PACKED) for m in model.modules()):
        raise CompressionError("nothing to unpack: the model has no packed layer")
    for layer in model.modules():  # every mask is checked before the first layer is unpacked
        if isinstance(layer, (BlockDiagonalLinear, BlockDiagonalConv)):
            layer.mpd_mask
    if not inplace:
        model = _copy_except(model, _PACKED)
    with torch.no_grad():
        for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
            items: list[tuple[str, nn.Module]] = []
            for key, child in seq._modules.items():
                chain = isinstance(child, (PackedChain, PackedConvChain))
                items.extend(child.unfused() if chain else [(key, child)])
            _reset_sequential(seq, items)

        def _unpack_one(module: nn.Module) -> nn.Module | None:
            if isinstance(module, (PackedChain, PackedConvChain)):
                return nn.Sequential(OrderedDict(module.unfused()))
            if isinstance(module, (BlockDiagonalLinear, BlockDiagonalConv)):
                return module.to_masked()
            return None

        unpacked = _replace_modules(model, _unpack_one)
    return guard_state_dict_loading(unpacked)


def _copy_except(model: nn.Module, kinds: type | tuple[type, ...]) -> nn.Module:
    """Deep-copy ``model`` but share the modules of ``kinds``: they are replaced, never modified,
    so copying their (large) weights would only double peak memory."""
    memo = {id(m): m for m in model.modules() if isinstance(m, kinds) and m is not model}
    return copy.deepcopy(model, memo)


def apply_masks_(model: nn.Module) -> None:
    """Re-zero the off-mask weights of every masked layer (for optimizers that move them)."""
    for module in model.modules():
        if isinstance(module, MaskedWeight):
            module.apply_mask_()


def compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name → compressed module (masked, packed or chain) for every one in ``model``."""
    kinds = (MaskedWeight, *_PACKED)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds) and not any(name.startswith(p + ".") for p in found):
            found[name] = module
    return found


def packed_layer_sources(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Qualified name → ``(packed or masked layer, its name in the masked model)`` for every
    compressed layer, those inside chains included (``unpack`` puts each back at that name)."""
    layers = {}
    for name, module in compressed_layers(model).items():
        if isinstance(module, (PackedChain, PackedConvChain)):
            parent = name.rsplit(".", 1)[0] + "." if "." in name else ""
            for i, (layer, key) in enumerate(zip(module.layers, module.layer_source_keys())):
                layers[f"{name}.layers.{i}"] = layer, parent + key
        else:
            layers[name] = module, name
    return layers


def _is_plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def _skip_elementwise(items: list[tuple[str, nn.Module]], k: int, step: int) -> int:
    while 0 <= k < len(items) and is_elementwise(items[k][1]):
        k += step
    return k


def _gap(modules: list[nn.Module]) -> nn.Module | None:
    # An empty gap becomes an empty Sequential, which is the identity.
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


def _fuse_sequential(seq: nn.Sequential, fold_dense: bool, shared: set[int]) -> None:
    """``shared``: ids of modules referenced from more than one place; fusing one of them would
    give each place its own copy and untie it, so they stay standalone (and shared) layers."""
    items = list(seq._modules.items())

    def masked(module: nn.Module) -> bool:
        return isinstance(module, MPDLinear) and id(module) not in shared

    def dense(module: nn.Module) -> bool:
        return _is_plain_linear(module) and id(module) not in shared

    out: list[tuple[str, nn.Module]] = []
    i = 0
    while i < len(items):
        if not masked(items[i][1]):
            out.append(items[i])
            i += 1
            continue
        layers, acts = [items[i][1]], []
        j = i + 1
        while True:
            k = _skip_elementwise(items, j, 1)
            if k >= len(items) or not masked(items[k][1]):
                break
            acts.append(_gap([m for _, m in items[j:k]]))
            layers.append(items[k][1])
            j = k + 1
        start, stop = i, j
        head = tail = head_gap = tail_gap = None
        if fold_dense:
            h = _skip_elementwise(items, i - 1, -1)
            # The dense layer before the run (and the gap after it) must still be the last modules
            # emitted, not folded into the previous run as its tail.
            emitted = out[len(out) - (i - h) :] if 0 <= h and len(out) >= i - h else []
            if emitted and dense(items[h][1]) and all(a[1] is b[1] for a, b in zip(emitted, items[h:i])):
                head, start = items[h][1], h
                gap = [m for _, m in items[h + 1 : i]]
                head_gap = _gap(gap) if gap else None
                out = out[: len(out) - (i - h)]
            t = _skip_elementwise(items, j, 1)
            if t < len(items) and dense(items[t][1]):
                tail, stop = items[t][1], t + 1
                gap = [m for _, m in items[j:t]]
                tail_gap = _gap(gap) if gap else None
        if len(layers) == 1 and head is None and tail is None:
            out.append(items[i])
        else:
            packed = [BlockDiagonalLinear.from_masked(m) for m in layers]
            chain = PackedChain(
                packed,
                acts,
                source_keys=[key for key, _ in items[start:stop]],
                head=None if head is None else PackedChain.fold_head(head, packed[0]),
                head_gap=head_gap,
                tail_gap=tail_gap,
                tail=None if tail is None else PackedChain.fold_tail(tail, packed[-1]),
            )
            out.append((items[start][0], chain))
        i = stop
    _reset_sequential(seq, out)


def _skip_channelwise(items: list[tuple[str, nn.Module]], k: int, step: int) -> int:
    while 0 <= k < len(items) and is_channelwise(items[k][1]):
        k += step
    return k


def _fuse_conv_sequential(seq: nn.Sequential, fold_dense: bool, shared: set[int]) -> None:
    """Runs ``masked conv → channel-wise modules → masked conv ...`` of ``seq`` (with a dense
    convolution right before or after, when ``fold_dense``) become one :class:`PackedConvChain`
    under the key of the run's first module; ``shared`` modules stay standalone, as in
    :func:`_fuse_sequential`."""
    items = list(seq._modules.items())

    def masked(module: nn.Module, dims: int | None = None) -> bool:
        return (
            isinstance(module, MaskedWeight)
            and not isinstance(module, MPDLinear)
            and id(module) not in shared
            and module.padding_mode == "zeros"
            and dims in (None, module.weight.dim() - 2)
        )

    def dense(module: nn.Module, dims: int) -> bool:
        return (
            type(module) in DENSE_CONVS
            and id(module) not in shared
            and module.groups == 1
            and module.weight.dim() - 2 == dims
        )

    out: list[tuple[str, nn.Module]] = []
    i = 0
    while i < len(items):
        if not masked(items[i][1]):
            out.append(items[i])
            i += 1
            continue
        dims = items[i][1].weight.dim() - 2
        layers, gaps, j = [items[i][1]], [], i + 1
        while (k := _skip_channelwise(items, j, 1)) < len(items) and masked(items[k][1], dims):
            gaps.append([m for _, m in items[j:k]])
            layers.append(items[k][1])
            j = k + 1
        start, stop = i, j
        packed = [BlockDiagonalConv.from_masked(m) for m in layers]
        parts: dict[str, nn.Module | None] = {}
        if fold_dense:
            h = _skip_channelwise(items, i - 1, -1)
            # The dense convolution before the run (and its gap) must still be the last modules
            # emitted, not folded into the previous run as its tail.
            emitted = out[len(out) - (i - h) :] if 0 <= h and len(out) >= i - h else []
            if emitted and dense(items[h][1], dims) and all(a[1] is b[1] for a, b in zip(emitted, items[h:i])):
                head, head_gap = PackedConvChain.fold_head(items[h][1], [m for _, m in items[h + 1 : i]], packed[0])
                parts.update(head=head, head_gap=nn.Sequential(*head_gap) if head_gap else None)
                start, out = h, out[: len(out) - (i - h)]
            # The channel-wise modules after the run join it (the last gather then moves pooled,
            # smaller activations), and so does a dense convolution after them.
            t = _skip_channelwise(items, j, 1)
            order = PackedConvChain.block_order(packed[-1])
            tail_gap = [reordered(m, order) for _, m in items[j:t]]
            parts.update(tail_gap=nn.Sequential(*tail_gap) if tail_gap else None)
            stop = t
            if t < len(items) and dense(items[t][1], dims):
                parts.update(tail=PackedConvChain.fold_tail(items[t][1], packed[-1]))
                stop = t + 1
        if len(layers) == 1 and not any(parts.values()):
            out.append(items[i])
            i += 1
            continue
        gap_modules = [
            nn.Sequential(*[reordered(m, PackedConvChain.block_order(layer)) for m in gap])
            for layer, gap in zip(packed, gaps)
        ]
        chain = PackedConvChain(packed, gap_modules, source_keys=[key for key, _ in items[start:stop]], **parts)
        out.append((items[start][0], chain))
        i = stop
    _reset_sequential(seq, out)


def _reset_sequential(seq: nn.Sequential, items: list[tuple[str, nn.Module]]) -> None:
    for key in list(seq._modules):
        del seq._modules[key]
    for key, item in items:
        seq.add_module(key, item)


def _replace_modules(model: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Swap every module for which ``make`` returns a replacement, every place it is referenced."""
    root = make(model)
    if root is not None:
        return root
    cache: dict[int, nn.Module | None] = {}
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in cache:
                cache[id(child)] = make(child)
            if cache[id(child)] is not None:
                parent._modules[key] = cache[id(child)]
    return model
