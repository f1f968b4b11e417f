"""Deprecated alias of :mod:`mpdcompress.core.roles` (removed in 0.3)."""

from ._moved import moved
from .core.roles import *  # noqa: F403

__getattr__ = moved(__name__, "mpdcompress.core.roles")
