"""Benchmark suite: packed MPD layers and models side by side with the alternatives."""

from .layer import LAYER_SHAPES, layer_candidates, run_layer_bench
from .machine import describe_machine
from .memory import model_weight_bytes, peak_rss_bytes
from .model import run_model_bench

__all__ = [
    "LAYER_SHAPES",
    "layer_candidates",
    "run_layer_bench",
    "run_model_bench",
    "describe_machine",
    "model_weight_bytes",
    "peak_rss_bytes",
]
