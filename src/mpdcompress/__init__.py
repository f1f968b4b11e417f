"""mpdcompress: matrix permutation decomposition (MPDCompress) for PyTorch models.

Train with :func:`mpdify` (masked dense layers), deploy with :func:`pack` (block-diagonal layers
that compute the same function with ~1/c of the weights and FLOPs).
"""

from .convert import apply_masks_, compressed_layers, mpdify, pack, unpack
from .layout import BlockLayout, validate_compression
from .masks import MPDMask, layer_seed, make_mask
from .nn import BlockDiagonalLinear, MPDLinear, PackedChain

__version__ = "0.1.0"

__all__ = [
    "BlockLayout", "MPDMask", "MPDLinear", "BlockDiagonalLinear", "PackedChain",
    "make_mask", "layer_seed", "validate_compression",
    "mpdify", "pack", "unpack", "apply_masks_", "compressed_layers",
]
