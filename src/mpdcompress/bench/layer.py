"""Layer-level benchmark: one weight shape, one factor, one batch, every way to run it.

Candidates (all computing the same masked layer, except ``dense``, which is the uncompressed one):

* ``dense``: ``nn.Linear`` with the full weight (what the user has without compression);
* ``masked``: :class:`MPDLinear` (training form: dense GEMM plus mask multiply);
* ``csr``: the masked weight as ``torch.sparse_csr`` (unstructured sparsity at the same density);
* ``bsr``: the *unpermuted* block-diagonal weight as ``torch.sparse_bsr`` with one block per
  diagonal block (structured sparsity without MPD's gathers), where this torch build supports it;
* ``packed``: :class:`BlockDiagonalLinear` (gather → bmm → gather);
* ``bmm_only``: the packed GEMM alone, no permutations (the ceiling for ``packed``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..nn.masked import MPDLinear
from ..nn.packed import BlockDiagonalLinear
from ..timing import interleaved_medians

__all__ = ["LAYER_SHAPES", "LayerResult", "layer_candidates", "run_layer_bench"]

# (name, d_out, d_in): the paper's FC shapes plus a transformer MLP.
LAYER_SHAPES: list[tuple[str, int, int]] = [
    ("lenet-fc1", 300, 784),
    ("lenet-fc2", 100, 300),
    ("deep-mnist-fc1", 1024, 3136),
    ("alexnet-fc6", 4096, 16384),
    ("alexnet-fc7", 4096, 4096),
    ("alexnet-fc8", 1000, 4096),
    ("transformer-mlp-up", 3072, 768),
]


@dataclass
class LayerResult:
    """One single-layer timing row: the shape, factor, batch and dtype, and each variant's time."""

    shape: str
    d_out: int
    d_in: int
    compression: int
    batch: int
    dtype: str
    device: str
    seconds: dict[str, float | None]
    speedup_vs_dense: dict[str, float | None]
    notes: dict[str, str]


def layer_candidates(
    d_out: int, d_in: int, compression: int, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, str]]:
    """Callables ``f(x)`` for every candidate, and notes for candidates this build cannot run."""
    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out).to(device=device, dtype=dtype).eval()
    masked = MPDLinear(d_in, d_out, compression=compression, seed=seed).to(device=device, dtype=dtype).eval()
    packed = BlockDiagonalLinear.from_masked(masked).eval()
    weight = (masked.weight * masked.mask).detach()
    bias = masked.bias.detach()
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"dense": dense, "masked": masked, "packed": packed}
    notes: dict[str, str] = {}

    def sparse_candidate(key: str, build: Callable[[], torch.Tensor]) -> None:
        # Sparse kernels cover only some layouts/dtypes/devices: probe once and record why not.
        try:
            with warnings.catch_warnings():  # torch flags sparse layouts as beta on every conversion
                warnings.simplefilter("ignore", UserWarning)
                sparse = build()
            torch.addmm(bias[:, None], sparse, torch.zeros(d_in, 1, device=device, dtype=dtype))
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            notes[key] = f"not supported by this torch build: {str(exc).splitlines()[0][:120]}"
            return
        out[key] = lambda x: torch.addmm(bias[:, None], sparse, x.t()).t()

    sparse_candidate("csr", weight.to_sparse_csr)
    layout = packed.layout
    blocks = packed.weight_blocks.detach()
    c, rows, cols = blocks.shape
    if torch.device(device).type == "cuda" and max(rows, cols) > 128:
        # Measured on an H100 with torch 2.11: the Triton BSR kernel ran for minutes (tuning) at
        # 512x512 blocks without finishing a single batch-512 call.
        notes["bsr"] = (
            "skipped on CUDA for blocks over 128: torch's Triton BSR kernel does not finish in reasonable time"
        )
    elif layout.is_even:
        sparse_candidate("bsr", lambda: torch.block_diag(*blocks.unbind(0)).to_sparse_bsr((rows, cols)))
    else:
        notes["bsr"] = "uneven blocks: BSR needs equal block sizes"

    staged: dict[int, torch.Tensor] = {}

    def bmm_only(x: torch.Tensor) -> torch.Tensor:
        # The GEMM on an already gathered (and padded) input: the ceiling for ``packed``.
        batch = x.shape[0]
        if batch not in staged:
            staged[batch] = torch.randn(c, batch, cols, device=device, dtype=dtype)
        return torch.bmm(staged[batch], blocks.transpose(1, 2))

    out["bmm_only"] = bmm_only
    return out, notes


def run_layer_bench(
    shapes: Iterable[tuple[str, int, int]] = LAYER_SHAPES,
    factors: Iterable[int] = (4, 8, 10, 16),
    batches: Iterable[int] = (1, 16, 64, 512),
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    repeats: int = 7,
    min_time: float = 0.02,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time every candidate for every (shape, factor, batch); ratios are dense time / candidate time."""
    results = []
    batches = list(batches)
    for name, d_out, d_in in shapes:
        for c in factors:
            if c > min(d_out, d_in):
                continue
            fns, notes = layer_candidates(d_out, d_in, c, dtype=dtype, device=device)
            for batch in batches:
                x = torch.randn(batch, d_in, device=device, dtype=dtype)
                with torch.no_grad():
                    seconds: dict[str, float | None] = dict(
                        interleaved_medians(
                            {key: (lambda fn=fn: fn(x)) for key, fn in fns.items()},
                            repeats=repeats,
                            min_time=min_time,
                            device=device,
                        )
                    )
                for key in notes:
                    seconds.setdefault(key, None)
                dense = seconds["dense"]
                speedup = {k: (None if v is None else dense / v) for k, v in seconds.items()}
                results.append(
                    asdict(
                        LayerResult(
                            name,
                            d_out,
                            d_in,
                            c,
                            batch,
                            str(dtype).replace("torch.", ""),
                            device,
                            seconds,
                            speedup,
                            notes,
                        )
                    )
                )
                if progress is not None:
                    progress(f"{name} c={c} batch={batch}: packed {speedup['packed']:.2f}x dense")
    return results
