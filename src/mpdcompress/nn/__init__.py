"""Layer types: the masked training form and the packed block-diagonal form."""

from .masked import MPDLinear
from .packed import BlockDiagonalLinear, PackedChain, is_elementwise

__all__ = ["MPDLinear", "BlockDiagonalLinear", "PackedChain", "is_elementwise"]
