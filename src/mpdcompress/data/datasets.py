"""The dataset registry: one :class:`DatasetSpec` per dataset, read by loading, ``--dry-run``
plans and the command line. Adding a dataset is adding one entry (and its loader in data.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from ..errors import UnknownNameError
from . import sources as data

__all__ = ["DatasetSpec", "DATASETS", "dataset_spec", "load_dataset"]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: sizes, image shape, normalization, where it is looked for and its loader."""

    name: str
    train_images: int
    test_images: int
    channels: int | None  # None: generated at the model's own input shape
    side: int | None  # stored image side in pixels
    # (mean, std) per channel of images scaled to [0, 1]
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    # memory: a Split loaded at once (data.py); files: decoded per image (imagefolder.py);
    # generated: random inputs of the model's shape
    storage: Literal["memory", "files", "generated"]
    # Where it is looked for, given the data root: (folder, a file or folder that marks it present)
    places: Callable[[Path], list[tuple[Path, str]]] = lambda root: []
    loader: Callable[..., data.Split] | None = None  # loader(split, root) for in-memory datasets

    def locate(self, root: str | os.PathLike | None = None) -> tuple[str, bool]:
        """Where the dataset is (or would be looked for first), and whether it is there, without reading it."""
        places = self.places(Path(root or data.data_root()))
        if not places:
            return "generated", True
        for folder, marker in places:
            if (folder / marker).exists():
                return str(folder), True
        return str(places[0][0]), False


def _idx_places(folder: str) -> Callable[[Path], list[tuple[Path, str]]]:
    return lambda root: [(root / folder, "train-images-idx3-ubyte"), (root / folder, "train-images-idx3-ubyte.gz")]


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "mnist", 60_000, 10_000, 1, 28, ((0.1307,), (0.3081,)), "memory", _idx_places("mnist"), data.load_mnist
        ),
        DatasetSpec(
            "fashion-mnist",
            60_000,
            10_000,
            1,
            28,
            ((0.2860,), (0.3530,)),
            "memory",
            # read at call time, so a test can point it elsewhere
            lambda root: [*_idx_places("fashion-mnist")(root), (data.FASHION_SYSTEM_DIR, "train-images-idx3-ubyte.gz")],
            data.load_fashion_mnist,
        ),
        DatasetSpec(
            "cifar10",
            50_000,
            10_000,
            3,
            32,
            ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "memory",
            lambda root: [
                (root / "cifar-10-batches-bin", "data_batch_1.bin"),
                (root / "cifar-10-batches-py", "data_batch_1"),
            ],
            data.load_cifar10,
        ),
        DatasetSpec(
            "imagenet",
            1_281_167,
            50_000,
            3,
            224,
            ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            "files",
            lambda root: [(root / "imagenet", "train")],
        ),
        # Uniform random bytes: mean 0.5, std 1/sqrt(12) after scaling to [0, 1].
        DatasetSpec("fake", 10_240, 1_024, None, None, ((0.5,), (0.2887,)), "generated"),
    )
}


def dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset called ``name``; UnknownNameError lists the registered names."""
    if name not in DATASETS:
        raise UnknownNameError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None) -> data.Split:
    """An in-memory dataset's ``train`` or ``test`` split."""
    spec = dataset_spec(name)
    if spec.loader is None:
        raise UnknownNameError(
            f"{name} is not an in-memory dataset; choose from {', '.join(n for n, s in DATASETS.items() if s.loader)}"
        )
    return spec.loader(split, root)
