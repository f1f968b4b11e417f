"""Describe a module tree as JSON and rebuild it, without pickle or importing arbitrary code.

Only container types and a fixed list of ``torch.nn`` layers (plus this package's own) are
supported; their constructor arguments are read back from the attributes of the same name,
which is how ``torch.nn`` layers store them. Anything else makes :func:`describe` raise
:class:`UnsupportedArchitectureError`, and the user passes their own model skeleton to ``load``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .errors import ModelFileError, UnsupportedArchitectureError
from .layout import BlockLayout
from .masks import MPDMask
from .nn.masked import MPDLinear
from .nn.packed import ELEMENTWISE_MODULES, BlockDiagonalLinear, PackedChain

__all__ = [
    "describe",
    "build",
    "UnsupportedArchitectureError",
    "SUPPORTED_LAYERS",
    "CONTAINERS",
    "CHAIN_PARTS",
    "tuple_args",
]

SUPPORTED_LAYERS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        nn.Embedding,
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
        nn.Flatten,
        nn.Unflatten,
        *ELEMENTWISE_MODULES,  # every module that may sit inside a fused chain
        nn.PReLU,
        nn.Softmax,
        nn.LogSoftmax,
        nn.Dropout2d,
    )
}
CONTAINERS = {"Sequential": nn.Sequential, "ModuleList": nn.ModuleList}
# Constructor arguments that are not stored under their own name, or are not JSON values.
_SKIP_ARGS = {"device", "dtype", "self", "args", "kwargs", "_weight", "_freeze", "init"}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    raise TypeError(f"not a JSON value: {value!r}")


def _layer_args(module: nn.Module) -> dict[str, Any]:
    args = {}
    for name in inspect.signature(type(module).__init__).parameters:
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


def describe(module: nn.Module, name: str = "", _seen: dict[int, str] | None = None) -> dict[str, Any]:
    """JSON description of ``module``'s tree (types and constructor arguments, no tensors). A
    module met again at another place (a shared layer) is described as ``{"type": "Shared",
    "of": <its first place>}``, so the rebuilt tree shares it too."""
    seen = {} if _seen is None else _seen
    if id(module) in seen:
        return {"type": "Shared", "of": seen[id(module)]}
    seen[id(module)] = name
    kind = type(module).__name__

    def child(sub: nn.Module, key: str) -> dict[str, Any]:
        return describe(sub, f"{name}.{key}".strip("."), seen)

    if type(module) in CONTAINERS.values():
        return {"type": kind, "children": [[key, child(sub, key)] for key, sub in module._modules.items()]}
    if isinstance(module, PackedChain):
        spec = {
            "type": "PackedChain",
            "layers": [child(layer, f"layers.{i}") for i, layer in enumerate(module.layers)],
            "activations": [child(act, f"activations.{i}") for i, act in enumerate(module.activations)],
            "source_keys": list(module.source_keys),
        }
        for part in CHAIN_PARTS:
            if getattr(module, part) is not None:
                spec[part] = child(getattr(module, part), part)
        return spec
    if isinstance(module, (BlockDiagonalLinear, MPDLinear)):
        return {
            "type": kind,
            "args": {
                "d_out": module.out_features,
                "d_in": module.in_features,
                "compression": module.compression,
                "bias": module.bias is not None,
            },
        }
    if type(module) in SUPPORTED_LAYERS.values():
        return {"type": kind, "args": _layer_args(module)}
    raise UnsupportedArchitectureError(
        f"module {name or '<root>'} has type {type(module).__module__}.{kind}, which mpdcompress cannot "
        "rebuild from a file by itself; pass your model to load(path, model=...)"
    )


def tuple_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def build(spec: dict[str, Any], _place: str = "", _built: dict[str, nn.Module] | None = None) -> nn.Module:
    """Rebuild a module tree from :func:`describe`'s output with placeholder weights and masks.

    The caller loads the real tensors (and masks) afterwards; identity permutations stand in.
    """
    built = {} if _built is None else _built
    if not isinstance(spec, dict) or "type" not in spec:
        raise ModelFileError(f"architecture entry is not an object with a 'type': {spec!r}"[:200])
    if spec["type"] == "Shared":
        if spec.get("of") not in built:
            raise ModelFileError(f"architecture entry {_place!r} shares a module that comes nowhere before it")
        return built[spec["of"]]
    module = _build_one(spec, _place, built)
    built[_place] = module
    return module


def _build_one(spec: dict[str, Any], place: str, built: dict[str, nn.Module]) -> nn.Module:
    kind = spec["type"]

    def child(sub: Any, key: str) -> nn.Module:
        return build(sub, f"{place}.{key}".strip("."), built)

    if kind in CONTAINERS:
        container = CONTAINERS[kind]()
        for key, sub in spec.get("children", []):
            container.add_module(str(key), child(sub, str(key)))
        return container
    if kind == "PackedChain":
        layers = [child(s, f"layers.{i}") for i, s in enumerate(spec["layers"])]
        activations = [child(s, f"activations.{i}") for i, s in enumerate(spec["activations"])]
        parts = {part: child(spec[part], part) for part in CHAIN_PARTS if spec.get(part) is not None}
        return PackedChain(layers, activations, source_keys=spec.get("source_keys"), **parts)
    if kind in ("BlockDiagonalLinear", "MPDLinear"):
        a = spec["args"]
        layout = BlockLayout.create(a["d_out"], a["d_in"], a["compression"])
        mask = MPDMask(layout, torch.arange(layout.d_out), torch.arange(layout.d_in))
        if kind == "MPDLinear":
            return MPDLinear(a["d_in"], a["d_out"], bool(a["bias"]), mask=mask)
        blocks = torch.zeros(layout.compression, layout.max_rows, layout.max_cols)
        bias = torch.zeros(layout.compression * layout.max_rows) if a["bias"] else None
        return BlockDiagonalLinear(mask, blocks, bias)
    if kind in SUPPORTED_LAYERS:
        try:
            return SUPPORTED_LAYERS[kind](**tuple_args(spec.get("args", {})))
        except TypeError as exc:
            raise ModelFileError(f"cannot build {kind} from {spec.get('args')}: {exc}") from None
    raise ModelFileError(f"architecture names an unsupported module type {kind!r}")
