"""Running one training job as several processes with ``torch.distributed`` (torchrun + DDP).

The job is whatever torchrun (or the user) started: :func:`init_from_env` joins the process
group that torchrun's environment describes, and :meth:`DistContext.current` tells the trainer
its rank. Everything here is a no-op for a single process.

How masks stay identical on every rank: each rank builds its masks from the same seed, and
:func:`verify_identical_masks` compares a fingerprint of every compressed layer's permutations
across ranks before training starts (before DDP could copy rank 0's buffers over a mismatch and
hide it), after a resume and at every checkpoint. DDP does not touch buffers during training
(no per-forward buffer sync), the mask buffers have no gradient and no optimizer sees them, so
nothing can make them drift.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, DistributedFailure, MaskMismatchError, first_line
from ..nn import BlockDiagonalLinear, MPDLinear

__all__ = [
    "DistContext",
    "init_from_env",
    "shutdown",
    "verify_identical_masks",
    "mask_fingerprints",
    "MaskMismatchError",
    "DistributedFailure",
    "any_rank",
    "barrier",
    "sum_over_ranks",
    "gather_over_ranks",
    "collective",
]


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job (rank, world size, local rank, backend); one process by default."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors.
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    @classmethod
    def current(cls) -> "DistContext":
        """This process's place in the initialized process group (a single process if none)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return cls(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())

    def device(self, requested: str) -> torch.device:
        """The device this rank trains on: ``cuda`` means this rank's local GPU."""
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_from_env(device: str, timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group described by torchrun's environment (NCCL for CUDA, gloo for CPU).

    Returns a single-process context when the process was not started by torchrun.
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but torch.cuda.is_available() is False")
    if not launched_by_torchrun():
        return DistContext()
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext.current()


def shutdown() -> None:
    """Leave the process group cleanly, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        # DDP's reducer keeps the process group alive through reference cycles; left to the
        # interpreter's final teardown, gloo's worker threads are destroyed while still joinable
        # and the rank aborts ("terminate called without an active exception", seen under load).
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective into :class:`DistributedFailure` that says what was going on."""
    try:
        yield
    except (MaskMismatchError, DistributedFailure):
        raise
    except RuntimeError as exc:
        raise DistributedFailure(
            f"rank {dist.get_rank()} could not {what}: another rank died, was killed or lost its connection "
            f"({first_line(exc)})"
        ) from exc


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (e.g. before the job ends, so no rank tears down early)."""
    if ctx.distributed:
        with collective("wait for the other ranks"):
            dist.barrier()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([int(flag)], device=ctx.comm_device)
    with collective("agree on stopping"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.comm_device)
    with collective("sum results over ranks"):
        dist.all_reduce(t)
    return t.tolist()


def gather_over_ranks(tensor: torch.Tensor, ctx: DistContext) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor, in rank order (on the CPU)."""
    if not ctx.distributed:
        return [tensor.cpu()]
    local = tensor.to(ctx.comm_device)
    out = [torch.empty_like(local) for _ in range(ctx.world_size)]
    with collective("gather state from every rank"):
        dist.all_gather(out, local)
    return [t.cpu() for t in out]


def mask_fingerprints(model: nn.Module) -> dict[str, int]:
    """Compressed layer name → 56-bit digest of its permutations and block count."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (MPDLinear, BlockDiagonalLinear)):
            h = hashlib.sha256()
            for t in (module.row_order, module.col_order, module.num_blocks):
                h.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
            out[name] = int.from_bytes(h.digest()[:7], "big")
    return out


def verify_identical_masks(model: nn.Module, ctx: DistContext) -> None:
    """Raise :class:`MaskMismatchError`, on every rank, if any rank's masks differ from rank 0's."""
    if not ctx.distributed:
        return
    prints = mask_fingerprints(model)
    counts = gather_over_ranks(torch.tensor([len(prints)]), ctx)
    if len({int(c) for c in counts}) > 1:
        raise MaskMismatchError(
            "ranks disagree on how many compressed layers the model has: "
            + ", ".join(f"rank {r}: {int(c)}" for r, c in enumerate(counts))
        )
    names = list(prints)
    table = gather_over_ranks(torch.tensor(list(prints.values()), dtype=torch.int64), ctx)
    for rank, row in enumerate(table[1:], start=1):
        for name, mine, theirs in zip(names, table[0].tolist(), row.tolist()):
            if mine != theirs:
                raise MaskMismatchError(
                    f"compressed layer {name!r}: rank {rank} built a different mask than rank 0 "
                    f"(fingerprints {theirs:014x} vs {mine:014x}). Every rank must use the same --seed/"
                    "--mask-seed, compression and mpdcompress version"
                )
