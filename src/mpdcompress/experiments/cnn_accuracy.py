"""Accuracy of whole-CNN compression trained from scratch on real data: the dense model, MPD on
its convolutions and FC layers, and a thin dense network with the same number of parameters,
each trained with the model's recipe from several seeds."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..bench.cnn import thin_width
from ..models import build_model, paper_filter
from ..train import TrainConfig, train

__all__ = ["CnnAccuracyProfile", "run_cnn_accuracy", "render_cnn_accuracy"]


@dataclass(frozen=True)
class CnnAccuracyProfile:
    """What the study trains: the model, its dataset, the factor, epochs, seeds and a train limit."""

    model: str = "deep-mnist"
    dataset: str = "mnist"
    compression: int = 4
    epochs: int = 3
    seeds: tuple[int, ...] = (0, 1)
    train_limit: int | None = None  # images per epoch (None: the whole training set)


def _mpd_parameters(profile: CnnAccuracyProfile) -> int:
    from ..core.convert import mpdify_, pack

    model = build_model(profile.model)
    mpdify_(model, profile.compression, filter_fn=paper_filter(model, profile.model), convs=True)
    return sum(p.numel() for p in pack(model).parameters())


def run_cnn_accuracy(profile: CnnAccuracyProfile, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train every variant from every seed; returns test accuracies and sizes."""
    say = progress or (lambda message: None)
    mpd_parameters = _mpd_parameters(profile)
    width = thin_width(profile.model, mpd_parameters)
    variants = {
        "dense": {"compression": None},
        "mpd_conv_fc": {"compression": profile.compression, "compress_convs": True},
        "thin_dense": {"compression": None, "width": width},
    }
    rows = []
    for variant, options in variants.items():
        for seed in profile.seeds:
            say(f"{variant}, seed {seed}: training {profile.epochs} epochs")
            config = TrainConfig(
                model=profile.model,
                dataset=profile.dataset,
                epochs=profile.epochs,
                seed=seed,
                mask_seed=seed,
                train_limit=profile.train_limit,
                **options,
            )
            result = train(config)
            parameters = sum(p.numel() for p in result.model.parameters())
            if variant == "mpd_conv_fc":  # the masked model stores dense tensors; count what packing keeps
                parameters = mpd_parameters
            rows.append({"variant": variant, "seed": seed, "accuracy": result.test_accuracy, "parameters": parameters})
            say(f"{variant}, seed {seed}: {100 * result.test_accuracy:.2f} %")
    return {"profile": asdict(profile), "thin_width": width, "rows": rows}


def render_cnn_accuracy(results: dict[str, Any], command: str) -> str:
    """The study as Markdown: mean and per-seed test accuracy and parameters of each variant."""
    p = results["profile"]
    lines = [
        f"# {p['model']} on {p['dataset']}: MPD on convolutions and FC layers vs dense vs thin dense",
        "",
        f"Command: `{command}`. {p['epochs']} epochs with the model's recipe, seeds {list(p['seeds'])}, "
        f"MPD at c = {p['compression']} on every convolution but the first and on the FC layers the paper "
        f"compresses; thin dense: every inner width times {results['thin_width']:.3f}, which gives it the "
        "MPD model's parameter count. Test accuracy on the dataset's test split.",
        "",
        "| variant | parameters | test accuracy, mean | per seed |",
        "|---|---|---|---|",
    ]
    variants = dict.fromkeys(row["variant"] for row in results["rows"])
    for variant in variants:
        rows = [r for r in results["rows"] if r["variant"] == variant]
        accuracies = [100 * r["accuracy"] for r in rows]
        per_seed = ", ".join(f"{a:.2f}" for a in accuracies)
        lines.append(f"| {variant} | {rows[0]['parameters']:,} | {statistics.mean(accuracies):.2f} % | {per_seed} |")
    return "\n".join(lines) + "\n"
