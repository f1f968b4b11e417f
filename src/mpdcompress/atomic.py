"""Crash-safe file writes: the old file survives any failure before the final rename."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["write_atomic", "atomic_path"]

# A temporary file of ours untouched for this long belongs to a write that was killed.
_STALE_SECONDS = 3600


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _remove_stale_temps(path: Path) -> None:
    now = time.time()
    for old in path.parent.glob(f"{_temp_prefix(path)}*.tmp"):
        try:
            if now - old.stat().st_mtime > _STALE_SECONDS:
                old.unlink()
        except OSError:
            pass  # another process finished or removed it


def _final_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would give: the replaced file's, else 0666 & ~umask."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux reports it without changing it; os.umask() would, for every thread at once
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_path(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)`` (a writer that takes a path), then flush that file to disk
    and rename it over ``path``. On any error the temporary file is removed and ``path`` is left
    as it was. The file gets the permissions a plain write would give, not mkstemp's 0600;
    temporary files of earlier writes that were killed are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.close(fd)
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _final_mode(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``
    (see :func:`atomic_path`)."""

    def to_file(tmp: Path) -> None:
        with tmp.open("wb") as f:
            write(f)

    return atomic_path(path, to_file)
