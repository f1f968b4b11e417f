"""The whole benchmark run behind ``mpdcompress bench`` and ``benchmarks/run_bench.py``."""

from __future__ import annotations

from typing import Callable

import torch

from ..models import MODELS
from .layer import LAYER_SHAPES, run_layer_bench
from .machine import describe_machine
from .memory import peak_rss_bytes
from .model import run_model_bench
from .training import run_training_bench

__all__ = ["run_suite", "QUICK", "FULL"]

FULL = {
    "shapes": LAYER_SHAPES,
    "factors": (4, 8, 10, 16),
    "batches": (1, 16, 64, 512),
    "models": tuple(MODELS),
    "model_batches": {True: (1, 64, 512), False: (1, 64)},
    "rss_models": ("lenet300", "alexnet-fc", "alexnet-bn"),
    "onnx_models": ("lenet300", "alexnet-fc", "transformer-mlp"),
    "onnx_batches": (1, 64),
    "training_models": ("lenet300", "alexnet-fc", "transformer-mlp"),
    "training_factors": (4, 8, 16),
    "training_batches": {"lenet300": 50, "alexnet-fc": 512, "transformer-mlp": 512},
    "repeats": 7,
}
QUICK = {
    "shapes": [s for s in LAYER_SHAPES if s[0] in ("lenet-fc1", "alexnet-fc7", "transformer-mlp-up")],
    "factors": (8,),
    "batches": (1, 64),
    "models": ("lenet300", "transformer-mlp"),
    "model_batches": {True: (1, 64), False: (1,)},
    "rss_models": (),
    "onnx_models": ("lenet300",),
    "onnx_batches": (16,),
    "training_models": ("lenet300",),
    "training_factors": (8,),
    "training_batches": {"lenet300": 50},
    "repeats": 5,
}


def run_suite(
    config: dict,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    command: str = "mpdcompress bench",
    progress: Callable[[str], None] | None = None,
) -> dict:
    result: dict = {"command": command, "machine": describe_machine(device), "dtype": str(dtype), "repeats": config["repeats"]}
    result["compile_mode"] = config.get("compile_mode")
    result["layers"] = run_layer_bench(
        config["shapes"], config["factors"], config["batches"], dtype=dtype, device=device,
        repeats=config["repeats"], progress=progress,
    )
    result["models"] = run_model_bench(
        config["models"], config["model_batches"], device=device, repeats=config["repeats"],
        compile_mode=config.get("compile_mode"), progress=progress,
    ) if dtype == torch.float32 else []
    rss = []
    if config["rss_models"] and device == "cpu":
        baseline = peak_rss_bytes("", "baseline", 1)
        for name in config["rss_models"]:
            for form in ("dense", "packed"):
                peak = peak_rss_bytes(name, form, 64)
                rss.append({"model": name, "form": form, "bytes": peak, "over_baseline": peak - baseline})
                if progress is not None:
                    progress(f"peak RSS {name}/{form}: {peak / 2**20:.0f} MiB")
    result["peak_rss"] = rss
    result["training"] = run_training_bench(
        config["training_models"], config["training_factors"], config["training_batches"],
        repeats=max(3, config["repeats"] // 2), device=device, progress=progress,
    ) if config.get("training_models") and dtype == torch.float32 else []
    result["onnx"] = []
    if config.get("onnx_models") and device == "cpu" and dtype == torch.float32:
        try:
            from .onnx_bench import run_onnx_bench
        except ImportError:
            result["onnx_note"] = "onnxruntime is not installed (pip install 'mpdcompress[onnx]')"
        else:
            result["onnx"] = run_onnx_bench(config["onnx_models"], config["onnx_batches"],
                                            repeats=config["repeats"], progress=progress)
    return result
