"""Layer types: the masked training form and the packed block-diagonal form."""

from .conv_chain import PackedConvChain
from .masked import MaskedWeight, MPDConv1d, MPDConv2d, MPDLinear
from .packed import BlockDiagonalLinear, PackedChain, is_elementwise
from .packed_conv import BlockDiagonalConv
from .residual import Residual

__all__ = [
    "MaskedWeight",
    "MPDLinear",
    "MPDConv1d",
    "MPDConv2d",
    "BlockDiagonalLinear",
    "BlockDiagonalConv",
    "PackedChain",
    "PackedConvChain",
    "Residual",
    "is_elementwise",
]
