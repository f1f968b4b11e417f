import gzip
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import mpdcompress as mpd
from mpdcompress.data.datasets import DATASETS, dataset_spec, load_dataset
from mpdcompress.data.sources import (
    DataCorruptError,
    DataUnavailableError,
    load_cifar10,
    load_fashion_mnist,
    load_mnist,
    read_idx,
)
from mpdcompress.errors import UnknownNameError
from mpdcompress.train import CheckpointError, train

from .helpers import cifar_arrays, small_config, write_cifar_binary, write_fake_mnist


def test_idx_reader_and_mnist_loader(data_dir):
    train_split = load_mnist("train", fetch=False)
    assert train_split.images.shape == (600, 1, 28, 28) and train_split.images.dtype == torch.uint8
    assert train_split.labels.dtype == torch.int64 and int(train_split.labels.max()) <= 9
    assert len(load_dataset("mnist", "test")) == 200


def test_dataset_registry_locates_without_reading(tmp_path):
    assert dataset_spec("cifar10").locate(tmp_path) == (str(tmp_path / "cifar-10-batches-bin"), False)
    write_cifar_binary(tmp_path, per_batch=4)
    assert dataset_spec("cifar10").locate(tmp_path) == (str(tmp_path / "cifar-10-batches-bin"), True)
    assert dataset_spec("fake").locate(tmp_path) == ("generated", True)
    assert all(spec.train_images > spec.test_images > 0 for spec in DATASETS.values())
    with pytest.raises(UnknownNameError, match="unknown dataset 'svhn'; choose from mnist"):
        dataset_spec("svhn")
    with pytest.raises(UnknownNameError, match="not an in-memory dataset"):
        load_dataset("imagenet", "train")


def test_gzipped_fashion_folder(tmp_path):
    write_fake_mnist(tmp_path / "fashion-mnist", gz=True)
    assert len(load_fashion_mnist("test", root=tmp_path)) == 200


def test_truncated_and_wrong_files_are_errors(tmp_path):
    write_fake_mnist(tmp_path / "mnist", gz=True)
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-7]))
    with pytest.raises(DataCorruptError, match="truncated"):
        load_mnist("test", root=tmp_path, fetch=False)
    write_fake_mnist(tmp_path / "raw" / "mnist")
    with pytest.raises(DataCorruptError, match="SHA-256"):  # raw IDX files must be the real release
        load_mnist("test", root=tmp_path / "raw", fetch=False)
    path.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(DataCorruptError, match="cannot read"):
        read_idx(path)
    (tmp_path / "plain").write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(DataCorruptError, match="bad magic"):
        read_idx(tmp_path / "plain")


def test_known_release_files_are_checked_against_their_digest(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "fashion-mnist", gz=True)
    monkeypatch.setattr("mpdcompress.data.sources.FASHION_SYSTEM_DIR", tmp_path / "fashion-mnist")
    with pytest.raises(DataCorruptError, match="SHA-256"):
        load_fashion_mnist("test", root=tmp_path / "elsewhere")


def test_missing_data_fails_fast_with_instructions(tmp_path, monkeypatch):
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        monkeypatch.setattr("mpdcompress.data.sources.FASHION_SYSTEM_DIR", tmp_path / "none")
        load_fashion_mnist("train", root=tmp_path)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(DataUnavailableError, match="npm is not installed"):
        load_mnist("train", root=tmp_path)
    with pytest.raises(DataUnavailableError, match="cifar-10-batches-bin"):
        load_cifar10("train", root=tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        load_mnist("valid", root=tmp_path)


def test_cifar10_binary_release(tmp_path):
    folder = write_cifar_binary(tmp_path, per_batch=4)
    train_split = load_cifar10("train", root=tmp_path)
    assert train_split.images.shape == (20, 3, 32, 32)
    data, labels = cifar_arrays(4, 0)
    assert torch.equal(train_split.images[:4].reshape(4, -1), torch.from_numpy(data))
    (folder / "test_batch.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(DataCorruptError, match="3073-byte"):
        load_cifar10("test", root=tmp_path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_python_release_without_running_pickled_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data, labels = cifar_arrays(3, i)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist(), b"batch_label": b"x"}, f)
    assert len(load_cifar10("train", root=tmp_path)) == 15
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [1]}, f)
    with pytest.raises(DataCorruptError, match="posix.system|refusing"):
        load_cifar10("test", root=tmp_path)


def test_training_learns_the_fake_task_and_is_deterministic(data_dir):
    a = train(small_config())
    b = train(small_config())
    assert a.test_accuracy > 0.8
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(p, q)
    assert a.fc_weights == 784 * 300 // 4 + 300 * 100 // 4 + 100 * 10


def test_resume_continues_exactly(data_dir, tmp_path):
    full = train(small_config(epochs=3), checkpoint_dir=tmp_path / "full")
    train(small_config(epochs=1), checkpoint_dir=tmp_path / "part")
    resumed = train(small_config(epochs=3), checkpoint_dir=tmp_path / "part", resume=True)
    assert [h["test_accuracy"] for h in resumed.history] == [h["test_accuracy"] for h in full.history]
    for p, q in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(p, q)
    with pytest.raises(CheckpointError, match="different configuration"):
        train(small_config(epochs=3, compression=2), checkpoint_dir=tmp_path / "part", resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(small_config(), checkpoint_dir=tmp_path / "none", resume=True)
    # A checkpoint from before a config field existed resumes as if it held the field's default.
    path = tmp_path / "part" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["qat"]
    torch.save(state, path)
    older = train(small_config(epochs=3), checkpoint_dir=tmp_path / "part", resume=True)
    assert older.history == resumed.history
    with pytest.raises(CheckpointError, match=r"different configuration \(mode, qat differ\)"):
        train(small_config(epochs=3, mode="compact", qat="int8"), checkpoint_dir=tmp_path / "part", resume=True)


def test_killed_cli_run_resumes_to_the_same_weights(data_dir, tmp_path):
    """Kill `mpdcompress train` after its first checkpoint, resume, compare with an uninterrupted run."""
    args = ["--epochs", "4", "--compression", "4", "--lr", "0.002", "--seed", "5", "--quiet"]
    env = {**os.environ, "MPDCOMPRESS_DATA": str(data_dir)}
    cli = [sys.executable, "-m", "mpdcompress", "train"]
    subprocess.run(cli + args + ["--out", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(
        cli + args + ["--out", str(tmp_path / "run")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpt = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists()
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert done < 4 or proc.returncode == 0
    subprocess.run(cli + args + ["--out", str(tmp_path / "run"), "--resume"], check=True, env=env, capture_output=True)
    ref = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    got = torch.load(ckpt, weights_only=True)
    assert got["epoch"] == ref["epoch"] == 4
    for key in ref["model"]:
        assert torch.equal(ref["model"][key], got["model"][key]), key
    assert (
        json.loads((tmp_path / "run" / "result.json").read_text())["test_accuracy"]
        == json.loads((tmp_path / "ref" / "result.json").read_text())["test_accuracy"]
    )
    # The model file the resumed run wrote loads, and computes what the uninterrupted run's does.
    ref_model, got_model = (mpd.load(tmp_path / run / "masked.safetensors").eval() for run in ("ref", "run"))
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(got_model(x), ref_model(x))
