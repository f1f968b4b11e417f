"""Block reconstruction: tune a compressed model's kept weights, one block at a time, so that
each block gives the dense block's output.

:func:`~mpdcompress.posthoc.calibrate.refit_` fits each compressed layer to its dense layer's output by
least squares, which is exact for one layer but blind to what follows it: the error a first MLP
layer leaves passes through a non-linearity before the second layer sees it. Here the unit is a
block (a transformer layer, say): its compressed layers are tuned together with Adam, on the
inputs the already-tuned student gives the block, to the output the teacher's block gives on the
teacher's inputs, so each block also corrects what the blocks before it left (as BRECQ does for
quantization). Nothing else is trained: only the kept weights and biases of compressed layers
inside the block move, and the masks do not change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..core.convert import compressed_layers
from ..errors import CompressionError, ConfigError
from ..nn import MaskedWeight
from ..progress import Progress, reporting
from .distill import distillation_loss
from .taps import evaluating, paired_calls, reiterable, run

__all__ = ["default_blocks", "reconstruct_"]


def default_blocks(model: nn.Module) -> list[str]:
    """The blocks that hold ``model``'s compressed layers: the innermost elements of a
    ``ModuleList`` around them (a transformer's layers), sorted by name; ``[""]`` (the whole
    model) when no list holds any. A compressed layer outside every list is left out: alone, it
    is one linear layer, which :func:`~mpdcompress.posthoc.calibrate.refit_` already fits exactly."""
    modules = dict(model.named_modules())
    blocks = set()
    for name in compressed_layers(model):
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if isinstance(modules[".".join(parts[: end - 1])], nn.ModuleList):
                blocks.add(".".join(parts[:end]))
                break
    return sorted(blocks) or [""]


def _captured(model: nn.Module, block: nn.Module, batches: Sequence, calls: list[int], read: str) -> list[Any]:
    """What ``block`` reads or gives (``read`` as for :func:`~mpdcompress.posthoc.taps.run`) at each of
    its calls over ``batches``; taken without gradients, so nothing holds on to a graph."""
    got: list[Any] = []
    for batch, times in zip(batches, calls):
        if times:
            run(model, [batch], {block: got.append}, stop_after=times, read=read)
    return got


def _stateful(value: Any) -> str | None:
    """The type name of the first value in ``value`` that is not plain data (a tensor, number,
    string, None, or a tuple, list or dict of them), or None."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return next((found for v in value if (found := _stateful(v)) is not None), None)
    return type(value).__name__


def _check_replayable(name: str, inputs: list[Any]) -> None:
    # Tuning calls the block again and again with the arguments of the real calls; an object
    # the block changes when it runs (a key-value cache that grows with each call) would make
    # every replay see another input than the real forward did, and the fit silently wrong.
    for args, kwargs in inputs:
        for key, value in [*enumerate(args), *kwargs.items()]:
            kind = _stateful(value)
            if kind is not None:
                raise CompressionError(
                    f"block {name!r} is called with {key}={kind}, an object its calls may change, so "
                    "its calls cannot be replayed: calibrate with batches that leave it out (for "
                    "transformers models, put use_cache=False in each batch)"
                )


def _error(block: nn.Module, inputs: list[Any], targets: list[Any]) -> float:
    with torch.no_grad():
        errors = [distillation_loss(block(*a, **k), t, logits=()).item() for (a, k), t in zip(inputs, targets)]
    return sum(errors) / len(errors)


def _tune(block: nn.Module, inputs: list[Any], targets: list[Any], steps: int, lr: float, seed: int) -> None:
    layers = [m for m in block.modules() if isinstance(m, MaskedWeight)]
    params = [p for layer in layers for p in layer.parameters()]
    tuned = {id(p) for p in params}
    frozen = [p for p in block.parameters() if p.requires_grad and id(p) not in tuned]
    for p in frozen:  # the block's other weights take no gradient and stay as they are
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(inputs), generator=generator).tolist()
                i = order.pop()
                args, kwargs = inputs[i]
                loss = distillation_loss(block(*args, **kwargs), targets[i], logits=())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p in params:
            p.grad = None
    with torch.no_grad():
        for layer in layers:
            layer.apply_mask_()


def reconstruct_(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    *,
    blocks: Sequence[str] | None = None,
    steps: int = 600,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Progress = None,
) -> nn.Module:
    """Tune the kept weights of ``student``'s compressed layers (masked form) block by block to
    the same-named blocks of ``teacher`` on ``batches`` (see the module's description): ``steps``
    Adam steps per block at ``lr`` (cosine decay), one calibration call of the block per step.
    ``blocks`` names them (default :func:`default_blocks`). ``progress`` receives ``{"block",
    "index", "blocks", "error_before", "error_after"}`` (the block's relative squared error over
    all calls) after each block (see :mod:`mpdcompress.progress`; by default a bar when standard
    error is a terminal; the errors cost a pass and are measured only for a function). Returns
    ``student``."""
    if steps < 1 or not lr > 0:
        raise ConfigError(f"steps must be at least 1 and lr positive, got steps={steps!r}, lr={lr!r}")
    if student is teacher:
        raise ConfigError("the student must be a separate (compressed) copy of the teacher")
    if not any(isinstance(m, MaskedWeight) for m in compressed_layers(student).values()):
        raise CompressionError("the student has no masked MPD layer to tune (reconstruct before pack)")
    names = list(default_blocks(student) if blocks is None else blocks)
    mine, theirs = {}, {}
    for name in names:
        for model, found, whose in ((student, mine, "student"), (teacher, theirs, "teacher")):
            try:
                found[name] = model.get_submodule(name)
            except AttributeError:
                raise CompressionError(f"the {whose} has no block {name!r}") from None
    batches = list(reiterable(batches))
    measured = callable(progress)
    with evaluating(teacher, student), reporting(progress, "tuning", "block", done="index", total="blocks") as report:
        order, calls = paired_calls(student, teacher, batches, mine, theirs, "blocks")
        for index, name in enumerate(order):
            inputs = _captured(student, mine[name], batches, calls[name], "call")
            _check_replayable(name, inputs)
            targets = _captured(teacher, theirs[name], batches, calls[name], "output")
            before = _error(mine[name], inputs, targets) if measured else None
            _tune(mine[name], inputs, targets, steps, lr, seed + index)
            if report is not None:
                after = _error(mine[name], inputs, targets) if measured else None
                report(
                    {
                        "block": name,
                        "index": index + 1,
                        "blocks": len(order),
                        "error_before": before,
                        "error_after": after,
                    }
                )
    return student
