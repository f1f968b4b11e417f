"""mpdcompress: matrix permutation decomposition (MPDCompress) for PyTorch models.

Compress in place with :func:`mpdify_` (masked dense layers, or ``mode="compact"`` for the packed form),
deploy with :func:`pack` (block-diagonal layers that compute the same function with ~1/c of the
weights and FLOPs), ship with :func:`save` / :func:`load` / :func:`export_onnx`.
"""

from ._version import __version__
from .config import MPDConfig
from .convert import apply_masks_, compressed_layers, mpdify, mpdify_, pack, unpack
from .export import ExportError, export_onnx
from .io import ModelFileError, NonFiniteWeightsWarning, load, read_manifest, save
from .kernels import EngineUnavailableError, set_engine, tune, use_engine
from .layout import BlockLayout, validate_compression
from .mask_search import kept_mass, mask_from_weight
from .masks import MPDMask, layer_seed, make_mask
from .nn import BlockDiagonalLinear, MPDLinear, PackedChain

__all__ = [
    "__version__",
    "BlockLayout",
    "MPDMask",
    "MPDLinear",
    "BlockDiagonalLinear",
    "PackedChain",
    "make_mask",
    "mask_from_weight",
    "kept_mass",
    "layer_seed",
    "validate_compression",
    "MPDConfig",
    "mpdify_",
    "mpdify",
    "pack",
    "unpack",
    "apply_masks_",
    "compressed_layers",
    "save",
    "load",
    "read_manifest",
    "ModelFileError",
    "NonFiniteWeightsWarning",
    "export_onnx",
    "ExportError",
    "use_engine",
    "set_engine",
    "tune",
    "EngineUnavailableError",
]
