"""Save and load compressed models: one ``safetensors`` file with a JSON manifest in its header.

Nothing is unpickled. The manifest records the format version, the form (``packed`` or
``masked``), every compressed layer (shape, factor, bias), the architecture when it can be
described (:mod:`.architecture`), and a SHA-256 of every tensor's bytes. Loading checks all of
it before any tensor reaches a module, so a damaged or hand-edited file raises
:class:`ModelFileError` naming the problem instead of yielding a wrong model.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ._version import __version__
from .architecture import UnsupportedArchitectureError, build, describe
from .atomic import write_atomic
from .config import MPDConfig
from .convert import compressed_layers, mpdify_, pack
from .errors import (
    CompressionError,
    ConfigError,
    ModelFileError,
    ModelFileNotFoundError,
    MPDCompressError,
    NonFiniteWeightsWarning,
)
from .layout import BlockLayout
from .masks import check_permutation
from .nn.packed import PackedChain

__all__ = ["save", "load", "read_manifest", "ModelFileError", "NonFiniteWeightsWarning", "FORMAT_VERSION"]

FORMAT_NAME = "mpdcompress"
FORMAT_VERSION = 1
_INDEX_SUFFIXES = ("row_order", "col_order")


def _index_dtype(n: int) -> torch.dtype:
    """Smallest signed type safetensors and every runtime read that holds indices ``0..n-1``."""
    if n <= 2**7:
        return torch.int8
    if n <= 2**15:
        return torch.int16
    if n <= 2**31:
        return torch.int32
    return torch.int64


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(
        tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def _compressed_manifest(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every compressed layer by qualified name, with ``source``: its name in the masked model."""
    layers = {}
    for name, module in compressed_layers(model).items():
        if isinstance(module, PackedChain):
            parent = name.rsplit(".", 1)[0] + "." if "." in name else ""
            named = [
                (f"{name}.layers.{i}", layer, parent + key)
                for i, (layer, key) in enumerate(zip(module.layers, module.layer_source_keys()))
            ]
        else:
            named = [(name, module, name)]
        for key, layer, source in named:
            layers[key] = {
                "kind": type(layer).__name__,
                "source": source,
                "d_out": layer.out_features,
                "d_in": layer.in_features,
                "compression": layer.compression,
                "bias": layer.bias is not None,
            }
    return layers


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: tuple[int, ...] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (packed or masked) to ``path`` atomically; returns the path.

    ``input_shape`` (without the batch dimension) is recorded for tools such as ONNX export;
    ``metadata`` is free-form user text kept in the manifest.

    The previous file at ``path`` survives any crash during the write: the data goes to a
    temporary file in the same folder, is flushed to disk, then renamed over ``path``.
    """
    from safetensors.torch import save as st_save

    path = Path(path)
    layers = _compressed_manifest(model)
    if not layers:
        raise CompressionError("model has no compressed layer; call mpdify_() (and pack()) first")
    kinds = {v["kind"] for v in layers.values()}
    if len(kinds) > 1:
        raise CompressionError("model mixes packed and masked layers; pack() all of them or none")
    try:
        architecture = describe(model)
    except UnsupportedArchitectureError:
        architecture = None
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith(".num_blocks"):
            continue  # the manifest carries the factor
        if key.endswith(_INDEX_SUFFIXES):
            value = value.to(_index_dtype(value.numel()))
        tensors[key] = value.detach().cpu().contiguous()
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "writer": f"mpdcompress {__version__}",
        "form": "packed" if kinds == {"BlockDiagonalLinear"} else "masked",
        "layers": layers,
        "architecture": architecture,
        "sha256": {key: _digest(t) for key, t in tensors.items()},
        "input_shape": None if input_shape is None else [int(d) for d in input_shape],
        "config": config.to_json() if isinstance(config := getattr(model, "mpd_config", None), MPDConfig) else None,
        "user": dict(metadata or {}),
    }
    payload = st_save(tensors, metadata={FORMAT_NAME: json.dumps(manifest)})
    return write_atomic(path, lambda f: f.write(payload))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The validated manifest of a model file (no tensors are read)."""
    return _parse_manifest(_read_header(Path(path)), Path(path))


def _read_header(path: Path) -> dict[str, Any]:
    """Parse the safetensors header by hand, so a damaged file gives a precise error."""
    if not path.is_file():
        raise ModelFileNotFoundError(f"no model file at {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: file is {size} bytes, too short to be a safetensors file")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise ModelFileError(f"{path}: header length {n} does not fit in the {size}-byte file (truncated?)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: header is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: header is not a JSON object")
    data_len = size - 8 - n
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelFileError(f"{path}: tensor {key!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if end != data_len:
        raise ModelFileError(
            f"{path}: tensor data should be {end} bytes but the file holds {data_len} (truncated or padded)"
        )
    return header


def _parse_manifest(header: dict[str, Any], path: Path) -> dict[str, Any]:
    meta = header.get("__metadata__") or {}
    if FORMAT_NAME not in meta:
        raise ModelFileError(f"{path}: not an mpdcompress model file (no '{FORMAT_NAME}' manifest in the header)")
    try:
        manifest = json.loads(meta[FORMAT_NAME])
    except (TypeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: manifest is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path}: manifest does not declare format '{FORMAT_NAME}'")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: format version {version!r} is not supported (this mpdcompress reads version {FORMAT_VERSION})"
        )
    for key in ("form", "layers", "sha256"):
        if key not in manifest:
            raise ModelFileError(f"{path}: manifest lacks '{key}'")
    if manifest["form"] not in ("packed", "masked"):
        raise ModelFileError(f"{path}: unknown form {manifest['form']!r}")
    if not isinstance(manifest["layers"], dict) or not manifest["layers"]:
        raise ModelFileError(f"{path}: manifest lists no compressed layers")
    for name, layer in manifest["layers"].items():
        try:
            BlockLayout.create(layer["d_out"], layer["d_in"], layer["compression"], name)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: layer {name!r} in the manifest is invalid: {exc}") from None
    return manifest


def _skeleton(manifest: dict[str, Any], model: nn.Module | None, path: Path) -> nn.Module:
    if model is None:
        if manifest.get("architecture") is None:
            raise ModelFileError(
                f"{path} does not describe its architecture (the model had custom modules); "
                "pass the model: load(path, model=MyNet())"
            )
        try:
            return build(manifest["architecture"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelFileError(f"{path}: cannot rebuild the architecture: {exc}") from None
    if compressed_layers(model):
        return model
    # A dense instance of the architecture: compress the layers the file names, pack if it is packed.
    try:
        factors = {layer["source"]: layer["compression"] for layer in manifest["layers"].values()}
    except (KeyError, TypeError):
        raise ModelFileError(f"{path}: manifest layers lack their 'source' names") from None
    mpdify_(model, factors)
    return pack(model, inplace=True) if manifest["form"] == "packed" else model


def _check_tensors(
    tensors: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    expected: dict[str, torch.Tensor],
    path: Path,
    on_nonfinite: str,
) -> dict[str, torch.Tensor]:
    hashes = manifest["sha256"]
    wanted = {k for k in expected if not k.endswith(".num_blocks")}
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or extra:
        raise ModelFileError(
            f"{path}: tensors do not match the architecture (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    state = {}
    for key, tensor in tensors.items():
        if hashes.get(key) != _digest(tensor):
            raise ModelFileError(f"{path}: tensor {key!r} fails its SHA-256 check (corrupted file)")
        ref = expected[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ModelFileError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the architecture needs {tuple(ref.shape)}"
            )
        if key.endswith(_INDEX_SUFFIXES):
            try:
                tensor = check_permutation(tensor, ref.numel(), f"{key} in {path}")
            except (TypeError, ValueError) as exc:
                raise ModelFileError(str(exc)) from None
        elif ref.dtype.is_floating_point:
            if not tensor.dtype.is_floating_point:
                raise ModelFileError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected a floating type")
            if not bool(torch.isfinite(tensor).all()):
                message = f"{path}: tensor {key!r} contains NaN or Inf"
                if on_nonfinite == "error":
                    raise ModelFileError(message + " (pass on_nonfinite='warn' to load it anyway)")
                if on_nonfinite == "warn":
                    warnings.warn(message, NonFiniteWeightsWarning, stacklevel=3)
        elif tensor.dtype != ref.dtype:
            raise ModelFileError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected {ref.dtype}")
        state[key] = tensor
    for key, ref in expected.items():
        if key.endswith(".num_blocks"):
            state[key] = ref.clone()
    return state


def load(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    on_nonfinite: Literal["error", "warn", "ignore"] = "error",
) -> nn.Module:
    """Load a model written by :func:`save`, validating everything first.

    Without ``model``, the architecture recorded in the file is rebuilt. With ``model`` (a dense,
    masked or packed instance of the same architecture), its layers are compressed to match the
    file and the file's tensors are loaded into it. Raises :class:`ModelFileError` for any
    damaged or inconsistent file; NaN/Inf weights are refused unless ``on_nonfinite`` says
    otherwise.
    """
    from safetensors import SafetensorError, safe_open

    if on_nonfinite not in ("error", "warn", "ignore"):
        raise ConfigError(f"on_nonfinite must be 'error', 'warn' or 'ignore', got {on_nonfinite!r}")
    path = Path(path)
    manifest = _parse_manifest(_read_header(path), path)
    skeleton = _skeleton(manifest, model, path)
    if _compressed_manifest(skeleton) != manifest["layers"]:
        raise ModelFileError(f"{path}: the compressed layers in the file do not match the model's")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot read tensors: {exc}") from None
    expected = skeleton.state_dict()
    state = _check_tensors(tensors, manifest, expected, path, on_nonfinite)
    state = {k: v.to(expected[k].dtype) if k.endswith(_INDEX_SUFFIXES) else v for k, v in state.items()}
    skeleton.load_state_dict(state, strict=True, assign=True)
    if manifest.get("config") is not None:
        skeleton.mpd_config = _recorded_config(manifest["config"], path)
    return skeleton.to(device)


def _recorded_config(entry: Any, path: Path) -> MPDConfig:
    try:
        return MPDConfig(**entry)
    except (MPDCompressError, TypeError) as exc:
        raise ModelFileError(f"{path}: the recorded compression config is invalid: {exc}") from None
