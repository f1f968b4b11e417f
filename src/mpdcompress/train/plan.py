"""What a training run will do and cost, before it runs: ``--dry-run`` and ``--estimate``."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..core.layout import BlockLayout
from ..data.datasets import dataset_spec
from ..errors import ConfigError
from ..models import build_model, paper_filter
from .config import TrainConfig
from .inputs import step_plan

__all__ = ["TrainPlan", "make_plan", "estimate_step_seconds"]


@dataclass
class TrainPlan:
    """The whole plan of a training run (data, steps, batches, devices), as ``--dry-run`` prints it."""

    model: str
    dataset: str
    data_location: str
    data_present: bool
    compression: int | None
    mode: str
    precision: str
    parameters_dense: int
    parameters_trained: int  # what the optimizer updates: every weight when masked, the blocks when compact
    fc_weights_dense: int
    fc_weights_kept: int
    train_images: int
    epochs: int
    steps_per_epoch: int
    total_steps: int
    world_size: int
    global_batch: int
    micro_batch: int
    accumulation: int
    optimizer: str
    lr: float
    lr_schedule: str
    momentum: float
    weight_decay: float


def _parameter_counts(config: TrainConfig) -> tuple[int, int, int, int]:
    with torch.device("meta"):
        model = build_model(config.model)
    keep = paper_filter(model, config.model)
    dense_total = sum(p.numel() for p in model.parameters())
    fc_dense = fc_kept = removed = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        fc_dense += module.weight.numel()
        if config.compression and keep(module, name):
            layout = BlockLayout.create(module.out_features, module.in_features, config.compression)
            fc_kept += layout.nnz
            if config.mode == "compact":  # only the (padded) blocks are parameters
                removed += module.weight.numel() - layout.padded_numel
        else:
            fc_kept += module.weight.numel()
    return dense_total, dense_total - removed, fc_dense, fc_kept


def make_plan(config: TrainConfig, world_size: int = 1) -> TrainPlan:
    """The whole run laid out: sizes, steps, batch split and schedule. Needs no data."""
    config = config.resolved()
    dataset = dataset_spec(config.dataset)
    location, present = dataset.locate(config.data_root)
    images = dataset.train_images
    if config.train_limit:
        images = min(images, config.train_limit)
    steps = step_plan(config.batch_size, config.micro_batch, world_size, images)
    dense, trained, fc_dense, fc_kept = _parameter_counts(config)
    schedule = (
        f"x0.1 every {config.lr_step_epochs} epochs"
        if config.lr_step_epochs and config.lr_step_epochs < config.epochs
        else "constant"
    )
    return TrainPlan(
        model=config.model,
        dataset=config.dataset,
        data_location=location,
        data_present=present,
        compression=config.compression,
        mode=config.mode,
        precision=config.precision,
        parameters_dense=dense,
        parameters_trained=trained,
        fc_weights_dense=fc_dense,
        fc_weights_kept=fc_kept,
        train_images=images,
        epochs=config.epochs,
        steps_per_epoch=steps.steps_per_epoch,
        total_steps=steps.steps_per_epoch * config.epochs,
        world_size=world_size,
        global_batch=steps.global_batch,
        micro_batch=steps.micro_batch,
        accumulation=steps.accumulation,
        optimizer=config.optimizer,
        lr=config.lr,
        lr_schedule=schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def estimate_step_seconds(config: TrainConfig, *, steps: int = 5, warmup: int = 2) -> list[float]:
    """Seconds of each of ``steps`` real optimizer steps (after ``warmup`` untimed ones), data
    loading included, measured on rank 0 when run under torchrun. Needs the data (or ``fake``)."""
    from .loop import train

    if warmup < 1 or steps < 1:
        raise ConfigError("estimate needs at least one warm-up step and one timed step")
    stamps: list[float] = []

    def progress(event: dict) -> None:
        if event["event"] == "step":
            stamps.append(time.perf_counter())

    train(config, progress=progress, max_steps=warmup + steps)
    return [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:])]
