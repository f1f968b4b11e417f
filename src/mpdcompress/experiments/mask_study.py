"""The 100-mask study, trained as one stacked compact model.

Training ``M`` LeNet-300-100 models one after another costs ``M`` full runs. Here each model is
built exactly as ``train`` builds it in compact mode (same seed, its own mask seed), and the
``M`` packed models are laid side by side as ONE packed chain: ``M * c`` blocks per layer, with
gathers that send every model its own permutation of the shared input, and the dense
classifiers as ``M`` more blocks. All models see the same mini-batches and the loss is the sum
of their losses, so each receives exactly its own gradient, and Adam updates element-wise: each
model follows the trajectory of its own ``train`` run (up to float summation order), at the
cost of a handful of large batched GEMMs per step instead of ``M`` small forwards.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..core.convert import compressed_layers
from ..data.sources import Split
from ..kernels import ChainWeights, run_chain
from ..models import classifier_name
from ..nn.packed import PackedChain
from ..train import TrainConfig, build_for, prepare

__all__ = ["train_mask_study"]


def _only_chain(model: nn.Module) -> PackedChain:
    (chain,) = compressed_layers(model).values()  # compact LeNet: fc1 and fc2 fused into one chain
    return chain


class _StackedLeNets(nn.Module):
    """``M`` compact LeNet-300-100 models (fc1, fc2 packed; classifier dense) as one chain."""

    def __init__(self, models: list[nn.Sequential]) -> None:
        super().__init__()
        chains: list[PackedChain] = [_only_chain(model) for model in models]
        classifiers: list[nn.Linear] = [model.get_submodule(classifier_name(model)) for model in models]
        fc1, fc2 = [c.layers[0] for c in chains], [c.layers[1] for c in chains]
        weights = [chain.chain_weights(kernel_indices=False) for chain in chains]
        self.m = len(models)
        width1 = fc1[0].weight_blocks.shape[0] * fc1[0].weight_blocks.shape[1]  # padded outputs per model
        width2 = fc2[0].weight_blocks.shape[0] * fc2[0].weight_blocks.shape[1]
        self.blocks = nn.ParameterList(
            [
                nn.Parameter(torch.cat([layer.weight_blocks.detach() for layer in fc1])),
                nn.Parameter(torch.cat([layer.weight_blocks.detach() for layer in fc2])),
                nn.Parameter(torch.stack([lin.weight.detach() for lin in classifiers])),
            ]
        )
        self.biases = nn.ParameterList(
            [
                nn.Parameter(torch.cat([layer.bias.detach() for layer in fc1])),
                nn.Parameter(torch.cat([layer.bias.detach() for layer in fc2])),
                nn.Parameter(torch.cat([lin.bias.detach() for lin in classifiers])),
            ]
        )
        pads = [None if layer.layout.is_even else layer.layout.padding_mask() for layer in (fc1[0], fc2[0])]
        self.pads = [None if p is None else p.repeat(self.m, 1, 1) for p in pads] + [None]
        self.gathers = [
            torch.cat([w.gathers[0] for w in weights]),
            torch.cat([k * width1 + w.gathers[1] for k, w in enumerate(weights)]),
            torch.cat([k * width2 + w.gathers[2] for k, w in enumerate(weights)]),
            torch.arange(self.m * classifiers[0].out_features),
        ]
        self.fc2_masks = torch.stack([layer.mpd_mask.dense() for layer in fc2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = [b if pad is None else b * pad for b, pad in zip(self.blocks, self.pads)]
        out = run_chain(x.flatten(1), ChainWeights(self.gathers, blocks, list(self.biases), [torch.relu, torch.relu]))
        return out.view(x.shape[0], self.m, -1)  # (batch, models, classes)


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
    models = [
        build_for(
            TrainConfig(model="lenet300", compression=compression, seed=seed, mask_seed=s, init=init, mode="compact")
        )
        for s in mask_seeds
    ]
    stacked = _StackedLeNets(models)
    opt = torch.optim.Adam(stacked.parameters(), lr=lr)
    x_all = prepare(train_split.images, dataset)
    y_all = train_split.labels
    n, m = len(train_split), len(mask_seeds)
    history = []
    for epoch in range(epochs):
        # The same order train() uses for this seed and epoch.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            logits = stacked(x_all[idx])
            loss = (
                nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y_all[idx].repeat_interleave(m), reduction="sum"
                )
                / batch_size
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        accuracies = _evaluate(stacked, test_split, dataset)
        history.append(accuracies)
        if progress is not None:
            progress(
                f"mask study epoch {epoch + 1}/{epochs}: min {100 * min(accuracies):.2f} %, "
                f"max {100 * max(accuracies):.2f} %"
            )
    return {"accuracies": history[-1], "history": history, "fc2_masks": stacked.fc2_masks}


@torch.no_grad()
def _evaluate(model: _StackedLeNets, split: Split, dataset: str) -> list[float]:
    correct = torch.zeros(model.m, dtype=torch.int64)
    for start in range(0, len(split), 1000):
        logits = model(prepare(split.images[start : start + 1000], dataset))
        correct += (logits.argmax(-1) == split.labels[start : start + 1000, None]).sum(0)
    return (correct.double() / len(split)).tolist()
