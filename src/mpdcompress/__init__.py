"""mpdcompress: matrix permutation decomposition (MPDCompress) for PyTorch models.

Compress in place with :func:`mpdify_` (masked dense layers, or ``mode="compact"`` for the packed form),
deploy with :func:`pack` (block-diagonal layers that compute the same function with ~1/c of the
weights and FLOPs), :func:`quantize_` its blocks to int8 / int4 (trained for it with :func:`fake_quantize_`), ship with :func:`save` / :func:`load` / :func:`export_onnx`.
"""

from ._version import __version__
from .core.batchnorm import fold_batchnorm_
from .core.config import MPDConfig
from .core.convert import apply_masks_, compressed_layers, mpdify, mpdify_, pack, unpack
from .core.layout import BlockLayout, validate_compression
from .core.mask_search import kept_mass, mask_from_weight
from .core.masks import MPDMask, layer_seed, make_mask
from .core.qat import fake_quantize_
from .core.quantize import QuantConfig, dequantize, quantize_
from .files.executorch import export_executorch, run_executorch
from .files.io import ModelFileError, NonFiniteWeightsWarning, load, read_manifest, save
from .files.onnx import ExportError, export_onnx
from .kernels import EngineUnavailableError, set_engine, tune, use_engine
from .nn import (
    BlockDiagonalConv,
    BlockDiagonalLinear,
    MPDConv1d,
    MPDConv2d,
    MPDLinear,
    PackedChain,
    PackedConvChain,
    QuantizedBlockDiagonalConv,
    QuantizedBlockDiagonalLinear,
    QuantizedLinear,
)
from .progress import set_progress_bars

__all__ = [
    "__version__",
    "BlockLayout",
    "MPDMask",
    "MPDLinear",
    "BlockDiagonalLinear",
    "PackedChain",
    "MPDConv1d",
    "MPDConv2d",
    "BlockDiagonalConv",
    "PackedConvChain",
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
    "fold_batchnorm_",
    "QuantConfig",
    "quantize_",
    "dequantize",
    "fake_quantize_",
    "QuantizedBlockDiagonalLinear",
    "QuantizedBlockDiagonalConv",
    "QuantizedLinear",
    "apply_masks_",
    "compressed_layers",
    "save",
    "load",
    "read_manifest",
    "ModelFileError",
    "NonFiniteWeightsWarning",
    "export_onnx",
    "export_executorch",
    "run_executorch",
    "ExportError",
    "use_engine",
    "set_engine",
    "tune",
    "EngineUnavailableError",
    "set_progress_bars",
]
