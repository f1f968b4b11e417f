"""What every study script does around its study: time it, note the machine, and write
``results.json`` and ``report.md`` (atomically) with the command that made them."""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..bench.machine import describe_machine

__all__ = ["command_line", "timed_study", "write_study"]


def command_line(script: str, argv: list[str]) -> str:
    """How the study was run, as a user would type it again."""
    return " ".join(["python", script, *(shlex.quote(a) for a in argv)])


def timed_study(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s results with the machine (CPU) and the wall seconds it took."""
    started = time.perf_counter()
    results = run()
    results["machine"] = describe_machine("cpu")
    results["wall_seconds"] = time.perf_counter() - started
    return results


def write_study(out: str | Path, results: dict[str, Any], report: str) -> Path:
    """Write ``results.json`` and ``report.md`` into ``out``; returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", lambda f: f.write(json.dumps(results, indent=1).encode()))
    write_atomic(out / "report.md", lambda f: f.write(report.encode()))
    return out
