"""Pictures for the report: Fig. 1-style masks, the mask-sum heat map, accuracy per mask."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.masks import make_mask
from ..nn.masked import MPDLinear
from ..paper import MASK_STUDY_FLOOR
from ..plotting import pyplot as _plt

__all__ = ["plot_masks", "plot_trained_layer", "plot_mask_study", "plot_mask_sum"]


def plot_masks(path: Path, d_out: int = 100, d_in: int = 300, c: int = 10, seed: int = 0) -> Path:
    """Fig. 1(e)/(f): a block-diagonal matrix and the permuted mask built from it."""
    plt = _plt()
    mask = make_mask(d_out, d_in, c, seed=seed)
    fig, axes = plt.subplots(1, 2, figsize=(10, 2.6))
    axes[0].imshow(mask.layout.block_diagonal().numpy(), cmap="Greys", aspect="auto", interpolation="nearest")
    axes[0].set_title(f"block-diagonal B ({d_out}x{d_in}, c={c})")
    axes[1].imshow(mask.dense().numpy(), cmap="Greys", aspect="auto", interpolation="nearest")
    axes[1].set_title("MPD mask M = P_row B P_col")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trained_layer(path: Path, layer: MPDLinear) -> Path:
    """A trained masked layer before and after undoing its permutations (W∘M vs W*)."""
    plt = _plt()
    w = (layer.weight * layer.mask).detach().abs()
    unpermuted = w[layer.row_order][:, layer.col_order]
    fig, axes = plt.subplots(1, 2, figsize=(10, 2.6))
    for ax, data, title in (
        (axes[0], w, "trained W∘M (as trained)"),
        (axes[1], unpermuted, "W* = P_rowᵀ (W∘M) P_colᵀ"),
    ):
        ax.imshow((data > 0).numpy(), cmap="Greys", aspect="auto", interpolation="nearest")
        ax.set_title(f"{title}, {tuple(data.shape)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mask_study(path: Path, accuracies: list[float], paper_min: float = MASK_STUDY_FLOOR) -> Path:
    """Fig. 4(a): test accuracy of each independently masked model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, len(accuracies) + 1), [100 * a for a in accuracies], "o", ms=3)
    ax.axhline(paper_min, color="red", ls="--", lw=1, label=f"paper: every mask > {paper_min} %")
    ax.set_xlabel("mask")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mask_sum(path: Path, mask_sum: torch.Tensor, n_masks: int, density: float) -> Path:
    """Fig. 4(b): the sum of the masks of one layer over all drawn masks."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3))
    im = ax.imshow(mask_sum.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_title(
        f"sum of {n_masks} masks: mean {float(mask_sum.float().mean()):.2f} "
        f"(expected {n_masks * density:.2f}), min {int(mask_sum.min())}, max {int(mask_sum.max())}"
    )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
