"""Deprecated alias of :mod:`mpdcompress.files.onnx` (removed in 0.3)."""

from ._moved import moved
from .files.onnx import *  # noqa: F403

__getattr__ = moved(__name__, "mpdcompress.files.onnx")
