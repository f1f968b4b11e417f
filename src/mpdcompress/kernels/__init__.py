"""Forward paths of packed block-diagonal chains (see :mod:`.reference` for the semantics)."""

from .chain import ChainWeights, run_chain

__all__ = ["ChainWeights", "run_chain"]
