"""Layer types: the masked training form, the packed block-diagonal form and its quantized form."""

from .conv_chain import PackedConvChain
from .masked import MaskedWeight, MPDConv1d, MPDConv2d, MPDLinear
from .packed import BlockDiagonalLinear, PackedChain, is_elementwise
from .packed_conv import BlockDiagonalConv
from .quantized import QuantizedBlockDiagonalConv, QuantizedBlockDiagonalLinear, QuantizedBlocks, QuantizedLinear
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
    "QuantizedBlocks",
    "QuantizedBlockDiagonalLinear",
    "QuantizedBlockDiagonalConv",
    "QuantizedLinear",
    "Residual",
    "is_elementwise",
]
