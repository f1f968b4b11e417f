"""Image pipelines at scale: ImageNet folders, CIFAR-10 crops, the tf-cifar10 recipe under DDP; tiny files in the real layouts."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mpdcompress.data.imagefolder import load_imagenet, random_resized_crop_box
from mpdcompress.data.sources import DataCorruptError, DataUnavailableError, Split
from mpdcompress.train.inputs import InMemoryImages

from .helpers import write_cifar_binary

PIL = pytest.importorskip("PIL.Image")


def write_imagenet(root, classes=("n01440764", "n01443537", "n01484850"), per_class=4, val_per_class=2):
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, wnid in enumerate(classes):
            folder = root / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(180, 400)), int(rng.integers(180, 400))
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                pixels[..., c] = 255  # learnable: each class is dominated by one colour
                ext = ".JPEG" if i % 2 == 0 else ".png"
                PIL.fromarray(pixels).save(folder / f"{wnid}_{i}{ext}")
    return root


def test_imagenet_folder_gives_alexnet_sized_batches(tmp_path):
    write_imagenet(tmp_path)
    train = load_imagenet("train", tmp_path, seed=1)
    val = load_imagenet("test", tmp_path, classes=train.classes)
    assert len(train) == 12 and len(val) == 6 and train.classes == val.classes
    images, labels = train.__getitems__([0, 5, 11])
    assert images.shape == (3, 3, 224, 224) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 2]
    # The crop of an image depends on (seed, epoch, index) only, not on the batch it is read in.
    again, _ = train.__getitems__([11])
    assert torch.equal(again[0], images[2])
    train.set_epoch(1)
    assert not torch.equal(train.__getitems__([11])[0][0], images[2])
    # Evaluation is a fixed resize-256 + centre-224 crop.
    first, _ = val.__getitems__([0])
    assert torch.equal(first, val.__getitems__([0])[0])


def test_imagenet_folder_errors_say_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setenv("MPDCOMPRESS_DATA", str(tmp_path))
    with pytest.raises(DataUnavailableError, match="ImageFolder layout"):
        load_imagenet("train")
    write_imagenet(tmp_path)
    bad = tmp_path / "imagenet" / "train" / "n01440764" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    train = load_imagenet("train")
    index = [p for p, _ in train.samples].index(str(bad))
    with pytest.raises(DataCorruptError, match="broken.JPEG: cannot decode"):
        train.__getitems__([index])
    (tmp_path / "imagenet" / "val" / "n99999999").mkdir()
    with pytest.raises(DataCorruptError, match="class folders the training split lacks"):
        load_imagenet("test", classes=train.classes)


@given(h=st.integers(1, 600), w=st.integers(1, 600), seed=st.integers(0, 10_000))
def test_random_resized_crop_stays_inside_the_image(h, w, seed):
    top, left, ch, cw = random_resized_crop_box(h, w, random.Random(seed))
    assert 0 <= top and 0 <= left and 0 < ch and 0 < cw
    assert top + ch <= h and left + cw <= w


def test_cifar_crops_are_per_image_and_centred_for_evaluation():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.arange(10), "cifar10-train", "memory")
    train = InMemoryImages(split, 24, train=True, seed=4)
    batch, _ = train.__getitems__([2, 7])
    alone, _ = train.__getitems__([7])
    assert batch.shape == (2, 3, 24, 24) and torch.equal(batch[1], alone[0])
    tops, lefts, flips = (p[7] for p in train._params)
    crop = images[7, :, tops : tops + 24, lefts : lefts + 24]
    assert torch.equal(alone[0], crop.flip(-1) if flips else crop)
    centred, _ = InMemoryImages(split, 24, train=False).__getitems__([3])
    assert torch.equal(centred[0], images[3, :, 4:28, 4:28])


def test_alexnet_trains_on_an_image_folder_with_loader_workers(tmp_path):
    write_imagenet(tmp_path)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "mpdcompress",
        "train",
        "--recipe",
        "alexnet-bn-imagenet",
        "--mode",
        "compact",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--workers",
        "2",
        "--data",
        str(tmp_path),
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "training alexnet-bn on imagenet" in proc.stdout
    assert (out / "packed.safetensors").is_file()
    assert "final test accuracy" in proc.stdout


def test_tf_cifar10_recipe_trains_two_processes_on_the_binary_release(tmp_path):
    """The CIFAR-10 pipeline end to end: binary release files, random 24x24 crops, 2 gloo ranks."""
    write_cifar_binary(tmp_path, per_batch=16)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "mpdcompress",
        "train",
        "--recipe",
        "tf-cifar10",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training tf-cifar10 on cifar10 with 2 processes (gloo)" in proc.stdout
    assert "epoch 2: train loss" in proc.stdout
