"""A self-contained end-to-end run on synthetic data: mask, train, pack, check exactness."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..core.convert import mpdify_, pack
from ..timing import median_seconds

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What the demo measured: losses, accuracy, sizes, exactness and speed of the packed model."""

    compression: int
    steps: int
    first_loss: float
    last_loss: float
    test_accuracy: float
    dense_fc_params: int
    packed_fc_params: int
    max_rel_error: float
    speedup_batch: int
    packed_speedup: float


def _cluster_task(seed: int, n_train: int, n_test: int) -> tuple[torch.Tensor, ...]:
    """Ten noisy Gaussian clusters in 784 dimensions (MNIST-shaped inputs, no download)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 784, generator=g) * 0.15
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    x = centers[y] + torch.randn(n_train + n_test, 784, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def run_demo(
    compression: int = 10,
    steps: int = 400,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> DemoResult:
    """Train a LeNet-300-100-shaped MLP with MPD masks on a synthetic cluster task, then pack it."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = _cluster_task(seed, 20_000, 2_000)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    dense_params = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    mpdify_(model, compression, seed=seed, init="block")  # trained from scratch
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, x_train.shape[0], (50,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    packed = pack(model)
    with torch.no_grad():
        reference = model(x_test)
        err = float((packed(x_test) - reference).abs().max() / reference.abs().max())
        accuracy = float((packed(x_test).argmax(1) == y_test).float().mean())
        dense = nn.Sequential(
            *[nn.Linear(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m for m in model]
        )
        batch = x_test[:256]
        t_dense = median_seconds(lambda: dense(batch))
        t_packed = median_seconds(lambda: packed(batch))
    packed_params = sum(p.numel() for n, p in packed.named_parameters() if n.endswith("weight_blocks"))
    return DemoResult(
        compression=compression,
        steps=steps,
        first_loss=losses[0],
        last_loss=sum(losses[-20:]) / 20,
        test_accuracy=accuracy,
        dense_fc_params=dense_params,
        packed_fc_params=packed_params,
        max_rel_error=err,
        speedup_batch=256,
        packed_speedup=t_dense / t_packed,
    )
