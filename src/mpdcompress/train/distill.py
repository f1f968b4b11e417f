"""Deprecated alias of :mod:`mpdcompress.posthoc.distill` (removed in 0.3)."""

from .._moved import moved
from ..posthoc.distill import *  # noqa: F403

__getattr__ = moved(__name__, "mpdcompress.posthoc.distill")
