"""Forward passes that read what chosen modules see or give, for the calibration steps.

Calibration runs a model over a few batches and records, at chosen modules, their inputs, their
whole calls or their outputs; it often needs only the part of the forward up to one module, so a
pass can stop there. Student and teacher are paired call by call, which needs both to run each
module equally often on each batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import CompressionError, ConfigError
from .distill import batch_to, model_outputs

__all__ = ["reiterable", "evaluating", "run", "call_counts", "check_calls", "paired_calls"]


def reiterable(batches: Iterable) -> Iterable:
    """``batches`` if it can be read more than once; a ConfigError for a one-shot iterator."""
    if iter(batches) is batches:
        raise ConfigError("calibration batches are read more than once: give a list or a DataLoader, not an iterator")
    return batches


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """``models`` in eval mode for the block, then back in the modes they were in."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


class _Enough(Exception):
    """Raised by a hook to end a forward pass whose remaining layers are not needed."""


def run(
    model: nn.Module,
    batches: Iterable,
    hooks: dict[nn.Module, Callable],
    stop_after: int | None = None,
    read: str = "input",
) -> None:
    """Run ``model`` over ``batches`` without gradients, calling ``hooks[module]`` every time a
    hooked module runs, with what ``read`` names: ``"input"`` its first argument, ``"call"`` its
    ``(args, kwargs)``, ``"output"`` its output. With ``stop_after`` (one hooked module), each
    forward ends once that module has run that many times: the rest of it is not needed."""

    def hook(f: Callable) -> Callable[[nn.Module], Any]:
        calls = 0

        def counted() -> None:
            nonlocal calls
            calls += 1
            if calls == stop_after:
                raise _Enough

        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:  # None: the call goes on unchanged
            if read == "input":
                f(args[0])
            else:
                f((args, kwargs))
            counted()

        def after(module: nn.Module, args: tuple, output: Any) -> None:
            f(output)
            counted()

        if read == "output":
            return lambda m: m.register_forward_hook(after)
        return lambda m: m.register_forward_pre_hook(before, with_kwargs=True)

    device = next(iter(model.parameters()), torch.empty(0)).device
    with torch.no_grad():
        for batch in batches:
            handles = [hook(f)(m) for m, f in hooks.items()]
            try:
                model_outputs(model, batch_to(batch, device))
            except _Enough:
                pass
            finally:
                for handle in handles:
                    handle.remove()


def call_counts(
    model: nn.Module, batches: Iterable, layers: dict[str, nn.Module]
) -> tuple[list[str], dict[str, list[int]]]:
    """The names of ``layers`` in the order the forward first reaches them, and how many times
    each runs on each batch."""
    order: list[str] = []
    calls: dict[str, list[int]] = {name: [] for name in layers}

    def count(name: str) -> None:
        calls[name][-1] += 1
        if name not in order:
            order.append(name)

    for batch in batches:
        for times in calls.values():
            times.append(0)
        run(model, [batch], {m: (lambda x, n=n: count(n)) for n, m in layers.items()})
    return order, calls


def check_calls(student: dict[str, list[int]], teacher: dict[str, list[int]]) -> None:
    """Refuse call counts (from :func:`call_counts`) that differ between student and teacher."""
    # Calls are paired in order: a module that runs another number of times in the teacher
    # would be fitted to the outputs of other calls.
    for name, times in student.items():
        for s, t in zip(times, teacher[name]):
            if s > t:
                raise CompressionError(
                    f"{name!r}: the student's module ran more often than the teacher's ({s} vs {t} times on a batch)"
                )
            if t > s:
                raise CompressionError(
                    f"{name!r} ran more often in the teacher than in the student ({t} vs {s} times on a batch)"
                )


def paired_calls(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    mine: dict[str, nn.Module],
    theirs: dict[str, nn.Module],
    what: str,
) -> tuple[list[str], dict[str, list[int]]]:
    """:func:`call_counts` of the student's modules ``mine``, refusing any the batches never
    reach (``what`` names them in the error) and any the teacher's same-named modules ``theirs``
    run another number of times."""
    order, calls = call_counts(student, batches, mine)
    missing = sorted(set(mine) - set(order))
    if missing:
        raise CompressionError(f"the calibration batches never reach these {what}: {missing}")
    check_calls(calls, call_counts(teacher, batches, theirs)[1])
    return order, calls
