"""The method itself: block layouts, masks and their seeds, the options, and the conversions
between dense, masked and packed models (``mpdify_``, ``pack``, ``unpack``).

The core imports ``nn`` (the layer types) and ``kernels`` (through ``nn``) and nothing above them.
"""

from .config import MPDConfig
from .convert import apply_masks_, compressed_layers, mpdify_, pack, unpack
from .layout import BlockLayout, validate_compression
from .mask_search import kept_mass, mask_from_weight
from .masks import MPDMask, layer_seed, make_mask

__all__ = [
    "MPDConfig",
    "BlockLayout",
    "validate_compression",
    "MPDMask",
    "make_mask",
    "layer_seed",
    "mask_from_weight",
    "kept_mass",
    "mpdify_",
    "pack",
    "unpack",
    "apply_masks_",
    "compressed_layers",
]
