"""Helpers shared by the test modules: comparisons, dataset files in their release formats,
small training configs and hypothesis strategies."""

import gzip
import json
from pathlib import Path

import numpy as np
import torch
from hypothesis import strategies as st

from mpdcompress.train import TrainConfig


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> float:
    """Max abs difference relative to the output scale; the figure the exactness bar is about."""
    scale = expected.detach().abs().max().clamp_min(1e-12)
    err = float((actual - expected).detach().abs().max() / scale)
    assert err <= rel, f"relative max error {err:.3g} > {rel}"
    return err


def resigned(path: Path, folder: Path, key=None, value=None, edit=None) -> Path:
    """A copy of model file ``path`` in ``folder`` with tensor ``key`` replaced by ``value`` or the
    manifest changed by ``edit(manifest)``, its digests redone: a forged file that passes the
    integrity checks, so that what refuses it is the check under test."""
    from safetensors import safe_open
    from safetensors.torch import save as st_save

    from mpdcompress.files.header import manifest_digest, tensor_digest

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        manifest = json.loads(f.metadata()["mpdcompress"])
    if key is not None:
        tensors[key] = value
    if edit is not None:
        edit(manifest)
    manifest["sha256"] = {k: tensor_digest(t) for k, t in tensors.items()}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    out = folder / "edited.safetensors"
    out.write_bytes(st_save(tensors, metadata={"mpdcompress": json.dumps(manifest)}))
    return out


def assert_onnx_export_command_matches(path: Path, onnx_path: Path, model: torch.nn.Module) -> torch.Tensor:
    """``mpdcompress export`` of model file ``path`` to ``onnx_path`` runs in ONNX Runtime and
    computes what ``model`` computes (to 1e-5 of its scale); returns the input used."""
    import pytest

    from mpdcompress.cli.main import main

    ort = pytest.importorskip("onnxruntime")
    assert main(["export", str(path), "-o", str(onnx_path)]) == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *model_input_shape(path))
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = model.eval()(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    return x


def model_input_shape(path: Path) -> tuple[int, ...]:
    """The input shape a model file records."""
    from mpdcompress.files.io import read_manifest

    return tuple(read_manifest(path)["input_shape"])


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_fake_mnist(folder: Path, n_train=600, n_test=200, gz=False, seed=0) -> None:
    """A learnable MNIST-format dataset: each class lights a different patch of the image."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 * y : 2 * y + 6, 4:24] = 250
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)


def cifar_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)


def write_cifar_binary(root: Path, per_batch: int) -> Path:
    """CIFAR-10's binary release layout: five training batches and a test batch of 3073-byte records."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data, labels = cifar_arrays(per_batch, i)
        records = np.concatenate([labels[:, None].astype(np.uint8), data], axis=1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    return folder


def small_config(**kw):
    base = dict(model="lenet300", dataset="mnist", compression=4, epochs=3, batch_size=50, lr=2e-3, seed=3)
    base.update(kw)
    return TrainConfig(**base)


@st.composite
def shapes_and_factor(draw, max_dim=64):
    d_out = draw(st.integers(1, max_dim))
    d_in = draw(st.integers(1, max_dim))
    c = draw(st.integers(1, min(d_out, d_in)))
    return d_out, d_in, c
