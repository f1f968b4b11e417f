"""Engines behind the packed forward: PyTorch (every device, the reference) and Triton (CUDA).

:func:`run_chain` is the single dispatch point; :func:`use_engine` overrides its choice.
"""

from .dispatch import (
    ENGINES,
    EngineUnavailableError,
    engine_for,
    get_engine,
    run_chain,
    run_packed,
    set_engine,
    use_engine,
)
from .torch_engine import ChainWeights, run_chain_torch
from .tune import tune

__all__ = [
    "ChainWeights",
    "ENGINES",
    "EngineUnavailableError",
    "engine_for",
    "get_engine",
    "run_chain",
    "run_chain_torch",
    "run_packed",
    "set_engine",
    "tune",
    "use_engine",
]
