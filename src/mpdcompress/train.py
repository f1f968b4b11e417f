"""A small, deterministic, resumable trainer for the paper's experiments.

Checkpoints are written atomically at the end of every epoch (``checkpoint.pt``: model and
optimizer state, epoch, history and RNG state, loaded back with ``weights_only=True`` so no
code can run from it). Data order comes from a generator seeded by ``(seed, epoch)``, so a run
resumed from epoch ``k`` continues exactly as if it had never stopped.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .atomic import write_atomic
from .convert import mpdify
from .data import Split, load_dataset
from .models import INPUT_SHAPES, build_model, fc_weights_kept, paper_filter

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "prepare", "RECIPES", "CheckpointError"]

# Per-dataset input normalization (mean, std per channel) of images scaled to [0, 1].
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

# Training recipes: the paper's where it gives one (LeNet: batch 50, lr 1e-3), otherwise the
# TensorFlow tutorial the model comes from. The paper does not name its optimizer; Adam is used.
RECIPES: dict[str, dict[str, Any]] = {
    "lenet300": {"batch_size": 50, "lr": 1e-3, "optimizer": "adam", "epochs": 20},
    "deep-mnist": {"batch_size": 50, "lr": 1e-4, "optimizer": "adam", "epochs": 10},
    "tf-cifar10": {"batch_size": 128, "lr": 0.1, "optimizer": "sgd", "epochs": 100, "weight_decay": 4e-3},
    "alexnet-bn": {"batch_size": 512, "lr": 3e-2, "optimizer": "sgd", "epochs": 100, "momentum": 0.9,
                   "weight_decay": 5e-4, "lr_step_epochs": 30},
}


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed (missing, damaged, or from a different configuration)."""


@dataclass
class TrainConfig:
    model: str = "lenet300"
    dataset: str = "mnist"
    compression: int | None = 10  # None: the dense baseline
    permute: bool = True
    mode: str = "masked"  # or "compact": train the packed block-diagonal form directly
    init: str = "block"  # or "dense": keep nn.Linear's initialization (see mpdify)
    seed: int = 0  # initialization and data order
    mask_seed: int | None = None  # masks; defaults to seed
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    lr_step_epochs: int | None = None  # divide lr by 10 every this many epochs
    train_limit: int | None = None  # use only the first N training images (quick runs, tests)
    device: str = "cpu"
    data_root: str | None = None

    def resolved(self) -> "TrainConfig":
        """A copy with the recipe's values filled in where this config leaves them open."""
        recipe = RECIPES.get(self.model, {})
        values = asdict(self)
        for key in ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "lr_step_epochs"):
            if values[key] is None:
                values[key] = recipe.get(key, {"weight_decay": 0.0}.get(key))
        if values["momentum"] == 0.9 and "momentum" in recipe:
            values["momentum"] = recipe["momentum"]
        if values["mask_seed"] is None:
            values["mask_seed"] = self.seed
        return TrainConfig(**values)


@dataclass
class TrainResult:
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    test_accuracy: float = float("nan")
    fc_weights: int = 0
    seconds: float = 0.0
    model: nn.Module | None = None


def prepare(images: torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 images → normalized float tensors."""
    mean, std = NORMALIZATION[dataset]
    x = images.float().div_(255.0)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top = (x.shape[-2] - size) // 2
    left = (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def _augment(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """TF CIFAR-10 tutorial augmentation: random crop and horizontal flip."""
    n = x.shape[0]
    tops = torch.randint(0, x.shape[-2] - size + 1, (n,), generator=generator)
    lefts = torch.randint(0, x.shape[-1] - size + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([x[i, :, t:t + size, l:l + size] for i, (t, l) in enumerate(zip(tops.tolist(), lefts.tolist()))])
    out[flips] = out[flips].flip(-1)
    return out


def _model_input(x: torch.Tensor, model_name: str, train: bool, generator: torch.Generator | None) -> torch.Tensor:
    size = INPUT_SHAPES[model_name][-1]
    if x.shape[-1] == size:
        return x
    if train and generator is not None:
        return _augment(x, size, generator)
    return _center_crop(x, size)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, dataset: str, model_name: str, *, batch_size: int = 1000,
             device: str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``split``."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        x = prepare(split.images[start:start + batch_size], dataset)
        x = _model_input(x, model_name, train=False, generator=None).to(device)
        correct += int((model(x).argmax(1).cpu() == split.labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / len(split)


def build_for(config: TrainConfig) -> nn.Module:
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    if config.compression:
        model = mpdify(model, config.compression, filter=paper_filter(model, config.model), seed=config.mask_seed,
                       permute=config.permute, mode=config.mode, init=config.init)
    return model


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; use 'adam' or 'sgd'")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    # Fields that may differ between the interrupted run and the resumed one.
    return {k: v for k, v in config.items() if k not in ("epochs", "device", "data_root")}


def train(
    config: TrainConfig,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    train_split: Split | None = None,
    test_split: Split | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``; returns history, test accuracy and the model.

    ``progress`` receives ``{"event": "step", ...}`` and ``{"event": "epoch", ...}`` dicts.
    With ``checkpoint_dir``, a checkpoint is written after every epoch; ``resume=True``
    continues from it (and refuses a checkpoint made with a different configuration).
    """
    config = config.resolved()
    device = torch.device(config.device)
    train_split = train_split or load_dataset(config.dataset, "train", config.data_root)
    test_split = test_split or load_dataset(config.dataset, "test", config.data_root)
    if config.train_limit:
        train_split = Split(train_split.images[: config.train_limit], train_split.labels[: config.train_limit],
                            train_split.name, train_split.source)
    model = build_for(config).to(device)
    opt = _optimizer(config, model)
    sched = (torch.optim.lr_scheduler.StepLR(opt, config.lr_step_epochs, 0.1) if config.lr_step_epochs else None)
    result = TrainResult(config=asdict(config))
    start_epoch = 0
    ckpt_path = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir else None
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise CheckpointError(f"nothing to resume: no checkpoint at {ckpt_path}")
        try:
            state = torch.load(ckpt_path, map_location=device, weights_only=True)
        except Exception as exc:  # torch raises several unrelated types for damaged files
            raise CheckpointError(f"{ckpt_path}: cannot be read ({exc.__class__.__name__}: {exc})") from None
        if _comparable(state["config"]) != _comparable(asdict(config)):
            raise CheckpointError(f"{ckpt_path} was made with a different configuration: {state['config']}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_epoch = state["epoch"]
        result.history = list(state["history"])
        result.seconds = float(state["seconds"])
    elif ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    x_all = prepare(train_split.images, config.dataset)
    y_all = train_split.labels
    n = len(train_split)
    for epoch in range(start_epoch, config.epochs):
        began = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        aug = torch.Generator().manual_seed(config.seed * 100_019 + epoch)
        total, steps = 0.0, 0
        for i in range(0, n - config.batch_size + 1, config.batch_size):
            idx = order[i:i + config.batch_size]
            x = _model_input(x_all[idx], config.model, train=True, generator=aug).to(device)
            y = y_all[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
            if progress is not None:
                progress({"event": "step", "epoch": epoch, "step": steps, "loss": loss.item(),
                          "steps_per_epoch": n // config.batch_size})
        if sched is not None:
            sched.step()
        accuracy = evaluate(model, test_split, config.dataset, config.model, device=config.device)
        result.seconds += time.perf_counter() - began
        result.history.append({"epoch": epoch + 1, "train_loss": total / max(steps, 1), "test_accuracy": accuracy})
        if ckpt_path is not None:
            state = {"config": asdict(config), "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict() if sched else None, "rng": torch.get_rng_state(),
                     "epoch": epoch + 1, "history": result.history, "seconds": result.seconds}
            write_atomic(ckpt_path, lambda f, state=state: torch.save(state, f))
        if progress is not None:
            progress({"event": "epoch", **result.history[-1]})
    result.test_accuracy = result.history[-1]["test_accuracy"] if result.history else float("nan")
    result.fc_weights = fc_weights_kept(model)
    result.model = model
    return result
