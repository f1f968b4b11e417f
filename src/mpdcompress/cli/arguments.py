"""Argument types of the command line: values that make no sense are refused at parse time,
with argparse's one-line usage error (exit status 2)."""

from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "opset", "seed", "device_name"]


def _number(kind, text: str, ok, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _number(int, text, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _number(int, text, lambda v: v >= 0, "a non-negative integer")


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    return _number(float, text, lambda v: math.isfinite(v) and v > 0, "a finite number above 0")


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    return _number(float, text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def opset(text: str) -> int:
    """argparse type: an ONNX opset this torch can export."""
    from ..files.onnx import MIN_OPSET, max_opset

    top = max_opset()
    return _number(
        int, text, lambda v: MIN_OPSET <= v <= top, f"an ONNX opset this exporter writes ({MIN_OPSET}..{top})"
    )


def seed(text: str) -> int:
    """argparse type: a seed in 0..MAX_SEED."""
    from ..core.config import MAX_SEED

    return _number(int, text, lambda v: 0 <= v <= MAX_SEED, "a seed from 0 to 2**63 - 1")


def device_name(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (whether CUDA is there is checked when it is used)."""
    from ..core.config import checked_device
    from ..errors import ConfigError

    try:
        checked_device(text, "", available=False)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None
    return text


def quantization(text: str):
    """A :class:`~mpdcompress.QuantConfig` name (int8, int8-dynamic, int4, int4-g64-asym...)."""
    from ..core.quantize import QuantConfig
    from ..errors import ConfigError

    try:
        return QuantConfig.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
