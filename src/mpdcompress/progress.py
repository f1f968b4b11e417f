"""How the library's long calls (weight-chosen masks, calibration, block tuning, distillation)
show that they are alive.

Each such call takes ``progress``:

- a function: it receives the call's event dicts, and nothing is drawn (the CLI draws its own
  bars this way);
- ``True`` / ``False``: a progress bar on standard error, always / never;
- ``None`` (the default): a bar only when standard error is a terminal, so an interactive session
  sees that a minutes-long call is working while scripts whose output goes to a file or a pipe,
  and tests, stay silent. :func:`set_progress_bars` (or ``MPDCOMPRESS_PROGRESS=0`` / ``1`` in
  the environment) changes this default for the whole process; a notebook, whose standard error
  is no terminal, shows bars after ``set_progress_bars(True)``.

A bar goes to standard error and is gone when the call returns (``leave=False``); results are
never printed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import ConfigError

__all__ = ["Progress", "set_progress_bars", "progress_bars_enabled", "reporting"]

# What a long call's ``progress`` argument may be (see the module's description).
Progress = Callable[[dict[str, Any]], None] | bool | None

_ENV = "MPDCOMPRESS_PROGRESS"
_default: bool | None = None  # None: decided per call from the environment and the terminal


def set_progress_bars(enabled: bool | None) -> None:
    """Show bars for calls made with ``progress=None`` always (True), never (False), or only when
    standard error is a terminal (None, the default)."""
    global _default
    if enabled is not None and not isinstance(enabled, bool):
        raise ConfigError(f"set_progress_bars takes True, False or None, got {enabled!r}")
    _default = enabled


def progress_bars_enabled() -> bool:
    """Whether a call made with ``progress=None`` draws a bar now."""
    if _default is not None:
        return _default
    setting = os.environ.get(_ENV, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if setting:
        raise ConfigError(f"{_ENV} must be 0 or 1, got {setting!r}")
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


@contextmanager
def reporting(
    progress: Progress, description: str, unit: str, *, done: str, total: str
) -> Iterator[Callable[[dict[str, Any]], None] | None]:
    """The function a long call hands its events to (None when nobody listens): ``progress``
    itself when it is a function, else a bar that reads how far it is from each event's ``done``
    key and how far it goes from its ``total`` key (a ``loss``, if the event has one, is shown;
    events without ``done`` are not drawn)."""
    if callable(progress):
        yield progress
        return
    if progress is not None and not isinstance(progress, bool):
        raise ConfigError(f"progress must be a function, True, False or None, got {type(progress).__name__}")
    if not (progress_bars_enabled() if progress is None else progress):
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=description, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)

    def advance(event: dict[str, Any]) -> None:
        if done not in event:  # another kind of event (a trainer's end of epoch)
            return
        bar.total = event[total]
        if event.get("loss") is not None:
            bar.set_postfix(loss=f"{event['loss']:.4g}", refresh=False)
        bar.update(event[done] - bar.n)

    try:
        yield advance
    finally:
        bar.close()
