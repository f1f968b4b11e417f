"""Crash-safe file writes: the old file survives any failure before the final rename."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import ConfigError

__all__ = ["write_atomic", "atomic_path"]

# A temporary file of ours untouched for this long belongs to a write that was killed.
_STALE_SECONDS = 3600


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours to signal
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files of earlier writes to ``path`` that were killed: at once when the
    writing process (named in the file name) is gone, else once they are an hour old."""
    now, prefix = time.time(), _temp_prefix(path)
    for old in path.parent.glob(f"{prefix}*.tmp"):
        writer = old.name[len(prefix) :].split(".")[0]
        try:
            dead = writer.isdigit() and int(writer) != os.getpid() and not _alive(int(writer))
            if dead or now - old.stat().st_mtime > _STALE_SECONDS:
                old.unlink()
        except OSError:
            pass  # another process finished or removed it


def _check_target(given: str | os.PathLike) -> Path:
    """The path to write, or ConfigError naming what is wrong with the user's path."""
    if os.fspath(given).strip() in ("", "."):  # Path("") reads as "."
        raise ConfigError("the output path is empty: give the path of a file to write")
    path = Path(given)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the path of a file to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cannot write {path}: {parent} is a file, not a folder")
            break
    return path


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
    path = _check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    # The writer's pid in the name tells a later write whether this one is still running.
    fd, name = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=path.parent)
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
