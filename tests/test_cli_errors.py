"""Bad command lines: each one exits 2 with a single line on stderr, never a traceback."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import mpdcompress as mpd

BAD_COMMAND_LINES = [
    ["demo", "--steps", "0"],
    ["demo", "-c", "0"],
    ["train", "--batch-size", "0", "--dry-run"],
    ["train", "--batch-size", "-5", "--dry-run"],
    ["train", "--epochs", "0", "--dry-run"],
    ["train", "--lr", "inf", "--dry-run"],
    ["train", "--lr", "nan", "--dry-run"],
    ["train", "--lr", "-1", "--dry-run"],
    ["train", "--weight-decay", "-0.1", "--dry-run"],
    ["train", "--checkpoint-every", "-1", "--dry-run"],
    ["train", "--micro-batch", "0", "--dry-run"],
    ["train", "--dry-run", "--nproc", "-2"],
    ["train", "--model", "bogus"],
    ["inspect", "-c", "0", "--model", "lenet300"],
    ["inspect", "--model", "bogus"],
    ["export", "{file}", "-o", "{tmp}/m.onnx", "--opset", "99"],
    ["export", "{file}", "-o", "{tmp}/m.onnx", "--opset", "12"],
    ["bench", "--factors", "100000", "--shapes", "lenet-fc1", "--quiet", "--out", "{tmp}/b"],
    ["bench", "--batches", "0"],
    ["bench", "--shapes", "bogus", "--quiet", "--out", "{tmp}/b"],
    ["pack", "{file}", "-o", "{tmp}"],  # output is a directory
    ["pack", "{file}", "-o", "{file}/under/a/file.safetensors"],
    ["pack", "{tmp}/missing.safetensors", "-o", "{tmp}/x.safetensors"],
    ["pack", "{png}", "-o", "{tmp}/x.safetensors"],
    ["inspect", "{png}"],
    ["train", "--resume", "--out", "{png_dir}", "--train-limit", "100", "--epochs", "1"],
    ["reproduce", "--render-only", "--out", "{tmp}"],
    ["distill", "--resume", "-o", "{tmp}/student"],
    ["distill", "--model-dir", "{tmp}", "-o", "{tmp}/student"],
    ["distill", "--steps", "-1", "-o", "{tmp}/student"],
    ["distill", "--masks", "magnitude", "-o", "{tmp}/student"],
    ["export", "{file}", "-o", "{tmp}/m.onnx", "--dynamic-dims", "0:batch"],
    ["export", "{file}", "-o", "{tmp}/m.onnx", "--example-inputs", "{png}"],
    ["pack", "{file}", "-o", "{tmp}/p.safetensors", "--model-class", "os:path"],
    # What the second hardening audit found printing tracebacks or accepting nonsense:
    ["inspect", "{huge_number}"],
    ["pack", "{huge_number}", "-o", "{tmp}/p.safetensors"],
    ["export", "{file}", "-o", "{tmp}/m.onnx", "--input-shape", "100000", "100000"],
    ["export", "{file}", "-o", "{tmp}/m.onnx", "--input-shape", "7"],
    ["export", "{file}", "-o", "{tmp}/m.onnx", "--dynamic-dims", "0=a", "1=a"],
    ["export", "{file}", "-o", "{tmp}/m.onnx", "--dynamic-dims", "0=a", "0=b"],
    ["export", "{file}", "-o", "{tmp}/m.onnx", "--example-inputs", "{wrong_names}"],
    ["train", "--device", "tpu", "--dataset", "fake", "--train-limit", "64"],
    ["train", "--device", "cpu:abc", "--dataset", "fake", "--train-limit", "64"],
    ["bench", "--device", "tpu", "--quick"],
    ["train", "--seed", str(10**23), "--dataset", "fake", "--train-limit", "64"],
    ["train", "--nproc", "4", "--dataset", "fake", "--train-limit", "64"],
    [
        "train",
        "--lr",
        "1e30",
        "--dataset",
        "fake",
        "--train-limit",
        "256",
        "--epochs",
        "1",
        "--out",
        "{tmp}/n",
        "--quiet",
    ],
    ["inspect", "{file}", "--model", "lenet300"],
    ["bench", "--models", "nosuch", "--quiet", "--out", "{tmp}/b"],
    ["pack", "{file}", "-o", "{tmp}/q.safetensors", "--model-class", "{user_dir}/broken.py:Net"],
    ["pack", "{file}", "-o", "{tmp}/q.safetensors", "--model-class", "{user_dir}/raises.py:Net"],
    [
        "pack",
        "{file}",
        "-o",
        "{tmp}/q.safetensors",
        "--model-class",
        "{user_dir}/net.py:Net",
        "--model-kwargs",
        '{{"n": -4}}',
    ],
    ["pack", "{file}", "-o", "{png_dir}"],
    ["pack", "{file}", "-o", ""],
    ["pack", "{file}", "-o", "{png}/under.safetensors"],
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), 2)
    file = mpd.save(model, tmp / "m.safetensors", input_shape=(8,))
    png_dir = tmp / "png"
    png_dir.mkdir()
    (png_dir / "checkpoint.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (tmp / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    # BatchNorm's eps 1e-05 edited to 1e905: a float JSON reads as infinity.
    blob = mpd.save(mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)), 2), tmp / "bn.safetensors")
    blob = blob.read_bytes()
    at = blob.index(b"1e-05") + 2
    (tmp / "huge.safetensors").write_bytes(blob[:at] + b"9" + blob[at + 1 :])
    from safetensors.torch import save_file

    save_file({"no_such_argument": torch.randn(2, 8)}, tmp / "wrong.safetensors")
    users = tmp / "user"
    users.mkdir()
    (users / "broken.py").write_text("def f(:\n")
    (users / "raises.py").write_text("raise RuntimeError('configuration missing')\n")
    (users / "net.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self, n=8):\n"
        "        super().__init__()\n        self.l = torch.nn.Linear(n, 2)\n"
    )
    return {
        "file": str(file),
        "tmp": str(tmp),
        "png": str(tmp / "x.png"),
        "png_dir": str(png_dir),
        "huge_number": str(tmp / "huge.safetensors"),
        "wrong_names": str(tmp / "wrong.safetensors"),
        "user_dir": str(users),
    }


@pytest.mark.parametrize("argv", BAD_COMMAND_LINES, ids=lambda a: " ".join(a)[:60])
def test_bad_command_line_is_one_line_and_status_2(argv, paths):
    argv = [a.format(**paths) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "mpdcompress", *argv], capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-600:])
    assert "Traceback" not in proc.stderr
    # argparse prints its usage line before the error; ours print the error alone
    lines = [line for line in err if not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and "error:" in lines[0], err
    assert "weights_only" not in proc.stderr and "Errno" not in proc.stderr


def test_train_on_cuda_without_cuda_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        [sys.executable, "-m", "mpdcompress", "train", "--device", "cuda", "--dataset", "fake", "--train-limit", "100"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "torch.cuda.is_available() is False" in proc.stderr
    assert "Traceback" not in proc.stderr
