"""Writes cnn-0.1.0.safetensors and cnn-0.1.0-io.safetensors: a masked and a packed CNN saved by
mpdcompress 0.1.0 (commit 2007c69, whose reader refused every file with a convolution), with an
input and both models' outputs, so that the reader of every later release is tested on them.

    git worktree add /tmp/old 2007c69 && PYTHONPATH=/tmp/old/src python tests/data/make_cnn_fixture.py
"""

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import mpdcompress as mpd

HERE = Path(__file__).parent


def model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d((2, 1), stride=(1, 1)),
        nn.Conv2d(8, 8, 3, padding="same", groups=2, padding_mode="reflect", bias=False),
        nn.LocalResponseNorm(3),
        nn.AdaptiveAvgPool2d((3, None)),
        nn.Flatten(),
        nn.Linear(8 * 3 * 8, 24),
        nn.GELU(approximate="tanh"),
        nn.Linear(24, 6),
    )


def main() -> None:
    torch.manual_seed(0)
    masked = mpd.mpdify_(model(), 4, seed=3)
    masked[1].running_mean.uniform_(-1, 1)
    masked[1].running_var.uniform_(0.5, 2)
    masked.eval()
    packed = mpd.pack(masked)
    x = torch.randn(3, 2, 12, 10)
    mpd.save(masked, HERE / "cnn-0.1.0-masked.safetensors", input_shape=(2, 12, 10))
    mpd.save(packed, HERE / "cnn-0.1.0-packed.safetensors", input_shape=(2, 12, 10))
    with torch.no_grad():
        save_file({"input": x, "masked": masked(x), "packed": packed(x)}, HERE / "cnn-0.1.0-io.safetensors")


if __name__ == "__main__":
    main()
