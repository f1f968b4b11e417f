"""Reading and checking a model file's header before anything is built from it.

A model file is a safetensors file whose header carries the manifest. Everything here reads
only the header (a few kilobytes) and bounds what a later build may allocate by what the file
actually holds:

* the manifest is covered by its own SHA-256 (``manifest_sha256``, over the canonical JSON of
  everything else), and every tensor's digest covers its dtype and shape as well as its bytes,
  so no edit of the header or the data goes unnoticed;
* every field has the type it must have; JSON constants (NaN, Infinity) and deep nesting are
  refused;
* every compressed layer's sizes are checked against the shapes of its tensors in the header,
  and the architecture's declared number of values against the values the file holds, before
  any module or tensor is made.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelFileError, ModelFileNotFoundError
from .layer_arguments import check_layer_args
from .layer_kinds import (
    LAYER_KINDS,
    PACKED_KINDS,
    QUANTIZED_KINDS,
    kernel_problem,
    layer_tensor_shapes,
    quantization_problem,
    stored_values,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "QUANTIZED_VERSION",
    "SEEDED_VERSION",
    "READ_VERSIONS",
    "read_header",
    "parse_manifest",
    "manifest_digest",
    "tensor_digest",
    "check_declared_size",
    "header_shapes",
    "file_shapes",
]

FORMAT_NAME = "mpdcompress"
# 2: the manifest carries its own digest and tensor digests cover dtype and shape.
# 3: quantized layers. Files without them are still written as version 2, so that mpdcompress
# 0.2 reads them.
# 4: masks stored as their seed (``seeded_orders``); written only when asked for.
FORMAT_VERSION = 4
QUANTIZED_VERSION = 3
SEEDED_VERSION = 4
READ_VERSIONS = (2, 3, 4)
_MAX_DIM = 2**40  # no tensor dimension in a real model comes near this


def _fail(path: Path, message: str) -> ModelFileError:
    return ModelFileError(f"{path}: {message}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e905 parses as inf, which no field may hold
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _json(raw: bytes | str, path: Path, what: str) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _fail(path, f"{what} is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the manifest without its own digest."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (a dtype edit in the header changes it too)."""
    h = hashlib.sha256(f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}".encode())
    h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_header(path: Path) -> dict[str, Any]:
    """The safetensors header, parsed by hand so that a damaged file gives a precise error."""
    if not path.is_file():
        raise ModelFileNotFoundError(f"no model file at {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"file is {size} bytes, too short to be a safetensors file")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise _fail(path, f"header length {n} does not fit in the {size}-byte file (truncated?)")
        header = _json(f.read(n), path, "header")
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    data_len, end = size - 8 - n, 0
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _fail(path, "header metadata is not a map of strings")
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise _fail(path, f"tensor {key!r} has no valid data_offsets")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < _MAX_DIM for d in shape)):
            raise _fail(path, f"tensor {key!r} has no valid shape")
        end = max(end, offsets[1])
    if end != data_len:
        raise _fail(path, f"tensor data should be {end} bytes but the file holds {data_len} (truncated or padded)")
    return header


def header_shapes(header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, from a safetensors header."""
    return {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}


def _is_int(value: Any, low: int = 1) -> bool:
    return type(value) is int and low <= value < _MAX_DIM


def _check_optional_fields(manifest: dict[str, Any], path: Path) -> None:
    """The fields only some files have: ties, masks stored as seeds, quantized dense layers."""
    if "ties" in manifest and not (  # absent from files written before ties were recorded
        isinstance(manifest["ties"], dict)
        and all(isinstance(k, str) and isinstance(v, str) and k != v for k, v in manifest["ties"].items())
    ):
        raise _fail(path, f"manifest field 'ties' is malformed: {json.dumps(manifest['ties'])[:120]}")
    if "seeded_orders" in manifest:  # absent from files that store every mask's orders
        seeded = manifest["seeded_orders"]
        if not (
            isinstance(seeded, dict)
            and seeded
            and all(isinstance(k, str) and isinstance(d, str) and len(d) == 64 for k, d in seeded.items())
        ):
            raise _fail(path, "manifest field 'seeded_orders' is malformed")
        if manifest.get("format_version", 0) < SEEDED_VERSION:
            raise _fail(path, f"masks stored as seeds need format version {SEEDED_VERSION}")
        if not isinstance(manifest.get("config"), dict) or not isinstance(manifest.get("layers"), dict):
            raise _fail(path, "masks stored as seeds need the compression config that drew them")
        unknown = sorted(set(seeded) - set(manifest["layers"]))
        if unknown:
            raise _fail(path, f"seeded_orders names layers the manifest does not list: {unknown[:3]}")
    if "quantized_linears" in manifest:  # absent from files without quantized dense layers
        entries = manifest["quantized_linears"]
        if not (isinstance(entries, dict) and all(isinstance(k, str) for k in entries)):
            raise _fail(path, "manifest field 'quantized_linears' is malformed")
        if manifest.get("format_version", 0) < QUANTIZED_VERSION:
            raise _fail(path, f"quantized dense layers need format version {QUANTIZED_VERSION}")
        for name, args in entries.items():
            problem = check_layer_args("QuantizedLinear", args)
            if problem is not None:
                raise _fail(path, f"quantized dense layer {name!r}: {problem}")


def _check_fields(manifest: dict[str, Any], path: Path) -> None:
    checks = {
        "form": lambda v: v in ("packed", "masked"),
        "layers": lambda v: isinstance(v, dict) and len(v) > 0,
        "sha256": lambda v: (
            isinstance(v, dict)
            and all(isinstance(k, str) and isinstance(d, str) and len(d) == 64 for k, d in v.items())
        ),
        "architecture": lambda v: v is None or isinstance(v, dict),
        "input_shape": lambda v: v is None or (isinstance(v, list) and all(_is_int(d) for d in v)),
        "config": lambda v: v is None or isinstance(v, dict),
        "user": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(s, str) for k, s in v.items()),
    }
    _check_optional_fields(manifest, path)
    for key, ok in checks.items():
        if key not in manifest:
            raise _fail(path, f"manifest lacks '{key}'")
        if not ok(manifest[key]):
            raise _fail(path, f"manifest field '{key}' is malformed: {json.dumps(manifest[key])[:120]}")
    for name, layer in manifest["layers"].items():
        if not (
            isinstance(layer, dict)
            and layer.get("kind") in LAYER_KINDS
            and isinstance(layer.get("source"), str)
            and all(_is_int(layer.get(k)) for k in ("d_out", "d_in", "compression"))
            and type(layer.get("bias")) is bool
            and kernel_problem(layer["kind"], layer.get("kernel_size"), _is_int) is None
        ):
            raise _fail(path, f"layer {name!r} in the manifest is malformed: {json.dumps(layer)[:160]}")
        problem = quantization_problem(layer["kind"], layer.get("quantization"))
        if problem is not None:
            raise _fail(path, f"layer {name!r}: {problem}")
        if layer["kind"] in QUANTIZED_KINDS and manifest["format_version"] < QUANTIZED_VERSION:
            raise _fail(path, f"layer {name!r} is quantized, which format version {manifest['format_version']} is not")
        if layer["compression"] > min(layer["d_out"], layer["d_in"]):
            raise _fail(path, f"layer {name!r}: compression {layer['compression']} exceeds its dimensions")
    kinds = {layer["kind"] for layer in manifest["layers"].values()}
    if {kind in PACKED_KINDS for kind in kinds} != {manifest["form"] == "packed"}:
        raise _fail(path, f"a {manifest['form']} file lists layers of kinds {sorted(kinds)}")


def _check_layers_against_tensors(manifest: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Each compressed layer's declared sizes must be the sizes of its tensors in the file."""
    for name, layer in manifest["layers"].items():
        expected = layer_tensor_shapes(
            layer["kind"],
            layer["d_out"],
            layer["d_in"],
            layer["compression"],
            layer["bias"],
            layer.get("kernel_size"),
            layer.get("quantization"),
        )
        for suffix, shape in expected.items():
            found = shapes.get(f"{name}.{suffix}")
            if found != shape:
                raise _fail(path, f"layer {name!r} declares {suffix} of shape {shape}, the file holds {found}")


def parse_manifest(header: dict[str, Any], path: Path) -> dict[str, Any]:
    """The manifest, with its digest, every field's type and the layers' sizes checked."""
    meta = header.get("__metadata__") or {}
    if FORMAT_NAME not in meta:
        raise _fail(path, f"not an mpdcompress model file (no '{FORMAT_NAME}' manifest in the header)")
    manifest = _json(meta[FORMAT_NAME], path, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise _fail(path, f"manifest does not declare format '{FORMAT_NAME}'")
    version = manifest.get("format_version")
    if version not in READ_VERSIONS:
        hint = " (written by mpdcompress 0.1: load it there and save it again)" if version == 1 else ""
        readable = " and ".join(map(str, READ_VERSIONS))
        raise _fail(path, f"format version {version!r} is not supported; this mpdcompress reads {readable}{hint}")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise _fail(path, "the manifest fails its SHA-256 check (the header was edited or damaged)")
    _check_fields(manifest, path)
    _check_layers_against_tensors(manifest, file_shapes(manifest, header, path), path)
    return manifest


def file_shapes(manifest: dict[str, Any], header: dict[str, Any], path: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of every tensor the file gives: those it holds, and the mask orders it leaves
    to their seed (``seeded_orders``), which it must not hold as well."""
    shapes = header_shapes(header)
    for name in manifest.get("seeded_orders", {}):
        layer = manifest["layers"][name]
        for suffix, size in (("row_order", layer["d_out"]), ("col_order", layer["d_in"])):
            key = f"{name}.{suffix}"
            if key in shapes:
                raise _fail(path, f"{key!r} is stored and also left to its seed")
            shapes[key] = (size,)
    return shapes


def _module_values(module: nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


def declared_values(spec: Any, path: Path) -> int:
    """How many values the architecture ``spec`` holds in its state dict, computed without
    allocating: plain layers are built on the meta device, compressed layers from their sizes.
    A shared module counts at each place it sits, as the state dict holds it there too."""
    from .architecture import fold

    return fold(
        spec, lambda layer: _layer_values(layer, path), lambda _, children: sum(children.values()), partial(_fail, path)
    )


def _layer_values(spec: dict[str, Any], path: Path) -> int:
    from .architecture import compressed_layer_sizes, construct_layer

    kind = spec["type"]
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise _fail(path, f"architecture {kind} has malformed args")
    if kind in LAYER_KINDS:
        return stored_values(layer_tensor_shapes(kind, *compressed_layer_sizes(kind, args, partial(_fail, path))))
    with torch.device("meta"):  # no argument can move a layer off it: device= is not allowed
        module = construct_layer(kind, args, partial(_fail, path))
    return _module_values(module)


# How much architecture a file may describe, in proportion to the tensors it holds: real models
# have fewer modules than tensors, and a module's entry is a dozen JSON values. Module nesting is
# three JSON levels (entry, children list, [key, entry] pair); torch's forward recursion limits
# real models to far less than the bound.
_MAX_NESTING = 64
_ENTRIES_FREE, _ENTRIES_PER_TENSOR, _JSON_VALUES_PER_ENTRY = 1000, 4, 16


def _check_extent(architecture: Any, tensors: int, path: Path) -> None:
    """Count the architecture's JSON values and nesting without recursion, so that a header with a
    million parameter-free modules (or a million-entry argument list) is refused in linear time,
    before a module is built for each."""
    entries_allowed = _ENTRIES_FREE + _ENTRIES_PER_TENSOR * tensors
    values_allowed = _JSON_VALUES_PER_ENTRY * entries_allowed
    values, stack = 0, [(architecture, 1)]
    while stack:
        value, depth = stack.pop()
        values += 1
        if values > values_allowed:
            raise _fail(path, f"the architecture is larger than {tensors} tensors can need ({values_allowed:,} values)")
        if depth > 3 * _MAX_NESTING + 8:
            raise _fail(path, f"the architecture nests modules more than {_MAX_NESTING} deep")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)


def check_declared_size(manifest: dict[str, Any], header: dict[str, Any], path: Path) -> None:
    """The architecture may hold exactly the values the file's tensors hold: a header that
    describes a larger model than its data is refused before anything is allocated."""
    if manifest.get("architecture") is None:
        return
    shapes = file_shapes(manifest, header, path)
    _check_extent(manifest["architecture"], len(shapes), path)
    try:
        declared = declared_values(manifest["architecture"], path)
    except RecursionError:
        raise _fail(path, "the architecture is nested too deeply") from None
    # A tied tensor is stored once but counted at each place the architecture holds it.
    held = sum(math.prod(shape) for shape in shapes.values())
    held += sum(math.prod(shapes.get(key, ())) for key in manifest.get("ties", {}).values())
    if declared != held:
        raise _fail(path, f"the architecture declares {declared:,} values but the file holds {held:,}")
