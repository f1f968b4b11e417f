"""Deprecated alias of :mod:`mpdcompress.files.hf` (removed in 0.3)."""

from ._moved import moved
from .files.hf import *  # noqa: F403

__getattr__ = moved(__name__, "mpdcompress.files.hf")
