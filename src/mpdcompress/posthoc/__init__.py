"""Compressing models that are already trained: calibration (input moments, least-squares refit,
block tuning), distillation from the dense teacher, quantization with error feedback (GPTQ), the
forward taps they share, and helpers for pretrained sentence encoders."""

from .calibrate import compress_calibrated, input_moments, refit_
from .distill import DistillConfig, DistillResult, distill, distillation_loss
from .gptq import quantize_calibrated_
from .reconstruct import reconstruct_

__all__ = [
    "input_moments",
    "refit_",
    "compress_calibrated",
    "reconstruct_",
    "DistillConfig",
    "DistillResult",
    "distill",
    "distillation_loss",
    "quantize_calibrated_",
]
