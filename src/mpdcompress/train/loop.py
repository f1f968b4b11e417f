"""The training loop, for one process or many (torchrun + ``DistributedDataParallel``).

Deterministic and resumable: the data order of every epoch comes from ``(seed, epoch)``, a
checkpoint records the position down to the optimizer step, and resuming continues as if the
run had never stopped. Under torchrun, every rank runs this same function: only rank 0 reports
progress and writes checkpoints, gradients are averaged by DDP, and a global batch is split over
processes and gradient-accumulation steps so that each optimizer step sees the same images as a
single process with the whole batch.
"""

from __future__ import annotations

import inspect
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..core.convert import mpdify_
from ..core.qat import fake_quantize_
from ..data.sources import Split
from ..errors import ConfigError, TrainingDiverged
from ..models import build_model, fc_weights_kept, paper_filter, scale_widths
from ..progress import Progress, reporting
from .checkpoint import CHECKPOINT_NAME, read_checkpoint, write_checkpoint
from .config import TrainConfig
from .distributed import (
    DistContext,
    any_rank,
    barrier,
    collective,
    gather_over_ranks,
    sum_over_ranks,
    verify_identical_masks,
)
from .inputs import batch_loader, open_datasets, prepare, rank_micro_batches, step_plan

__all__ = ["TrainResult", "TrainingInterrupted", "train", "evaluate", "build_for"]

# Under DDP, ranks agree on stopping with a collective; doing that every few steps keeps a GPU
# run from waiting on the host after every step.
STOP_CHECK_EVERY = 10
LOSS_REPORT_EVERY = 10


class TrainingInterrupted(Exception):
    """Training stopped on request (SIGTERM, Ctrl-C) after saving a checkpoint it can resume from."""

    def __init__(self, epoch: int, step: int, checkpoint: Path | None) -> None:
        where = f"; resume from {checkpoint}" if checkpoint else " (no checkpoint directory: progress is lost)"
        super().__init__(f"stopped at epoch {epoch + 1}, step {step}{where}")
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint


@dataclass
class TrainResult:
    """What a training run produced: its config, per-epoch history, test accuracy, sizes and time."""

    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    test_accuracy: float = float("nan")
    fc_weights: int = 0
    seconds: float = 0.0
    world_size: int = 1
    model: nn.Module | None = None


def build_for(config: TrainConfig) -> nn.Module:
    """The model a TrainConfig describes, compressed as it says, from its seed."""
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    if config.width != 1.0:
        model = scale_widths(model, config.width)
    if config.compression:
        model = mpdify_(
            model,
            config.compression,
            filter_fn=paper_filter(model, config.model),
            seed=config.mask_seed,
            permute=config.permute,
            convs=config.compress_convs,
            shared_streams=config.shared_streams,
            mode=config.mode,
            init=config.init,
        )
    if config.qat:
        fake_quantize_(model, config.qat)
    return model


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    raise ConfigError(f"unknown optimizer {config.optimizer!r}; use 'adam' or 'sgd'")


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    dataset: str,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    batch_size: int = 1000,
    workers: int = 0,
) -> float:
    """Top-1 accuracy of ``model`` on an image source; under DDP each rank scores a slice."""
    ctx = DistContext.current()
    device = torch.device(device)
    n = len(data)
    lo, hi = n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size
    chunks = [list(range(s, min(s + batch_size, hi))) for s in range(lo, hi, batch_size)]
    was_training = model.training
    model.eval()
    correct = 0
    for images, labels in batch_loader(data, chunks, workers=workers, pin_memory=device.type == "cuda"):
        with _autocast(device, precision):
            logits = model(prepare(images.to(device), dataset))
        correct += int((logits.argmax(1).cpu() == labels).sum())
    model.train(was_training)
    (total_correct,) = sum_over_ranks([correct], ctx)
    return total_correct / n


def _wrap_ddp(net: nn.Module, device: torch.device) -> DistributedDataParallel:
    # No buffer broadcast in every forward: the index buffers are large and constant, and
    # BatchNorm statistics stay per rank (rank 0's are the ones saved), as with DDP's default.
    # torch 2.13 renamed the switch.
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def _restore_rng(state: dict[str, Any], ctx: DistContext, device: torch.device) -> None:
    rng, cuda_rng = state["rng"], state.get("cuda_rng")
    if len(rng) != ctx.world_size:
        warnings.warn(
            f"the checkpoint was written by {len(rng)} processes and this run has {ctx.world_size}: "
            "data order and weights continue exactly, random draws such as dropout do not",
            stacklevel=3,
        )
        return
    torch.set_rng_state(rng[ctx.rank].cpu())
    if cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rng[ctx.rank].cpu(), device)


def train(
    config: TrainConfig,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: Progress = None,
    train_split: Split | None = None,
    test_split: Split | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``; returns history, test accuracy and the model.

    Run it in every process of a job whose process group is initialized (see
    :func:`~mpdcompress.train.distributed.init_from_env`) to train with DDP.

    ``progress`` (rank 0 only) receives ``{"event": "step", ...}`` (``run_step`` of ``run_steps``
    counts the whole run) and ``{"event": "epoch", ...}`` dicts; see :mod:`mpdcompress.progress`
    (by default a bar when standard error is a terminal). With ``checkpoint_dir``, a checkpoint is written after every epoch (and every
    ``config.checkpoint_every`` steps); ``resume=True`` continues from it and refuses one made
    with a different configuration. When ``should_stop()`` turns true on any rank, all ranks save
    a checkpoint at the same step and :class:`TrainingInterrupted` is raised. ``max_steps`` ends
    the run after that many optimizer steps without evaluating (for timing).
    """
    ctx = DistContext.current()
    with reporting(
        progress if ctx.is_main else False, "training", "step", done="run_step", total="run_steps"
    ) as report:
        return _train(config, checkpoint_dir, resume, report, train_split, test_split, should_stop, max_steps)


def _train(
    config: TrainConfig,
    checkpoint_dir: str | os.PathLike | None,
    resume: bool,
    progress: Callable[[dict[str, Any]], None] | None,
    train_split: Split | None,
    test_split: Split | None,
    should_stop: Callable[[], bool] | None,
    max_steps: int | None,
) -> TrainResult:
    config = config.resolved()
    ctx = DistContext.current()
    device = ctx.device(config.device)
    train_data, test_data = open_datasets(config, train_split, test_split)
    plan = step_plan(config.batch_size, config.micro_batch, ctx.world_size, len(train_data))
    net = build_for(config).to(device)
    if ctx.rank:
        torch.manual_seed(config.seed * 7919 + ctx.rank)  # dropout must not repeat across ranks
    opt = _optimizer(config, net)
    sched = torch.optim.lr_scheduler.StepLR(opt, config.lr_step_epochs, 0.1) if config.lr_step_epochs else None
    result = TrainResult(config=asdict(config), world_size=ctx.world_size)
    start_epoch = start_step = 0
    carried_loss: tuple[float, int] = (0.0, 0)  # loss sum and micro-batch count of an unfinished epoch
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if resume:
        state = read_checkpoint(ckpt_path, config, device)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        _restore_rng(state, ctx, device)
        start_epoch, start_step = state["epoch"], state["step"]
        carried_loss = (float(state["epoch_loss"][0]), int(state["epoch_loss"][1]))
        result.history = list(state["history"])
        result.seconds = float(state["seconds"])
    elif ckpt_path is not None and ctx.is_main:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    verify_identical_masks(net, ctx)
    ddp = _wrap_ddp(net, device) if ctx.distributed else None
    model = ddp or net
    if config.compile:
        model = torch.compile(model)
    pin = device.type == "cuda"

    def save(epoch: int, step: int, epoch_loss: tuple[float, int], seconds: float) -> None:
        # Collective: every rank contributes its random state and its mask fingerprints.
        verify_identical_masks(net, ctx)
        rng = gather_over_ranks(torch.get_rng_state(), ctx)
        cuda_rng = gather_over_ranks(torch.cuda.get_rng_state(device), ctx) if device.type == "cuda" else None
        if ctx.is_main:
            write_checkpoint(
                ckpt_path,
                {
                    "config": asdict(config),
                    "model": net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched else None,
                    "rng": rng,
                    "cuda_rng": cuda_rng,
                    "epoch": epoch,
                    "step": step,
                    "epoch_loss": list(epoch_loss),
                    "history": result.history,
                    "seconds": seconds,
                },
            )

    steps_run = 0
    for epoch in range(start_epoch, config.epochs):
        began = time.perf_counter()
        first_step = start_step if epoch == start_epoch else 0
        loss_sum, micro_count = carried_loss if epoch == start_epoch else (0.0, 0)
        loss_acc = torch.tensor(loss_sum, dtype=torch.float64, device=device)
        net.train()
        train_data.set_epoch(epoch)
        batches = rank_micro_batches(len(train_data), plan, ctx.rank, config.seed, epoch)
        loader = batch_loader(
            train_data, batches[first_step * plan.accumulation :], workers=config.workers, pin_memory=pin
        )
        step = first_step
        with collective(f"train epoch {epoch + 1}") if ctx.distributed else nullcontext():
            for k, (images, labels) in enumerate(loader):
                x = prepare(images.to(device, non_blocking=pin), config.dataset)
                y = labels.to(device, non_blocking=pin)
                closes_step = (k + 1) % plan.accumulation == 0
                with ddp.no_sync() if ddp is not None and not closes_step else nullcontext():
                    with _autocast(device, config.precision):
                        loss = nn.functional.cross_entropy(model(x), y)
                    (loss / plan.accumulation if plan.accumulation > 1 else loss).backward()
                loss_acc += loss.detach().double()
                micro_count += 1
                if not closes_step:
                    continue
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                steps_run += 1
                if progress is not None and ctx.is_main:
                    report = step % LOSS_REPORT_EVERY == 0 or step == plan.steps_per_epoch
                    progress(
                        {
                            "event": "step",
                            "epoch": epoch,
                            "step": step,
                            "steps_per_epoch": plan.steps_per_epoch,
                            "run_step": epoch * plan.steps_per_epoch + step,
                            "run_steps": config.epochs * plan.steps_per_epoch,
                            "loss": loss.item() if report else None,
                        }
                    )
                if max_steps is not None and steps_run >= max_steps:
                    result.model = net
                    return result
                # Both conditions are the same on every rank, so all ranks join the same collectives.
                stop = (
                    should_stop is not None
                    and (not ctx.distributed or step % STOP_CHECK_EVERY == 0)
                    and any_rank(should_stop(), ctx)
                )
                due = (
                    bool(config.checkpoint_every)
                    and step % config.checkpoint_every == 0
                    and step < plan.steps_per_epoch
                )
                if ckpt_path is not None and (stop or due):
                    loss_sum = loss_acc.item()
                    _check_finite(loss_sum, epoch, step, ckpt_path)
                    save(epoch, step, (loss_sum, micro_count), result.seconds + time.perf_counter() - began)
                if stop:
                    barrier(ctx)  # nobody exits (and gets the job torn down) before rank 0 wrote
                    raise TrainingInterrupted(epoch, step, ckpt_path)
            if sched is not None:
                sched.step()
            loss_total, micro_total = sum_over_ranks([loss_acc.item(), micro_count], ctx)
            _check_finite(loss_total, epoch, step, ckpt_path)  # the same sum on every rank
            accuracy = evaluate(
                net, test_data, config.dataset, device=device, precision=config.precision, workers=config.workers
            )
            result.seconds += time.perf_counter() - began
            result.history.append(
                {"epoch": epoch + 1, "train_loss": loss_total / max(micro_total, 1), "test_accuracy": accuracy}
            )
            if ckpt_path is not None:
                save(epoch + 1, 0, (0.0, 0), result.seconds)
        if progress is not None and ctx.is_main:
            progress({"event": "epoch", **result.history[-1]})
    result.test_accuracy = result.history[-1]["test_accuracy"] if result.history else float("nan")
    result.fc_weights = fc_weights_kept(net)
    result.model = net
    return result


def _check_finite(loss_sum: float, epoch: int, step: int, ckpt_path: Path | None) -> None:
    """Stop before a diverged model is checkpointed or evaluated; the last checkpoint stays."""
    if not math.isfinite(loss_sum):
        kept = (
            f"; the last good checkpoint ({ckpt_path}) is kept" if ckpt_path is not None and ckpt_path.exists() else ""
        )
        raise TrainingDiverged(
            f"the training loss became {loss_sum} in epoch {epoch + 1} (by step {step}): the learning rate "
            f"is probably too high{kept}"
        )
