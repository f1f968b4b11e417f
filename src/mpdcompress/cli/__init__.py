"""The ``mpdcompress`` command line; the only code in the package that prints or exits."""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
