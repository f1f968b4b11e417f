"""What the trainer feeds the model: image sources, normalization and each rank's batches.

Every source answers ``__getitems__(indices) -> (uint8 images (N, C, H, W), int64 labels)`` at
the model's input size, so one ``DataLoader`` path serves datasets held in memory (MNIST,
CIFAR-10, fake data) and datasets read from files by worker processes (ImageNet folders).
Normalization happens after the batch reaches the training device (4× less to copy).

Random augmentation is drawn per image from ``(seed, epoch)``, never from the order in which
images are read, so splitting the data over processes does not change what the model sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..data.datasets import dataset_spec, load_dataset
from ..data.imagefolder import load_imagenet
from ..data.sources import Split
from ..errors import ConfigError
from ..models import model_spec

__all__ = [
    "prepare",
    "InMemoryImages",
    "FakeImages",
    "open_datasets",
    "StepPlan",
    "step_plan",
    "rank_micro_batches",
    "batch_loader",
    "sampled_batches",
]


def prepare(images: torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 images → normalized float tensors (on the images' device)."""
    mean, std = dataset_spec(dataset).normalization
    shape = (1, -1) + (1,) * (images.dim() - 2)
    x = images.float().div_(255.0)
    return (x - torch.tensor(mean, device=x.device).view(shape)) / torch.tensor(std, device=x.device).view(shape)


def sampled_batches(images, dataset: str, size: int, seed: int) -> Callable[[int], torch.Tensor]:
    """``step`` → a batch of ``size`` prepared images drawn at random from ``images`` (an
    :class:`InMemoryImages`, labels dropped), the same for the same seed and step: the input
    stream of a distillation, which needs no labels and resumes at any step."""

    def batch(step: int, size: int = size) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        drawn, _ = images.__getitems__(torch.randint(len(images), (size,), generator=g))
        return prepare(drawn, dataset)

    return batch


class InMemoryImages:
    """A :class:`~mpdcompress.data.sources.Split` served at the model's input size.

    Larger stored images (CIFAR-10's 32×32 for a 24×24 model) are randomly cropped and flipped
    when training, as in the TF CIFAR-10 tutorial, and centre-cropped for evaluation.
    """

    loads_files = False

    def __init__(self, split: Split, size: int | None, *, train: bool, seed: int = 0) -> None:
        self.split, self.size, self.train, self.seed = split, size, train, seed
        self._params: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.split)

    def _crops(self) -> bool:
        return self.size is not None and self.split.images.shape[-1] != self.size

    def set_epoch(self, epoch: int) -> None:
        if not (self.train and self._crops()):
            return
        n, (h, w) = len(self), self.split.images.shape[-2:]
        g = torch.Generator().manual_seed(self.seed * 100_019 + epoch)
        self._params = (
            torch.randint(0, h - self.size + 1, (n,), generator=g),
            torch.randint(0, w - self.size + 1, (n,), generator=g),
            torch.rand(n, generator=g) < 0.5,
        )

    def __getitems__(self, indices: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        images = self.split.images[idx]
        if self._crops():
            images = self._crop(images, idx)
        return images, self.split.labels[idx]

    def _crop(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        n, s = len(idx), self.size
        steps = torch.arange(s)
        if self.train:
            tops, lefts, flips = (p[idx] for p in self._params)
        else:
            tops = torch.full((n,), (images.shape[-2] - s) // 2)
            lefts = torch.full((n,), (images.shape[-1] - s) // 2)
            flips = torch.zeros(n, dtype=torch.bool)
        rows = tops[:, None] + steps
        cols = lefts[:, None] + torch.where(flips[:, None], s - 1 - steps, steps)
        batch = torch.arange(n)[:, None, None, None]
        channels = torch.arange(images.shape[1])[None, :, None, None]
        return images[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]


class FakeImages:
    """Random images of a model's input shape for smoke tests and throughput runs.

    Image ``i`` is a fixed pool entry ``i mod 256``, so reading costs nothing but an index, and
    labels are drawn once from the seed; nothing here is learnable.
    """

    loads_files = False

    def __init__(self, shape: tuple[int, ...], num_classes: int, length: int, *, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed + 1)
        self.pool = torch.randint(0, 256, (min(256, length), *shape), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, num_classes, (length,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitems__(self, indices: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.pool[idx % len(self.pool)], self.labels[idx]


def open_datasets(config, train_split: Split | None = None, test_split: Split | None = None):
    """The training and evaluation sources of a resolved :class:`TrainConfig`."""
    spec = model_spec(config.model)
    shape = spec.input_shape
    size = shape[-1] if len(shape) == 3 else None
    if size is None and config.dataset != "fake":
        raise ConfigError(
            f"{config.model} takes {shape[0]}-d feature vectors, not {config.dataset} images; "
            "train it on --dataset fake"
        )
    source = dataset_spec(config.dataset)
    if source.storage == "generated":
        limit = config.train_limit or source.train_images
        return (
            FakeImages(shape, spec.num_classes, limit, seed=config.seed),
            FakeImages(shape, spec.num_classes, source.test_images, seed=config.seed + 1),
        )
    if source.storage == "files":
        _check_fits(config, channels=source.channels, side=source.side)
        train = load_imagenet("train", config.data_root, seed=config.seed)
        if config.train_limit:
            train.samples = train.samples[: config.train_limit]
        return train, load_imagenet("test", config.data_root, seed=config.seed, classes=train.classes)
    train_split = train_split or load_dataset(config.dataset, "train", config.data_root)
    test_split = test_split or load_dataset(config.dataset, "test", config.data_root)
    if config.train_limit:
        train_split = Split(
            train_split.images[: config.train_limit],
            train_split.labels[: config.train_limit],
            train_split.name,
            train_split.source,
        )
    _check_fits(config, channels=train_split.images.shape[1], side=train_split.images.shape[-1])
    return (
        InMemoryImages(train_split, size, train=True, seed=config.seed),
        InMemoryImages(test_split, size, train=False, seed=config.seed),
    )


def _check_fits(config, channels: int, side: int) -> None:
    want = model_spec(config.model).input_shape
    if want[0] != channels or want[-1] > side:
        raise ConfigError(
            f"{config.model} takes {want[0]}-channel {want[-1]}x{want[-1]} images; {config.dataset} has "
            f"{channels}-channel {side}x{side} ones"
        )


@dataclass(frozen=True)
class StepPlan:
    """How one optimizer step's global batch is split over processes and accumulation steps."""

    global_batch: int
    world_size: int
    micro_batch: int  # per process and forward pass
    accumulation: int  # forward/backward passes per optimizer step on each process
    steps_per_epoch: int


def step_plan(global_batch: int, micro_batch: int | None, world_size: int, train_images: int) -> StepPlan:
    """Split the global batch over processes and micro-batches; ConfigError if it does not divide."""
    if global_batch % world_size:
        raise ConfigError(
            f"the global batch {global_batch} does not split over {world_size} processes; "
            "choose a batch size divisible by the process count"
        )
    per_rank = global_batch // world_size
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"each of the {world_size} processes gets {per_rank} images per step, which --micro-batch "
            f"{micro} does not divide; choose a divisor of {per_rank}"
        )
    steps = train_images // global_batch
    if steps == 0:
        raise ConfigError(f"{train_images} training images are fewer than one global batch of {global_batch}")
    return StepPlan(global_batch, world_size, micro, per_rank // micro, steps)


def rank_micro_batches(n: int, plan: StepPlan, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches of one epoch, in order; each ``plan.accumulation`` of them make one step.

    The epoch's permutation is ``DistributedSampler``'s (seeded ``seed * 100_003 + epoch``), and
    rank ``r`` takes every ``world_size``-th index of it. Optimizer step ``s`` on all ranks
    together then covers exactly positions ``s·B … (s+1)·B - 1`` of that permutation, the
    same images as step ``s`` of a single process with global batch ``B``.
    """
    sampler = DistributedSampler(
        range(n), num_replicas=plan.world_size, rank=rank, shuffle=True, seed=seed * 100_003, drop_last=True
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    m = plan.micro_batch
    return [order[i : i + m] for i in range(0, plan.steps_per_epoch * plan.accumulation * m, m)]


def _as_batch(batch):
    return batch


def batch_loader(source, batches: list[list[int]], *, workers: int, pin_memory: bool) -> DataLoader:
    """Batches in the given order; file-reading sources decode in ``workers`` processes."""
    workers = workers if source.loads_files else 0
    # Its own generator: a DataLoader otherwise draws a worker seed from the global RNG each time
    # it is iterated, which would shift dropout's random stream on resuming mid-epoch.
    return DataLoader(
        source,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_as_batch,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator(),
    )
