"""The whole benchmark run behind ``mpdcompress bench`` and ``benchmarks/run_bench.py``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..models import MODELS
from .layer import LAYER_SHAPES, run_layer_bench
from .machine import describe_machine
from .memory import peak_rss_bytes
from .model import run_model_bench
from .training import run_training_bench

__all__ = ["run_suite", "BenchProfile", "QUICK", "FULL"]


@dataclass(frozen=True)
class BenchProfile:
    """What one CPU benchmark run measures."""

    shapes: tuple[tuple[str, int, int], ...] = tuple(LAYER_SHAPES)
    factors: tuple[int, ...] = (4, 8, 10, 16)
    batches: tuple[int, ...] = (1, 16, 64, 512)
    models: tuple[str, ...] = tuple(MODELS)
    model_batches_fc: tuple[int, ...] = (1, 64, 512)  # FC-only models
    model_batches_conv: tuple[int, ...] = (1, 64)  # models with convolutions
    rss_models: tuple[str, ...] = ("lenet300", "alexnet-fc", "alexnet-bn")
    onnx_models: tuple[str, ...] = ("lenet300", "alexnet-fc", "transformer-mlp")
    onnx_batches: tuple[int, ...] = (1, 64)
    training_models: tuple[str, ...] = ("lenet300", "alexnet-fc", "transformer-mlp")
    training_factors: tuple[int, ...] = (4, 8, 16)
    training_batches: tuple[tuple[str, int], ...] = (("lenet300", 50), ("alexnet-fc", 512), ("transformer-mlp", 512))
    repeats: int = 7
    compile_mode: str | None = None


FULL = BenchProfile()
QUICK = BenchProfile(
    shapes=tuple(s for s in LAYER_SHAPES if s[0] in ("lenet-fc1", "alexnet-fc7", "transformer-mlp-up")),
    factors=(8,),
    batches=(1, 64),
    models=("lenet300", "transformer-mlp"),
    model_batches_fc=(1, 64),
    model_batches_conv=(1,),
    rss_models=(),
    onnx_models=("lenet300",),
    onnx_batches=(16,),
    training_models=("lenet300",),
    training_factors=(8,),
    training_batches=(("lenet300", 50),),
    repeats=5,
)


def run_suite(
    config: BenchProfile,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    command: str = "mpdcompress bench",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the CPU-style suite (layers, whole models, training steps) side by side; returns its result dict."""
    result: dict = {
        "command": command,
        "machine": describe_machine(device),
        "dtype": str(dtype),
        "repeats": config.repeats,
        "compile_mode": config.compile_mode,
        "profile": asdict(config),
    }
    result["layers"] = run_layer_bench(
        config.shapes,
        config.factors,
        config.batches,
        dtype=dtype,
        device=device,
        repeats=config.repeats,
        progress=progress,
    )
    result["models"] = (
        run_model_bench(
            config.models,
            {True: config.model_batches_fc, False: config.model_batches_conv},
            device=device,
            repeats=config.repeats,
            compile_mode=config.compile_mode,
            progress=progress,
        )
        if dtype == torch.float32
        else []
    )
    rss = []
    if config.rss_models and device == "cpu":
        baseline = peak_rss_bytes("", "baseline", 1)
        for name in config.rss_models:
            for form in ("dense", "packed"):
                peak = peak_rss_bytes(name, form, 64)
                rss.append({"model": name, "form": form, "bytes": peak, "over_baseline": peak - baseline})
                if progress is not None:
                    progress(f"peak RSS {name}/{form}: {peak / 2**20:.0f} MiB")
    result["peak_rss"] = rss
    result["training"] = (
        run_training_bench(
            config.training_models,
            config.training_factors,
            dict(config.training_batches),
            repeats=max(3, config.repeats // 2),
            device=device,
            progress=progress,
        )
        if config.training_models and dtype == torch.float32
        else []
    )
    result["onnx"] = []
    if config.onnx_models and device == "cpu" and dtype == torch.float32:
        try:
            from .onnx_bench import run_onnx_bench
        except ImportError:
            result["onnx_note"] = "onnxruntime is not installed (pip install 'mpdcompress[onnx]')"
        else:
            result["onnx"] = run_onnx_bench(
                config.onnx_models, config.onnx_batches, repeats=config.repeats, progress=progress
            )
    return result
