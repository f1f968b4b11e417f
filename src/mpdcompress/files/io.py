"""Save and load compressed models: one ``safetensors`` file with a JSON manifest in its header.

Nothing is unpickled. The manifest records the format version, the form (``packed`` or
``masked``), every compressed layer (shape, factor, bias), the architecture when it can be
described (:mod:`.architecture`), the compression config, and a SHA-256 of every tensor; it is
covered by its own digest. :mod:`.header` checks the header before anything is built, and
loading checks every tensor before it reaches a module, so a damaged or hand-edited file raises
:class:`ModelFileError` naming the problem instead of yielding a wrong model.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .._version import __version__
from ..atomic import write_atomic
from ..core.config import MPDConfig, checked_device
from ..core.convert import compressed_layers, mpdify_, pack, packed_layer_sources
from ..core.masks import check_permutation
from ..core.quantize import quantized_like
from ..errors import (
    CompressionError,
    CompressionTypeError,
    ConfigError,
    ModelFileError,
    MPDCompressError,
    NonFiniteWeightsWarning,
)
from ..nn.loading import guard_state_dict_loading
from ..nn.packed import BlockDiagonalLinear
from ..nn.packed_conv import BlockDiagonalConv
from ..nn.quantized import QuantizedLinear, zero_quantized_weight
from .architecture import UnsupportedArchitectureError, build, construct_layer, describe
from .header import (
    FORMAT_NAME,
    FORMAT_VERSION,
    QUANTIZED_VERSION,
    SEEDED_VERSION,
    check_declared_size,
    manifest_digest,
    parse_manifest,
    read_header,
    tensor_digest,
)
from .layer_kinds import PACKED_KINDS, quantization_entry
from .load_checks import check_layer_tensors, check_quantized_dense, check_runs, check_template
from .seeded_masks import MASK_STORAGE, drawn_orders, seeded_layers

__all__ = ["save", "load", "read_manifest", "ModelFileError", "NonFiniteWeightsWarning", "FORMAT_VERSION"]

_INDEX_SUFFIXES = ("row_order", "col_order")
# What a model file may hold: what load can read back and check.
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _index_dtype(n: int) -> torch.dtype:
    """Smallest signed type safetensors and every runtime read that holds indices ``0..n-1``."""
    if n <= 2**7:
        return torch.int8
    if n <= 2**15:
        return torch.int16
    if n <= 2**31:
        return torch.int32
    return torch.int64


def _compressed_manifest(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every compressed layer by qualified name, with ``source``: its name in the masked model."""
    layers = {}
    for key, (layer, source) in packed_layer_sources(model).items():
        d_out, d_in = layer.mpd_mask.shape
        layers[key] = {
            "kind": type(layer).__name__,
            "source": source,
            "d_out": d_out,
            "d_in": d_in,
            "compression": layer.compression,
            "bias": layer.bias is not None,
        }
        if hasattr(layer, "kernel_size"):
            layers[key]["kernel_size"] = list(layer.kernel_size)
        if (quantization := quantization_entry(layer)) is not None:
            layers[key]["quantization"] = quantization
    return layers


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: tuple[int, ...] | None = None,
    metadata: dict[str, str] | None = None,
    mask_storage: Literal["orders", "seed"] = "orders",
) -> Path:
    """Write ``model`` (packed or masked) to ``path`` atomically; returns the path.

    ``input_shape`` (without the batch dimension) is recorded for tools such as ONNX export;
    ``metadata`` is free-form user text kept in the manifest. ``mask_storage="seed"`` leaves out
    the row and column orders of every layer whose random mask the recorded config draws again
    (format version 4; the smallest files, for loading with the writer's torch: see
    :mod:`.seeded_masks`).

    The previous file at ``path`` survives any crash during the write: the data goes to a
    temporary file in the same folder, is flushed to disk, then renamed over ``path``.
    """
    from safetensors.torch import save as st_save

    path = Path(path)
    if not isinstance(model, nn.Module):
        raise CompressionTypeError(f"save() takes a torch.nn.Module, got {type(model).__name__}")
    if input_shape is not None and not (
        isinstance(input_shape, (tuple, list)) and all(type(d) is int and d >= 1 for d in input_shape)
    ):
        raise ConfigError(f"input_shape must be a tuple of positive ints (no batch dimension), got {input_shape!r}")
    if mask_storage not in MASK_STORAGE:
        raise ConfigError(f"mask_storage must be one of {', '.join(MASK_STORAGE)}, got {mask_storage!r}")
    layers = _compressed_manifest(model)
    if not layers:
        raise CompressionError("model has no compressed layer; call mpdify_() (and pack()) first")
    config = getattr(model, "mpd_config", None)
    config = config if isinstance(config, MPDConfig) else None
    seeded = {}
    if mask_storage == "seed":
        modules = {key: layer for key, (layer, _) in packed_layer_sources(model).items()}
        seeded = seeded_layers(layers, modules, config)
    left_out = {f"{name}.{suffix}" for name in seeded for suffix in _INDEX_SUFFIXES}
    packed = {v["kind"] in PACKED_KINDS for v in layers.values()}
    if len(packed) > 1:
        raise CompressionError("model mixes packed and masked layers; pack() all of them or none")
    try:
        architecture = describe(model)
    except UnsupportedArchitectureError:
        architecture = None
    # Where a template gets its dense layers quantized, with or without an architecture.
    quantized_dense = {name: describe(m)["args"] for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    tensors: dict[str, torch.Tensor] = {}
    storages: dict[tuple[int, int], str] = {}
    ties: dict[str, str] = {}  # state_dict key -> the key whose tensor it is
    originals: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith(".num_blocks") or key in left_out:
            continue  # the manifest carries the factor; seeded orders are drawn again on load
        if (value.is_floating_point() and value.dtype not in _FLOAT_DTYPES) or value.is_complex():
            raise UnsupportedArchitectureError(
                f"cannot save {key!r} of dtype {value.dtype}: model files hold float16, bfloat16, float32 and float64"
            )
        if value.device.type == "meta":
            raise UnsupportedArchitectureError(f"cannot save {key!r}: it is on the meta device (it has no values)")
        where = (value.untyped_storage().data_ptr(), value.storage_offset())
        # Mask orders are stored with every layer, even where two layers share one tensor: each
        # layer's are checked against its manifest entry before anything is allocated.
        if value.numel() and where in storages and not key.endswith(_INDEX_SUFFIXES):
            first = storages[where]
            ref = originals[first]
            if (value.shape, value.stride(), value.dtype) != (ref.shape, ref.stride(), ref.dtype):
                raise UnsupportedArchitectureError(
                    f"{key!r} and {first!r} overlap in memory without being the same tensor; save a copy of one"
                )
            ties[key] = first  # a tied weight (a language model's head) or a shared module: stored once
            continue
        storages[where] = key
        originals[key] = value
        if key.endswith(_INDEX_SUFFIXES):
            value = value.to(_index_dtype(value.numel()))
        tensors[key] = value.detach().cpu().contiguous()
    quantized = quantized_dense or any("quantization" in v for v in layers.values())
    manifest = {
        "format": FORMAT_NAME,
        "format_version": SEEDED_VERSION if seeded else QUANTIZED_VERSION if quantized else 2,
        "writer": f"mpdcompress {__version__}",
        "form": "packed" if packed == {True} else "masked",
        "layers": layers,
        "architecture": architecture,
        "sha256": {key: tensor_digest(t) for key, t in tensors.items()},
        "input_shape": None if input_shape is None else [int(d) for d in input_shape],
        "config": None if config is None else config.to_json(),
        "user": {str(k): str(v) for k, v in (metadata or {}).items()},
        "ties": ties,
        **({"quantized_linears": quantized_dense} if quantized_dense else {}),
        **({"seeded_orders": seeded} if seeded else {}),
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    payload = st_save(tensors, metadata={FORMAT_NAME: json.dumps(manifest)})
    return write_atomic(path, lambda f: f.write(payload))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The validated manifest of a model file (only the header is read)."""
    path = Path(path)
    return parse_manifest(read_header(path), path)


def _skeleton(manifest: dict[str, Any], model: nn.Module | None, path: Path) -> nn.Module:
    if model is None:
        if manifest.get("architecture") is None:
            raise ModelFileError(
                f"{path} does not describe its architecture (the model had custom modules); "
                "pass the model: load(path, model=MyNet()) (on the command line: --model-class MODULE:CLASS)"
            )
        try:
            return build(manifest["architecture"])
        except Exception as exc:  # sizes are checked already; this is a malformed entry of any kind
            raise ModelFileError(f"{path}: cannot rebuild the architecture: {type(exc).__name__}: {exc}") from None
    # The caller's model is a template: it is copied, so a file that does not fit leaves it as it was.
    model = copy.deepcopy(model)
    if compressed_layers(model):
        return model
    # A dense instance of the architecture: compress the layers the file names, pack if it is
    # packed, give quantized layers their integer form.
    factors = {layer["source"]: layer["compression"] for layer in manifest["layers"].values()}
    try:
        mpdify_(model, factors)
        model = pack(model, inplace=True) if manifest["form"] == "packed" else model
        for name, layer in manifest["layers"].items():
            if "quantization" in layer:
                _quantized_skeleton(model, name, layer["quantization"])
        for name, args in manifest.get("quantized_linears", {}).items():
            _quantized_dense_skeleton(model, name, args)
    except MPDCompressError as exc:
        raise ModelFileError(f"{path}: the file's layers do not fit this model: {exc}") from None
    return model


def _replace_layer(model: nn.Module, name: str, fits: Callable[[Any], bool], what: str, make) -> None:
    """Put ``make(layer)`` where ``model`` has ``layer`` at ``name``, which must be ``what``
    (``fits(layer)``): the zero quantized layer a file's tensors are loaded into next."""
    owner, _, key = name.rpartition(".")
    try:
        parent = model.get_submodule(owner)
    except AttributeError:
        parent = None
    layer = None if parent is None else parent._modules.get(key)
    if not fits(layer):
        raise CompressionError(f"{name} is not {what} in this model")
    parent._modules[key] = make(layer)


def _quantized_dense_skeleton(model: nn.Module, name: str, args: dict[str, Any]) -> None:
    """Put the file's zero QuantizedLinear where ``model`` has the ``nn.Linear`` ``name``."""
    _replace_layer(
        model, name, lambda m: type(m) is nn.Linear, "an nn.Linear", lambda _: construct_layer("QuantizedLinear", args)
    )


def _quantized_skeleton(model: nn.Module, name: str, quantization: dict[str, Any]) -> None:
    """Put a zero quantized layer of ``quantization`` where ``model`` has the float packed layer
    ``name``."""

    def zero(layer: nn.Module) -> nn.Module:
        layout = layer.layout
        blocks = torch.zeros_like(layer.weight_blocks, device="cpu")
        weight = zero_quantized_weight(blocks, layout.compression, layout.max_rows, quantization)
        bias = None if layer.bias is None else torch.zeros_like(layer.bias, device="cpu")
        return quantized_like(layer, weight, quantization["activations"], bias)

    _replace_layer(
        model, name, lambda m: isinstance(m, (BlockDiagonalLinear, BlockDiagonalConv)), "a packed layer", zero
    )


def _check_digests(tensors: dict[str, torch.Tensor], manifest: dict[str, Any], path: Path) -> None:
    hashes = manifest["sha256"]
    if set(hashes) != set(tensors):
        raise ModelFileError(f"{path}: the manifest's digests do not name the file's tensors")
    for key, tensor in tensors.items():
        if hashes[key] != tensor_digest(tensor):
            raise ModelFileError(f"{path}: tensor {key!r} fails its SHA-256 check (corrupted file)")


def _check_tensors(
    tensors: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    expected: dict[str, torch.Tensor],
    path: Path,
    on_nonfinite: str,
) -> dict[str, torch.Tensor]:
    wanted = {k for k in expected if not k.endswith(".num_blocks")}
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or extra:
        raise ModelFileError(
            f"{path}: tensors do not match the architecture (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    state = {}
    for key, tensor in tensors.items():
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
            if tensor.dtype not in _FLOAT_DTYPES:
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


_ALIGNMENT = 64  # bytes: what torch's CPU allocator gives, and a cache line


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
    if model is not None and not isinstance(model, nn.Module):
        raise CompressionTypeError(f"load(model=...) takes a torch.nn.Module template, got {type(model).__name__}")
    device = checked_device(device)
    path = Path(path)
    header = read_header(path)
    manifest = parse_manifest(header, path)
    if model is None:
        check_declared_size(manifest, header, path)  # before anything is allocated
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: _aligned(f.get_tensor(key)) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as exc:
        raise ModelFileError(f"{path}: cannot read tensors: {exc}") from None
    _check_digests(tensors, manifest, path)
    tensors.update(drawn_orders(manifest, path))
    skeleton = _skeleton(manifest, model, path)
    if _compressed_manifest(skeleton) != manifest["layers"]:
        raise ModelFileError(f"{path}: the compressed layers in the file do not match the model's")
    expected = skeleton.state_dict()
    ties = manifest.get("ties", {})
    _check_ties(ties, expected, tensors, path)
    state = _check_tensors(tensors, manifest, {k: v for k, v in expected.items() if k not in ties}, path, on_nonfinite)
    state = {k: v.to(expected[k].dtype) if k.endswith(_INDEX_SUFFIXES) else v for k, v in state.items()}
    check_layer_tensors(state, manifest, path)
    check_quantized_dense(skeleton, state, path)
    if model is not None:
        check_template(skeleton, manifest, path)
    skeleton.load_state_dict({**state, **{alias: state[key] for alias, key in ties.items()}}, strict=True, assign=True)
    _retie(skeleton, ties)
    check_runs(skeleton, manifest, path)
    if manifest.get("config") is not None:
        skeleton.mpd_config = _recorded_config(manifest["config"], path)
    return guard_state_dict_loading(skeleton.to(device))


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in memory aligned as torch's allocator aligns it. safetensors aligns data to 8
    bytes only; a GEMM over a weight at another alignment sums in another order, so a loaded
    model would compute different last bits than the model that was saved."""
    return tensor if tensor.data_ptr() % _ALIGNMENT == 0 else tensor.clone()


def _check_ties(ties: dict[str, str], expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: Path):
    for alias, key in ties.items():
        if alias not in expected or key not in tensors or alias in tensors:
            raise ModelFileError(f"{path}: the tie {alias!r} -> {key!r} does not fit the model's tensors")
        if tuple(expected[alias].shape) != tuple(tensors[key].shape):
            raise ModelFileError(f"{path}: tied tensors {alias!r} and {key!r} differ in shape")
        # Index arrays are stored in the smallest integer type, so compare kinds, not dtypes.
        kinds = {t.dtype.is_floating_point for t in (expected[alias], tensors[key])}
        if len(kinds) > 1 or alias.endswith(_INDEX_SUFFIXES) != key.endswith(_INDEX_SUFFIXES):
            raise ModelFileError(f"{path}: the tie {alias!r} -> {key!r} joins tensors of different kinds")


def _retie(model: nn.Module, ties: dict[str, str]) -> None:
    """``load_state_dict(assign=True)`` gives every key its own parameter object; tied keys must
    share one again, as the saved model's did, or training would move the copies apart."""
    for alias, key in ties.items():
        owner, _, name = alias.rpartition(".")
        target_owner, _, target_name = key.rpartition(".")
        source = model.get_submodule(target_owner)
        tensor = source._parameters.get(target_name, source._buffers.get(target_name))
        setattr(model.get_submodule(owner), name, tensor)


def _recorded_config(entry: Any, path: Path) -> MPDConfig:
    try:
        return MPDConfig(**entry)
    except (MPDCompressError, TypeError) as exc:
        raise ModelFileError(f"{path}: the recorded compression config is invalid: {exc}") from None
