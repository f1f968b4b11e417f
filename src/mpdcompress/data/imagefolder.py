"""ImageNet-style image folders (``<split>/<class>/<image>``), decoded with Pillow, no torchvision.

The transforms are AlexNet's as torchvision's ImageNet reference implements them:

* train: random resized crop (area 8–100 %, aspect 3/4–4/3) to 224×224, random horizontal flip;
* eval: shorter side resized to 256, centre crop 224×224.

Random choices come from a generator seeded by ``(seed, epoch, image index)``, so an image gets
the same crop whichever process or data-loading worker reads it: a run split over more
processes sees the same augmented images as one process.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .sources import DataCorruptError, DataUnavailableError, data_root

__all__ = ["ImageFolderImages", "scan_image_folder", "load_imagenet", "IMAGENET_SPLIT_DIRS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_SPLIT_DIRS = {"train": "train", "test": "val"}


def scan_image_folder(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folders) and ``(path, label)`` for every image, in a fixed order.

    ``classes`` fixes the label numbering (the training split's); a class folder outside it is
    an error, because its images would get labels the model was never trained on.
    """
    if not folder.is_dir():
        raise DataUnavailableError(f"image folder {folder} does not exist")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not found:
        raise DataCorruptError(f"{folder} has no class sub-folders (expected {folder}/<class>/<image>.JPEG)")
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataCorruptError(f"{folder} has class folders the training split lacks: {unknown[:5]}")
    label = {name: i for i, name in enumerate(classes)}
    samples = []
    for name in found:
        for root, _dirs, files in sorted(os.walk(folder / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(root, file), label[name]))
    if not samples:
        raise DataCorruptError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) under its class folders")
    return classes, samples


class ImageFolderImages:
    """A split read from image files: ``__getitems__(indices)`` gives uint8 ``(N, 3, size, size)``
    images and int64 labels. Picklable, so data-loading workers can decode in parallel."""

    loads_files = True

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        train: bool,
        seed: int = 0,
        size: int = 224,
        resize: int = 256,
        classes: list[str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.classes, self.samples = scan_image_folder(self.folder, classes)
        self.train, self.seed, self.size, self.resize = train, seed, size, resize
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [self._image(int(i)) for i in indices]
        labels = torch.tensor([self.samples[int(i)][1] for i in indices], dtype=torch.int64)
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels

    def _image(self, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.samples[index][0]
        try:
            with Image.open(path) as raw:
                img = raw.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataCorruptError(f"{path}: cannot decode image ({exc})") from None
        if self.train:
            rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
            top, left, h, w = random_resized_crop_box(img.height, img.width, rng)
            img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            scale = self.resize / min(img.width, img.height)
            img = img.resize(
                (max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))), Image.BILINEAR
            )
            top = round((img.height - self.size) / 2)
            left = round((img.width - self.size) / 2)
            img = img.crop((left, top, left + self.size, top + self.size))
        return np.asarray(img, dtype=np.uint8)


def random_resized_crop_box(
    height: int, width: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop covering ``scale`` of the area at an aspect in ``ratio``;
    after 10 misses, the largest centred crop within ``ratio`` (torchvision's rule)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def load_imagenet(
    split: str, root: str | os.PathLike | None = None, *, seed: int = 0, classes: list[str] | None = None
) -> ImageFolderImages:
    """ILSVRC-2012 in the ImageFolder layout: ``<root>/imagenet/train/<wnid>/*.JPEG`` and
    ``<root>/imagenet/val/<wnid>/*.JPEG`` (validation images sorted into class folders)."""
    if split not in IMAGENET_SPLIT_DIRS:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root or data_root()) / "imagenet" / IMAGENET_SPLIT_DIRS[split]
    if not folder.is_dir():
        raise DataUnavailableError(
            f"ImageNet not found: put ILSVRC-2012 in the ImageFolder layout at {folder}/<wnid>/<image>.JPEG "
            "(validation images sorted into the same class folders), or set MPDCOMPRESS_DATA / --data"
        )
    if importlib.util.find_spec("PIL") is None:
        raise DataUnavailableError("reading image folders needs Pillow: pip install 'mpdcompress[imagenet]'")
    return ImageFolderImages(folder, train=split == "train", seed=seed, classes=classes)
