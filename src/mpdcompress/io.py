"""Deprecated alias of :mod:`mpdcompress.files.io` (removed in 0.3)."""

from ._moved import moved
from .files.io import *  # noqa: F403

__getattr__ = moved(__name__, "mpdcompress.files.io")
