"""Wall-clock timing helpers shared by the demo and the benchmark suite."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["median_seconds", "interleaved_medians", "synchronize", "cuda_medians"]


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work on ``device`` (all CUDA devices when None); nothing on a CPU."""
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


def cuda_medians(
    fns: dict[str, Callable[[], object]],
    *,
    graph: bool,
    repeats: int = 10,
    warmup: int = 3,
    target_seconds: float = 2e-3,
    max_inner: int = 50,
) -> dict[str, float | None]:
    """Median GPU time per call of each function, by CUDA events, sampled round-robin.

    ``graph=False`` times eager calls (host launch overhead included: a GPU that waits for the
    host shows it). ``graph=True`` captures ``inner`` calls in one CUDA graph and times its
    replay, which removes host overhead. A function that cannot be captured gets ``None``.
    """
    runners: dict[str, Callable[[], object]] = {}
    inner: dict[str, int] = {}
    for key, fn in fns.items():
        for _ in range(warmup):  # also triggers lazy work: autotuning, workspace allocation
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        one = max(time.perf_counter() - start, 1e-6)
        inner[key] = max(1, min(max_inner, int(target_seconds / one)))
        if not graph:
            runners[key] = lambda fn=fn, n=inner[key]: [fn() for _ in range(n)]
            continue
        try:
            g = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # warm-up on the capture stream, as torch.cuda.graphs advises
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(g):
                for _ in range(inner[key]):
                    fn()
            runners[key] = g.replay
        except RuntimeError:
            torch.cuda.synchronize()
            runners[key] = None
    samples: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, run in runners.items():
            if run is None:
                continue
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            run()
            end.record()
            end.synchronize()
            samples[key].append(begin.elapsed_time(end) / 1e3 / inner[key])
    return {key: (statistics.median(v) if v else None) for key, v in samples.items()}
