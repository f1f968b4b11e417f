"""The 100-mask study, trained as one stacked model.

Training ``M`` masked LeNet-300-100 models one after another costs ``M`` full runs. Here the
``M`` models share one forward: each layer's weights are stacked ``(M, d_out, d_in)`` and
multiplied with ``bmm``. The models start from the same initialization (as ``train`` with the
same seed gives), see the same mini-batches, and the loss is the sum of their losses, so every
model receives exactly its own gradient; Adam updates element-wise, so each model follows the
same trajectory as its own separate ``train`` run (up to float summation order).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..data import Split
from ..train import TrainConfig, build_for, prepare

__all__ = ["train_mask_study"]

# Qualified names of LeNet-300-100's layers inside its Sequential (as mpdify sees them).
_MASKED = ("1", "3")
_DENSE = ("5",)


def train_mask_study(
    mask_seeds: list[int],
    train_split: Split,
    test_split: Split,
    *,
    compression: int = 10,
    epochs: int = 20,
    seed: int = 0,
    batch_size: int = 50,
    lr: float = 1e-3,
    dataset: str = "mnist",
    init: str = "block",
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Train one LeNet-300-100 per mask seed; returns per-model test accuracies and the masks of fc2."""
    # Build every model exactly as train() would (same init, its own masks), then stack them.
    models = [build_for(TrainConfig(model="lenet300", compression=compression, seed=seed, mask_seed=s, init=init))
              for s in mask_seeds]
    m = len(models)
    masks, weights, biases = [], [], []
    for name in (*_MASKED, *_DENSE):
        layers = [model.get_submodule(name) for model in models]
        if name in _MASKED:
            stack = torch.stack([layer.mask for layer in layers])
        else:
            stack = torch.ones(m, layers[0].out_features, layers[0].in_features, dtype=torch.bool)
        masks.append(stack)
        weights.append(nn.Parameter(torch.stack([layer.weight.detach() for layer in layers])))
        biases.append(nn.Parameter(torch.stack([layer.bias.detach() for layer in layers])))
    params = [*weights, *biases]
    opt = torch.optim.Adam(params, lr=lr)

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(1, x.shape[0], -1).expand(m, -1, -1)
        for i, (w, b, mask) in enumerate(zip(weights, biases, masks)):
            h = torch.baddbmm(b.unsqueeze(1), h, (w * mask).transpose(1, 2))
            if i < len(weights) - 1:
                h = torch.relu(h)
        return h  # (M, batch, classes)

    x_all = prepare(train_split.images, dataset).flatten(1)
    y_all = train_split.labels
    n = len(train_split)
    history = []
    for epoch in range(epochs):
        # The same order train() uses for this seed and epoch.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            logits = forward(x_all[idx])
            y = y_all[idx].repeat(m)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y, reduction="sum") / batch_size
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        accuracies = _evaluate(forward, test_split, dataset)
        history.append(accuracies)
        if progress is not None:
            progress(f"mask study epoch {epoch + 1}/{epochs}: min {100 * min(accuracies):.2f} %, "
                     f"max {100 * max(accuracies):.2f} %")
    return {"accuracies": history[-1], "history": history, "fc2_masks": masks[1]}


@torch.no_grad()
def _evaluate(forward: Callable[[torch.Tensor], torch.Tensor], split: Split, dataset: str) -> list[float]:
    correct = None
    for start in range(0, len(split), 1000):
        x = prepare(split.images[start:start + 1000], dataset).flatten(1)
        hits = (forward(x).argmax(-1) == split.labels[start:start + 1000]).sum(1)
        correct = hits if correct is None else correct + hits
    return (correct.double() / len(split)).tolist()
