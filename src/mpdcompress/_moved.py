"""Old import paths of modules that moved in 0.2, kept for one release with a DeprecationWarning."""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def moved(old: str, new: str) -> Callable[[str], Any]:
    """Warn that ``old`` moved to ``new``; returns a module ``__getattr__`` that forwards names
    the star import did not bring (private helpers) to ``new``."""
    warnings.warn(
        f"{old} moved to {new}; the old path is removed in mpdcompress 0.3 (most names are also in "
        "the top-level mpdcompress package)",
        DeprecationWarning,
        stacklevel=3,
    )
    target = importlib.import_module(new)

    def forward(name: str) -> Any:
        try:
            return getattr(target, name)
        except AttributeError:
            raise AttributeError(f"module {old!r} has no attribute {name!r}") from None

    return forward
