"""Wall-clock timing helpers shared by the demo and the benchmark suite."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["median_seconds", "interleaved_medians", "synchronize"]


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def median_seconds(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    repeats: int = 15,
    min_time: float = 0.0,
    device: torch.device | str | None = "cpu",
) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls.

    With ``min_time``, each sample loops ``fn`` enough times to last about that long, so very
    fast calls are not dominated by timer resolution.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    inner = 1
    if min_time > 0:
        start = time.perf_counter()
        fn()
        synchronize(device)
        one = max(time.perf_counter() - start, 1e-7)
        inner = max(1, int(min_time / one))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 3,
    repeats: int = 15,
    min_time: float = 0.0,
    device: torch.device | str | None = "cpu",
) -> dict[str, float]:
    """Median wall time of each function, sampling them round-robin.

    Taking sample ``r`` of every candidate before sample ``r + 1`` of any spreads slow drifts of
    the machine (clock, the other core's load) over all candidates, so their ratios stay honest.
    """
    inner = {}
    for key, fn in fns.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        one = max(time.perf_counter() - start, 1e-7)
        inner[key] = max(1, int(min_time / one)) if min_time > 0 else 1
    samples: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[key]):
                fn()
            synchronize(device)
            samples[key].append((time.perf_counter() - start) / inner[key])
    return {key: statistics.median(v) for key, v in samples.items()}
