"""Deprecated alias of :mod:`mpdcompress.posthoc.calibrate` (removed in 0.3)."""

from ._moved import moved
from .posthoc.calibrate import *  # noqa: F403

__getattr__ = moved(__name__, "mpdcompress.posthoc.calibrate")
