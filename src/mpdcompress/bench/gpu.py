"""The GPU benchmark behind ``mpdcompress bench --device cuda``.

For each layer shape, batch and dtype, every candidate is timed eagerly and as CUDA-graph replay
(CUDA events, candidates sampled round-robin in one process); ratios are dense time / candidate
time in the same mode. Candidates: ``dense`` (``nn.Linear``), ``packed`` (Triton engine),
``packed_torch`` (PyTorch engine), ``bmm_only`` (the block GEMM on already gathered inputs: the
ceiling), ``packed_int8`` / ``packed_int4`` (the Triton engine on int8 / int4-g128 blocks,
dequantized as their tiles load), ``monarch`` (same parameter count), ``semi_structured`` (2:4)
and ``bsr`` (the unpermuted block-diagonal weight as torch BSR). Then whole FC stacks and a
training step.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..kernels import use_engine
from ..kernels.quantized_blocks import QuantizedWeight
from ..nn.masked import MPDLinear
from ..nn.packed import BlockDiagonalLinear
from ..nn.quantized import QuantizedBlockDiagonalLinear
from ..timing import cuda_medians, interleaved_medians
from .alternatives import MonarchLinear, semi_structured_linear
from .gpu_report import LAYER_COLUMNS
from .machine import describe_machine
from .model import build_stack

__all__ = ["GPU_SHAPES", "GpuProfile", "GPU_FULL", "GPU_QUICK", "GPU_KEY", "GPU_PROFILES", "run_gpu_suite", "DTYPES"]

# (name, d_out, d_in): AlexNet's weight-heavy FC layers, an LLM MLP up-projection (4096 → 14336,
# Llama/Mistral 7B) and BERT-base's MLP up-projection.
GPU_SHAPES: list[tuple[str, int, int]] = [
    ("alexnet-fc6", 4096, 16384),
    ("alexnet-fc7", 4096, 4096),
    ("llm-mlp-up", 14336, 4096),
    ("bert-mlp-up", 3072, 768),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class GpuProfile:
    """What the GPU suite measures: layer shapes, factors, batches, dtypes and whole models."""

    shapes: tuple[tuple[str, int, int], ...] = tuple(GPU_SHAPES)
    factors: tuple[int, ...] = (8,)
    batches: tuple[int, ...] = (1, 16, 128, 2048)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    models: tuple[str, ...] = ("alexnet-fc", "transformer-mlp")
    training_models: tuple[str, ...] = ("alexnet-fc",)
    training_batch: int = 512
    repeats: int = 10
    candidates: tuple[str, ...] = ("dense", *LAYER_COLUMNS)


GPU_FULL = GpuProfile()
GPU_QUICK = GpuProfile(
    shapes=tuple(GPU_SHAPES[:2]), batches=(1, 128), dtypes=("bf16",), models=("alexnet-fc",), repeats=5
)
# The engine's key targets in one short device call: FC6 and the LLM MLP up-projection in bf16 at
# every batch bucket (dense, packed, the bare block GEMM, the PyTorch engine for its error), the
# AlexNet FC stack and its compact training step; no rivals (the full profile has them).
GPU_KEY = GpuProfile(
    shapes=(GPU_SHAPES[0], GPU_SHAPES[2]),
    batches=(1, 16, 128, 2048),
    dtypes=("bf16",),
    models=("alexnet-fc",),
    repeats=5,
    candidates=("dense", "packed", "packed_torch", "bmm_only", "packed_int8", "packed_int4"),
)
GPU_PROFILES = {"full": GPU_FULL, "quick": GPU_QUICK, "key": GPU_KEY}
Record = Callable[[dict], None]


def _engine(module: nn.Module, engine: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with use_engine(engine):
            return module(x)

    return run


def layer_candidates(
    d_out: int, d_in: int, c: int, dtype: torch.dtype, device: str, wanted: tuple[str, ...], seed: int = 0
) -> tuple[dict[str, Callable], dict[str, str]]:
    torch.manual_seed(seed)
    kw = dict(device=device, dtype=dtype)
    dense = nn.Linear(d_in, d_out, **kw).eval()
    masked = MPDLinear(d_in, d_out, compression=c, seed=seed).to(**kw).eval()
    packed = BlockDiagonalLinear.from_masked(masked).eval()
    blocks = packed.weight_blocks.detach()
    fns: dict[str, Callable] = {
        "dense": dense,
        "packed": _engine(packed, "triton"),
        "packed_torch": _engine(packed, "torch"),
    }
    notes: dict[str, str] = {}
    staged: dict[int, torch.Tensor] = {}

    def bmm_only(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] not in staged:
            staged[x.shape[0]] = torch.randn(blocks.shape[0], x.shape[0], blocks.shape[2], **kw)
        return torch.bmm(staged[x.shape[0]], blocks.transpose(1, 2))

    fns["bmm_only"] = bmm_only
    builders = {
        "packed_int8": lambda: _engine(_random_integer_layer(packed, 8), "triton"),
        "packed_int4": lambda: _engine(_random_integer_layer(packed, 4), "triton"),
        "monarch": lambda: MonarchLinear(d_in, d_out, c, **kw).eval(),
        "semi_structured": lambda: semi_structured_linear(dense.weight, dense.bias),
        "bsr": lambda: _bsr(blocks, packed.bias.detach() if packed.bias is not None else None, packed.layout.is_even),
    }
    for key, build in builders.items():
        if key not in wanted:
            continue
        try:
            fn = build()
            fn(torch.randn(16, d_in, **kw))  # probe: unsupported dtypes/shapes fail here
            fns[key] = fn
        except (RuntimeError, ValueError, NotImplementedError, ImportError, AssertionError) as exc:
            notes[key] = f"not run: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"
    return {k: v for k, v in fns.items() if k in wanted}, notes


def _random_integer_layer(packed: BlockDiagonalLinear, bits: int, group: int = 128) -> QuantizedBlockDiagonalLinear:
    """``packed`` with random int8 (one scale per row) or int4 (groups of ``group``) blocks: the
    kernel's speed does not depend on the values, and the GPU machine has no torchao to round
    real weights with. Even layouts only (random integers would fill the padding)."""
    c, rows, cols = packed.weight_blocks.shape
    if not packed.layout.is_even or cols % 2:
        raise ValueError("random integer blocks need an even layout with an even block width")
    group = cols if bits == 8 else group
    if bits == 8:
        q = torch.randint(-127, 128, (c, rows, cols), dtype=torch.int8)
    else:
        q = torch.randint(0, 256, (c, rows, cols // 2), dtype=torch.uint8)
    scales = torch.rand(c, rows, -(-cols // group)) * 1e-2 + 1e-3
    dtype, device = packed.weight_blocks.dtype, packed.weight_blocks.device
    weight = QuantizedWeight(q, scales.to(dtype), None, bits, (c, rows, cols), group)
    bias = None if packed.bias is None else packed.bias.detach().cpu()
    return QuantizedBlockDiagonalLinear(packed.mpd_mask, weight, bias).to(device).eval()


def _bsr(blocks: torch.Tensor, bias: torch.Tensor | None, even: bool) -> Callable:
    # Structured sparsity without MPD's gathers; 64x64 tiles of the block-diagonal weight (whole
    # 512x2048 blocks made torch's Triton BSR kernel tune for minutes on an H100).
    if not even:
        raise ValueError("uneven blocks: BSR needs equal block sizes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sparse = torch.block_diag(*blocks.unbind(0)).to_sparse_bsr((64, 64))
    bias_col = None if bias is None else bias[:, None]
    return lambda x: (torch.sparse.mm(sparse, x.t()) if bias_col is None else torch.addmm(bias_col, sparse, x.t())).t()


def _time(fns: dict[str, Callable[[], object]], device: str, graph: bool, repeats: int) -> dict[str, float | None]:
    if torch.device(device).type == "cuda":
        return cuda_medians(fns, graph=graph, repeats=repeats)
    # CPU (tests of this module): wall time, and no graphs.
    return dict(interleaved_medians(fns, repeats=repeats, warmup=1)) if not graph else {k: None for k in fns}


def _ratios(seconds: dict[str, float | None]) -> dict[str, float | None]:
    dense = seconds.get("dense")
    return {k: (None if v is None or dense is None else dense / v) for k, v in seconds.items()}


def _eager_and_graph(fns: dict[str, Callable], x: torch.Tensor, device: str, repeats: int) -> dict:
    """Seconds and speed-ups over dense of every candidate on ``x``, eager and as CUDA-graph replay."""
    calls = {k: (lambda fn=fn: fn(x)) for k, fn in fns.items()}
    with torch.no_grad():
        seconds = {mode: _time(calls, device, mode == "graph", repeats) for mode in ("eager", "graph")}
    return {"seconds": seconds, "speedup_vs_dense": {mode: _ratios(t) for mode, t in seconds.items()}}


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def run_gpu_layers(profile: GpuProfile, device: str, record: Record) -> None:
    for dtype_name in profile.dtypes:
        dtype = DTYPES[dtype_name]
        for name, d_out, d_in in profile.shapes:
            for c in profile.factors:
                fns, notes = layer_candidates(d_out, d_in, c, dtype, device, profile.candidates)
                for batch in profile.batches:
                    x = torch.randn(batch, d_in, device=device, dtype=dtype)
                    with torch.no_grad():
                        error = _rel_error(fns["packed"](x), fns["packed_torch"](x))
                    record(
                        {
                            "shape": name,
                            "d_out": d_out,
                            "d_in": d_in,
                            "compression": c,
                            "batch": batch,
                            "dtype": dtype_name,
                            **_eager_and_graph(fns, x, device, profile.repeats),
                            "packed_vs_torch_engine_error": error,
                            "notes": notes,
                        }
                    )


def run_gpu_models(profile: GpuProfile, device: str, record: Record) -> None:
    for dtype_name in profile.dtypes:
        dtype = DTYPES[dtype_name]
        for name in profile.models:
            dense, shape = build_stack(name, "dense")
            packed, _ = build_stack(name, "packed")
            dense, packed = dense.to(device, dtype), packed.to(device, dtype)
            fns = {"dense": dense, "packed": _engine(packed, "triton"), "packed_torch": _engine(packed, "torch")}
            for batch in profile.batches:
                x = torch.randn(batch, *shape, device=device, dtype=dtype)
                record(
                    {
                        "model": name,
                        "dtype": dtype_name,
                        "batch": batch,
                        **_eager_and_graph(fns, x, device, profile.repeats),
                    }
                )


def run_gpu_training(profile: GpuProfile, device: str, record: Record) -> None:
    """One SGD step (forward, backward, update); bf16 runs under autocast with fp32 weights."""
    for dtype_name in profile.dtypes:
        dtype = DTYPES[dtype_name]
        for name in profile.training_models:
            steps = {}
            for form, built, engine in (
                ("dense", "dense", "torch"),
                ("masked", "masked", "torch"),
                ("compact", "packed", "triton"),
                ("compact_torch", "packed", "torch"),
            ):
                model, shape = build_stack(name, built)
                model = model.to(device).train()
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                x = torch.randn(profile.training_batch, *shape, device=device)
                y = torch.randint(0, model(x[:1]).shape[-1], (profile.training_batch,), device=device)

                def step(model=model, opt=opt, x=x, y=y, engine=engine) -> None:
                    opt.zero_grad(set_to_none=True)
                    with (
                        use_engine(engine),
                        torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32),
                    ):
                        loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    opt.step()

                steps[form] = step
            seconds = _time(steps, device, False, max(3, profile.repeats // 2))
            record(
                {
                    "model": name,
                    "dtype": dtype_name,
                    "batch": profile.training_batch,
                    "seconds": seconds,
                    "speedup_vs_dense": _ratios(seconds),
                }
            )


def row_summary(section: str, row: dict) -> str:
    """One line for a measured row: what it is and packed's speed-up over dense."""
    s = row["speedup_vs_dense"]
    if section == "training":
        return f"training {row['model']} {row['dtype']} batch={row['batch']}: compact {_x(s['compact'])} of dense"
    what = row.get("shape") or row["model"]
    ceiling = s["graph"].get("bmm_only")
    return (
        f"{what} {row['dtype']} batch={row['batch']}: packed {_x(s['eager']['packed'])} eager, "
        f"{_x(s['graph']['packed'])} graph" + ("" if ceiling is None else f" (block GEMM alone {_x(ceiling)} graph)")
    )


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def run_gpu_suite(
    profile: GpuProfile,
    *,
    device: str = "cuda",
    command: str = "mpdcompress bench --device cuda",
    on_row: Callable[[str, dict, dict], None] | None = None,
) -> dict:
    """Every section of ``profile``; ``on_row(section, row, result so far)`` after each measured
    row, so a caller can show it and write the partial result (a run cut short loses nothing)."""
    result: dict = {
        "suite": "gpu",
        "command": command,
        "machine": describe_machine(device),
        "profile": asdict(profile),
        "layers": [],
        "models": [],
        "training": [],
    }

    def recorder(section: str) -> Record:
        def record(row: dict) -> None:
            result[section].append(row)
            if on_row is not None:
                on_row(section, row, result)

        return record

    run_gpu_layers(profile, device, recorder("layers"))
    run_gpu_models(profile, device, recorder("models"))
    run_gpu_training(profile, device, recorder("training"))
    return result
