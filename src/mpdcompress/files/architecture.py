"""Describe a module tree as JSON and rebuild it, without pickle or importing arbitrary code.

Only container types and a fixed list of ``torch.nn`` layers (plus this package's own) are
supported; their constructor arguments are read back from the attributes of the same name,
which is how ``torch.nn`` layers store them. Anything else makes :func:`describe` raise
:class:`UnsupportedArchitectureError`, and the user passes their own model skeleton to ``load``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from ..core.layout import BlockLayout
from ..core.masks import MPDMask
from ..errors import ModelFileError, UnsupportedArchitectureError
from ..nn.conv_chain import PackedConvChain
from ..nn.masked import MPDConv1d, MPDConv2d, MPDLinear
from ..nn.packed import BlockDiagonalLinear, PackedChain
from ..nn.packed_conv import BlockDiagonalConv
from ..nn.quantized import QuantizedBlockDiagonalConv, QuantizedBlockDiagonalLinear, zero_quantized_weight
from ..nn.residual import Residual
from .layer_arguments import SUPPORTED_LAYERS, check_layer_args
from .layer_kinds import CONV_DIMS, LAYER_KINDS, QUANTIZED_KINDS, quantization_entry, quantization_problem

__all__ = [
    "describe",
    "build",
    "fold",
    "UnsupportedArchitectureError",
    "SUPPORTED_LAYERS",
    "CONTAINERS",
    "tuple_args",
    "construct_layer",
    "compressed_layer_sizes",
]

_MASKED_CONVS = {"MPDConv1d": MPDConv1d, "MPDConv2d": MPDConv2d}
# What a packed convolution records besides its sizes (its padding mode is always zeros).
_PACKED_CONV_ARGS = ("kernel_size", "stride", "padding", "dilation")

CONTAINERS = {"Sequential": nn.Sequential, "ModuleList": nn.ModuleList, "Residual": Residual}
# Constructor arguments that are not stored under their own name, or are not JSON values.
_SKIP_ARGS = {"device", "dtype", "self", "args", "kwargs", "_weight", "_freeze", "init"}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    raise TypeError(f"not a JSON value: {value!r}")


def _layer_args(module: nn.Module, kind: type[nn.Module] | None = None) -> dict[str, Any]:
    """The constructor arguments of ``kind`` (default: the module's own type) read from ``module``."""
    args = {}
    for name in inspect.signature((kind or type(module)).__init__).parameters:
        if name in _SKIP_ARGS or not hasattr(module, name):
            continue
        value = getattr(module, name)
        if name in ("bias", "affine", "elementwise_affine") and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        try:
            args[name] = _jsonable(value)
        except TypeError as exc:
            raise UnsupportedArchitectureError(f"{type(module).__name__}.{name}: {exc}") from None
    return args


# Optional parts of a PackedChain: folded dense neighbours and the element-wise modules beside them.
CHAIN_PARTS = ("head", "head_gap", "tail_gap", "tail")

T = TypeVar("T")


def _place(parent: str, key: str) -> str:
    return f"{parent}.{key}".strip(".")


# What sits between a chain's layers: PackedChain's element-wise activations, PackedConvChain's
# channel-wise gaps.
CHAINS: dict[str, tuple[type[nn.Module], str]] = {
    "PackedChain": (PackedChain, "activations"),
    "PackedConvChain": (PackedConvChain, "gaps"),
}


def _chain_children(
    layers: list[T], between: list[T], parts: dict[str, T | None], between_name: str = "activations"
) -> list[tuple[str, T]]:
    """A chain's children under the names its state dict gives them."""
    return (
        [(f"layers.{i}", layer) for i, layer in enumerate(layers)]
        + [(f"{between_name}.{i}", act) for i, act in enumerate(between)]
        + [(part, parts[part]) for part in CHAIN_PARTS if parts.get(part) is not None]
    )


def _chain_of(children: dict[str, T], between_name: str = "activations") -> tuple[list[T], list[T], dict[str, T]]:
    """The inverse of :func:`_chain_children`: layers, what is between them, and parts by name."""
    layers = [children[f"layers.{i}"] for i in range(sum(k.startswith("layers.") for k in children))]
    n = sum(k.startswith(f"{between_name}.") for k in children)
    between = [children[f"{between_name}.{i}"] for i in range(n)]
    return layers, between, {part: children[part] for part in CHAIN_PARTS if part in children}


def describe(module: nn.Module, name: str = "", _seen: dict[int, str] | None = None) -> dict[str, Any]:
    """JSON description of ``module``'s tree (types and constructor arguments, no tensors). A
    module met again at another place (a shared layer) is described as ``{"type": "Shared",
    "of": <its first place>}``, so the rebuilt tree shares it too."""
    seen = {} if _seen is None else _seen
    if id(module) in seen:
        return {"type": "Shared", "of": seen[id(module)]}
    seen[id(module)] = name
    kind = type(module).__name__

    def described(children: list[tuple[str, nn.Module]]) -> dict[str, Any]:
        return {key: describe(sub, _place(name, key), seen) for key, sub in children}

    if type(module) in CONTAINERS.values():
        return {"type": kind, "children": [list(kv) for kv in described(list(module._modules.items())).items()]}
    if isinstance(module, (PackedChain, PackedConvChain)):
        between_name = CHAINS[kind][1]
        parts = {part: getattr(module, part) for part in CHAIN_PARTS}
        children = _chain_children(module.layers, getattr(module, between_name), parts, between_name)
        layers, between, parts = _chain_of(described(children), between_name)
        return {
            "type": kind,
            "layers": layers,
            between_name: between,
            "source_keys": list(module.source_keys),
            **parts,
        }
    quantization = {} if (q := quantization_entry(module)) is None else {"quantization": q}
    if isinstance(module, (BlockDiagonalLinear, MPDLinear)):
        return {
            "type": kind,
            "args": {
                "d_out": module.out_features,
                "d_in": module.in_features,
                "compression": module.compression,
                "bias": module.bias is not None,
                **quantization,
            },
        }
    if isinstance(module, (MPDConv1d, MPDConv2d)):
        base = nn.Conv1d if isinstance(module, MPDConv1d) else nn.Conv2d
        args = {k: v for k, v in _layer_args(module, base).items() if k != "groups"}  # always 1
        return {"type": kind, "args": {**args, "compression": module.compression}}
    if isinstance(module, BlockDiagonalConv):
        sizes = {"d_out": module.out_channels, "d_in": module.in_channels, "compression": module.compression}
        conv = {name: _jsonable(getattr(module, name)) for name in _PACKED_CONV_ARGS}
        return {"type": kind, "args": {**sizes, "bias": module.bias is not None, **conv, **quantization}}
    if type(module) in SUPPORTED_LAYERS.values():
        return {"type": kind, "args": _layer_args(module)}
    raise UnsupportedArchitectureError(
        f"module {name or '<root>'} has type {type(module).__module__}.{kind}, which mpdcompress cannot "
        "rebuild from a file by itself; pass your model to load(path, model=...)"
    )


def _child_specs(spec: dict[str, Any], fail: Callable[[str], Exception]) -> list[tuple[str, Any]] | None:
    """The children of a container or chain entry under their state-dict names; None for a layer."""
    kind = spec["type"]
    if kind in CONTAINERS:
        children = spec.get("children", [])
        if not isinstance(children, list) or not all(isinstance(c, list) and len(c) == 2 for c in children):
            raise fail(f"architecture {kind} has malformed children")
        return [(str(key), sub) for key, sub in children]
    if kind in CHAINS:
        between_name = CHAINS[kind][1]
        lists = spec.get("layers") or [], spec.get(between_name) or []
        if not all(isinstance(x, list) for x in lists):
            raise fail(f"architecture {kind} has malformed layers or {between_name}")
        keys = spec.get("source_keys")
        if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise fail(f"architecture {kind} has malformed source_keys (a list of strings)")
        return _chain_children(*lists, {part: spec.get(part) for part in CHAIN_PARTS}, between_name)
    return None


def fold(
    spec: Any,
    layer: Callable[[dict[str, Any]], T],
    node: Callable[[dict[str, Any], dict[str, T]], T],
    fail: Callable[[str], Exception] = ModelFileError,
    _place_name: str = "",
    _done: dict[str, T] | None = None,
) -> T:
    """Read an architecture entry from its leaves up: ``layer(spec)`` for each layer,
    ``node(spec, children)`` for a container or chain, given its children's results by name.
    A ``Shared`` entry gives the result of the place it names, which must come before it (a
    later place or an ancestor would be a cycle). Malformed entries raise ``fail(message)``."""
    done = {} if _done is None else _done
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise fail(f"architecture entry is not an object with a 'type': {json.dumps(spec, default=str)[:120]}")
    if spec["type"] == "Shared":
        if spec.get("of") not in done:
            raise fail(f"architecture entry {_place_name!r} shares a module that comes nowhere before it")
        return done[spec["of"]]
    children = _child_specs(spec, fail)
    if children is None:
        result = layer(spec)
    else:
        results = {key: fold(sub, layer, node, fail, _place(_place_name, key), done) for key, sub in children}
        result = node(spec, results)
    done[_place_name] = result
    return result


def tuple_args(args: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments with JSON lists turned back into tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def build(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a module tree from :func:`describe`'s output with placeholder weights and masks.

    The caller loads the real tensors (and masks) afterwards; identity permutations stand in.
    """
    return fold(spec, _build_layer, _build_node)


def _build_node(spec: dict[str, Any], children: dict[str, nn.Module]) -> nn.Module:
    if spec["type"] in CHAINS:
        chain, between_name = CHAINS[spec["type"]]
        layers, between, parts = _chain_of(children, between_name)
        return chain(layers, between, source_keys=spec.get("source_keys"), **parts)
    container = CONTAINERS[spec["type"]]()
    for key, child in children.items():
        container.add_module(key, child)
    return container


def compressed_layer_sizes(
    kind: str, args: Any, fail: Callable[[str], Exception] = ModelFileError
) -> tuple[int, int, int, bool, list[int] | None, dict[str, Any] | None]:
    """``(d_out, d_in, compression, bias, kernel_size or None, quantization or None)`` of a
    compressed layer's architecture entry, every argument checked (a convolution's against the
    allow-list of the ``nn.Conv1d``/``nn.Conv2d`` it packs) before anything is built."""
    if not isinstance(args, dict):
        raise fail(f"architecture {kind} has malformed args")
    quantization = args.get("quantization")
    problem = quantization_problem(kind, quantization)
    if problem is not None:
        raise fail(problem)
    args = {k: v for k, v in args.items() if k != "quantization"}
    kind = QUANTIZED_KINDS.get(kind, kind)  # sized as the float kind it quantizes
    compression = args.get("compression")
    if kind in _MASKED_CONVS:
        conv_args = {k: v for k, v in args.items() if k != "compression"}
        base, dims = f"Conv{CONV_DIMS[kind][0]}d", CONV_DIMS[kind][0]
        d_out, d_in, bias = args.get("out_channels"), args.get("in_channels"), args.get("bias", True)
    elif kind == "BlockDiagonalConv":
        kernel = args.get("kernel_size")
        dims = len(kernel) if isinstance(kernel, list) and len(kernel) in CONV_DIMS[kind] else 2
        base, d_out, d_in, bias = f"Conv{dims}d", args.get("d_out"), args.get("d_in"), args.get("bias")
        conv_args = {"in_channels": d_in, "out_channels": d_out, "bias": bias}
        conv_args.update({k: v for k, v in args.items() if k in _PACKED_CONV_ARGS})
        if set(args) - {"d_out", "d_in", "compression", "bias", *_PACKED_CONV_ARGS}:
            raise fail(f"architecture {kind} has unknown args {sorted(set(args))}")
    else:
        base, dims, conv_args = None, 0, {}
        d_out, d_in, bias = args.get("d_out"), args.get("d_in"), args.get("bias")
    problem = check_layer_args(base, conv_args) if base else None
    if problem is not None:
        raise fail(problem)
    ints = (d_out, d_in, compression)
    if not (all(type(v) is int and 0 < v < 2**40 for v in ints) and type(bias) is bool):
        raise fail(f"architecture {kind} has malformed args {json.dumps(args)[:120]}")
    if compression > min(d_out, d_in):
        raise fail(f"architecture {kind}: compression {compression} exceeds its dimensions")
    if not base:
        return d_out, d_in, compression, bias, None, quantization
    if "kernel_size" not in conv_args:
        raise fail(f"architecture {kind} has no kernel_size")
    kernel = conv_args["kernel_size"]
    return d_out, d_in, compression, bias, list(kernel) if isinstance(kernel, list) else [kernel] * dims, quantization


def _build_layer(spec: dict[str, Any]) -> nn.Module:
    kind = spec["type"]
    if kind not in LAYER_KINDS:
        return construct_layer(kind, spec.get("args", {}))
    a = spec["args"]
    d_out, d_in, c, bias, kernel, quantization = compressed_layer_sizes(kind, a)
    layout = BlockLayout.create(d_out, d_in, c)
    mask = MPDMask(layout, torch.arange(layout.d_out), torch.arange(layout.d_in))
    if kind == "MPDLinear":
        return MPDLinear(d_in, d_out, bias, mask=mask)
    if kind in _MASKED_CONVS:
        conv_args = {k: v for k, v in tuple_args(a).items() if k != "compression"}
        return _MASKED_CONVS[kind](**conv_args, mask=mask)
    bias_tensor = torch.zeros(layout.compression * layout.max_rows) if bias else None
    if kind in ("BlockDiagonalLinear", "QuantizedBlockDiagonalLinear"):
        blocks = torch.zeros(c, layout.max_rows, layout.max_cols)
    else:
        blocks = torch.zeros(c * layout.max_rows, layout.max_cols, *kernel)
    weight = blocks if quantization is None else zero_quantized_weight(blocks, c, layout.max_rows, quantization)
    if kind == "BlockDiagonalLinear":
        return BlockDiagonalLinear(mask, weight, bias_tensor)
    if kind == "QuantizedBlockDiagonalLinear":
        return QuantizedBlockDiagonalLinear(mask, weight, bias_tensor, activations=quantization["activations"])
    conv_args = {k: v for k, v in tuple_args(a).items() if k in ("stride", "padding", "dilation")}
    conv = QuantizedBlockDiagonalConv if quantization is not None else BlockDiagonalConv
    return conv(mask, weight, bias_tensor, **conv_args)


def construct_layer(kind: str, args: Any, fail: Callable[[str], Exception] = ModelFileError) -> nn.Module:
    """The ``torch.nn`` layer a file's entry names, its arguments checked against the allow-list
    before the constructor sees them; on the current default device (the size check's is meta)."""
    problem = check_layer_args(kind, args)
    if problem is not None:
        raise fail(problem)
    try:
        return SUPPORTED_LAYERS[kind](**tuple_args(args))
    except Exception as exc:  # whatever else the constructor rejects (TypeError, ValueError, AssertionError)
        raise fail(f"cannot build {kind} from {json.dumps(args)[:120]}: {type(exc).__name__}: {exc}") from None
