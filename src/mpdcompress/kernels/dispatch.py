"""The one place that picks the engine for a packed forward.

``auto`` (the default) runs the Triton engine on CUDA tensors of fp32, bf16 or fp16 when Triton
is installed (``pip install "mpdcompress[gpu]"``) and the PyTorch engine everywhere else.
``use_engine("torch")`` / ``use_engine("triton")`` (or ``MPDCOMPRESS_ENGINE``) override it, for
users and for benchmarks that compare the two. Forcing ``triton`` on CPU tensors works only under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests the kernels.
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import EngineUnavailableError, UnknownNameError
from .quantized_blocks import QuantizedWeight
from .torch_engine import ChainWeights, run_chain_torch
from .tuning import interpreting

__all__ = [
    "ENGINES",
    "EngineUnavailableError",
    "run_chain",
    "run_packed",
    "set_engine",
    "get_engine",
    "use_engine",
    "engine_for",
    "forget_launch_plans",
    "launch_plan_generation",
    "keepable",
]

ENGINES = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _checked(name: str) -> str:
    if name not in ENGINES:
        raise UnknownNameError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    return name


# A plain global rather than a ContextVar: torch.compile traces through globals (and guards on
# them) but not through ContextVar lookups.
_engine = _checked(os.environ.get("MPDCOMPRESS_ENGINE", "auto"))
_triton_installed: bool | None = None


def set_engine(name: str) -> None:
    """Choose the engine for every packed forward from now on: ``auto``, ``torch`` or ``triton``."""
    global _engine
    _engine = _checked(name)


def get_engine() -> str:
    """The engine chosen now: ``auto``, ``torch`` or ``triton`` (``use_engine``, ``set_engine``, env)."""
    return _engine


@contextmanager
def use_engine(name: str) -> Iterator[None]:
    """``with use_engine("torch"): ...`` runs packed forwards on that engine inside the block."""
    global _engine
    previous, _engine = _engine, _checked(name)
    try:
        yield
    finally:
        _engine = previous


def _has_triton() -> bool:
    global _triton_installed
    if _triton_installed is None:
        _triton_installed = importlib.util.find_spec("triton") is not None
    return _triton_installed


def engine_for(x: torch.Tensor, has_kernel_indices: bool = True) -> str:
    """``torch`` or ``triton``: the engine that runs a packed forward on ``x``."""
    # The common CPU case returns first: at batch 1 every microsecond of dispatch shows.
    if _engine == "torch" or (_engine == "auto" and not x.is_cuda):
        return "torch"
    if torch._C._get_tracing_state() is not None or torch.jit.is_scripting():  # is_tracing() without its wrapper
        return "torch"
    device = "cuda" if x.is_cuda else x.device.type  # .device builds an object: host time
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    reason = None
    if not (_triton_installed or _has_triton()):
        reason = 'Triton is not installed (pip install "mpdcompress[gpu]")'
    elif not has_kernel_indices:
        reason = "these weights carry no kernel indices"
    elif not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
        # On the CPU the interpreter is for testing the kernels, never an automatic choice.
        reason = f"Triton kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1), not {x.device}"
    elif dtype not in _TRITON_DTYPES:
        reason = f"the Triton kernels take float32, bfloat16 or float16, not {dtype}"
    if reason is None:
        return "triton"
    if _engine == "triton":
        raise EngineUnavailableError(f"the Triton engine cannot run this packed layer: {reason}")
    return "torch"


_triton_chain: Callable[[torch.Tensor, ChainWeights], torch.Tensor] | None = None
_triton_packed: Callable[[torch.Tensor, object], torch.Tensor] | None = None
# The Triton engine replays a packed module's eager inference from a cached launch plan (built
# tensors, tiles and grids); a plan is valid while this number has not moved. Packed modules move
# it whenever their tensors may change identity, dtype or device (``.to()``, ``load_state_dict``,
# attribute assignment, new modules): rare events, so one global number is enough.
_launch_plan_generation = 0


def forget_launch_plans() -> None:
    """Make every cached launch plan stale (the next call of each module builds a new one)."""
    global _launch_plan_generation
    _launch_plan_generation += 1


def launch_plan_generation() -> int:
    """The number a launch plan must have been built at to be used."""
    return _launch_plan_generation


def keepable(weights: ChainWeights) -> bool:
    """Whether ``weights`` may be kept between calls (a launch plan, the PyTorch engine's kept
    weights): parameter blocks and integer blocks (their layers' own buffers), not the float
    blocks that quantized and quantization-aware layers make on every call."""
    return all(isinstance(b, (nn.Parameter, QuantizedWeight)) for b in weights.blocks)


def _import_triton_engine() -> None:
    # Imported on first use (it imports Triton); kept in globals, as an import statement per
    # call costs host time at batch 1.
    global _triton_chain, _triton_packed
    from .triton_engine import run_chain_triton, run_packed_triton

    _triton_chain, _triton_packed = run_chain_triton, run_packed_triton


def _run_triton(x: torch.Tensor, weights: ChainWeights) -> torch.Tensor:
    if _triton_chain is None:
        _import_triton_engine()
    return _triton_chain(x, weights)


def run_chain(x: torch.Tensor, weights: ChainWeights) -> torch.Tensor:
    """Apply a packed chain to ``x`` (..., d_in) on the engine :func:`engine_for` picks."""
    if engine_for(x, weights.in_index is not None) == "triton":
        return _run_triton(x, weights)
    return run_chain_torch(x, weights)


# What the PyTorch engine multiplies with, per packed module, for calls without autograd: building
# it walks the module (~13 us for a two-layer chain on this CPU, a quarter of a packed
# LeNet-300-100's batch-1 forward). Valid while the launch-plan generation has not moved: the same
# events that make a Triton plan stale (a tensor's identity, dtype or device) make these stale.
_torch_weights: "weakref.WeakKeyDictionary[nn.Module, tuple[int, ChainWeights]]" = weakref.WeakKeyDictionary()


def _weights_for_torch(module) -> ChainWeights:
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return module.chain_weights(kernel_indices=False)
    cached = _torch_weights.get(module)
    if cached is not None and cached[0] == _launch_plan_generation:
        return cached[1]
    weights = module.chain_weights(kernel_indices=False)
    if keepable(weights):
        _torch_weights[module] = (_launch_plan_generation, weights)
    return weights


def run_packed(x: torch.Tensor, module) -> torch.Tensor:
    """Apply a packed module (anything with ``chain_weights(kernel_indices)``) to ``x``; the
    kernel indices are gathered only when the Triton engine will read them."""
    if engine_for(x) == "triton":
        if _triton_packed is None:
            _import_triton_engine()
        return _triton_packed(x, module)
    return run_chain_torch(x, _weights_for_torch(module))
