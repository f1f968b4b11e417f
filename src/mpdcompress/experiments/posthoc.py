"""The control with exact accuracy: compress a trained dense image classifier afterwards and
recover it by distillation, against MPD trained from scratch.

For each model, a dense network is trained with its recipe, compressed at the paper's factor
with random masks, weight-chosen masks, and calibrated ones (chosen for ``W² E[x²]`` on a few
thousand training images, kept weights refitted by least squares: :mod:`mpdcompress.posthoc.calibrate`)
on the paper's layers (the classifier stays dense where the paper kept it), then distilled from
the dense network (KL on the logits, no labels) for each step budget, each budget a separate run
from the same compressed start. Test accuracy is measured after every budget; the from-scratch
MPD accuracy comes from the same recipe.

With ``convs``, every convolution but the first is compressed too, and the masks may include
``"l1-filters"``: the baseline a CNN user picks instead, L1-norm filter pruning of the trained
model to the MPD model's parameter count (:mod:`mpdcompress.bench.filter_pruning`), distilled
the same way.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..bench.cnn import bisect_scale, parameter_count
from ..bench.filter_pruning import prune_filters
from ..core.convert import mpdify_, pack
from ..models import model_spec, paper_filter
from ..posthoc.calibrate import compress_calibrated
from ..posthoc.distill import DistillConfig, distill
from ..train import TrainConfig, train
from ..train.inputs import open_datasets, sampled_batches
from ..train.loop import evaluate

__all__ = ["PosthocProfile", "run_posthoc_study", "render_posthoc_report", "write_posthoc_report"]


@dataclass(frozen=True)
class PosthocProfile:
    """What the MNIST post-training study runs: models with their epochs and learning rate, budgets, masks."""

    # (model, training epochs, distillation lr). LeNet-300-100, every hidden layer compressed,
    # recovers best at 1e-2 (1 epoch of KL from weight-chosen masks: 96.1 / 97.3 / 97.7 / 96.8 %
    # at lr 1e-3 / 3e-3 / 1e-2 / 3e-2); Deep MNIST, one FC layer compressed, recovered at 1e-3.
    models: tuple[tuple[str, int, float], ...] = (("lenet300", 20, 1e-2), ("deep-mnist", 3, 1e-3))
    budgets: tuple[int, ...] = (0, 100, 1000)  # distillation steps; one epoch is always added
    masks: tuple[str, ...] = ("random", "weights", "calibrated")  # or "l1-filters" (with convs)
    calibration: int = 2000  # training images that calibrate the "calibrated" students
    batch_size: int = 50
    seed: int = 0
    train_limit: int | None = None  # images of the training set used (None: all)
    compression: int | None = None  # None: each model's paper factor
    convs: bool = False  # compress the convolutions too (all but the first)


def _epoch_steps(n_images: int, batch_size: int) -> int:
    return -(-n_images // batch_size)


def _pruned_to(dense: torch.nn.Module, parameters: int) -> torch.nn.Module:
    """``dense`` L1-filter-pruned at the scale (found by bisection) that leaves ``parameters``."""
    _, high = bisect_scale(lambda scale: parameter_count(prune_filters(dense, scale)), parameters, 20)
    return prune_filters(dense, high)


def _start(dense, name: str, masks: str, factor: int, profile: "PosthocProfile", calibration) -> torch.nn.Module:
    """The compressed (or pruned) student that every distillation budget starts from."""
    filter_fn = paper_filter(dense, name)
    options = {"filter_fn": filter_fn, "convs": profile.convs}
    if masks == "calibrated":
        return compress_calibrated(dense, factor, calibration, **options).eval()
    if masks == "l1-filters":
        mpd_parameters = parameter_count(pack(mpdify_(copy.deepcopy(dense), factor, **options)))
        return _pruned_to(dense, mpd_parameters).eval()
    return mpdify_(copy.deepcopy(dense), factor, masks=masks, **options).eval()


def run_posthoc_study(profile: PosthocProfile, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train dense models, compress them afterwards and distill them for each budget; returns the results."""
    say = progress or (lambda message: None)
    results: dict[str, Any] = {"profile": asdict(profile), "models": []}
    for name, epochs, lr in profile.models:
        factor = profile.compression or model_spec(name).compression
        entry: dict[str, Any] = {"model": name, "epochs": epochs, "lr": lr, "compression": factor, "rows": []}
        base = TrainConfig(model=name, epochs=epochs, seed=profile.seed, train_limit=profile.train_limit)
        say(f"{name}: training dense for {epochs} epochs")
        dense_run = train(TrainConfig(**{**asdict(base), "compression": None}))
        say(f"{name}: training MPD from scratch at {factor}x for {epochs} epochs")
        scratch = train(TrainConfig(**{**asdict(base), "compression": factor, "compress_convs": profile.convs}))
        entry["dense_accuracy"], entry["scratch_accuracy"] = dense_run.test_accuracy, scratch.test_accuracy
        dense = dense_run.model.eval()
        train_data, test_data = open_datasets(base.resolved())
        dataset = base.resolved().dataset
        epoch = _epoch_steps(len(train_data), profile.batch_size)
        entry["epoch_steps"] = epoch

        batch = sampled_batches(train_data, dataset, profile.batch_size, profile.seed)
        # Calibration images are drawn apart from the distillation batches' stream.
        calibration = [batch(-1 - k, 500) for k in range(-(-profile.calibration // 500))]
        for masks in profile.masks:
            start = _start(dense, name, masks, factor, profile, calibration)
            entry.setdefault("parameters", {})[masks] = parameter_count(pack(start) if masks != "l1-filters" else start)
            for steps in sorted({*profile.budgets, epoch}):
                student = copy.deepcopy(start)
                seconds = 0.0
                if steps:
                    say(f"{name}: distilling the {masks}-mask student for {steps} steps")
                    config = DistillConfig(steps=steps, lr=lr, seed=profile.seed, logits=("output",))
                    seconds = distill(student, dense, batch, config).seconds
                entry["rows"].append(
                    {
                        "masks": masks,
                        "steps": steps,
                        "accuracy": evaluate(student, test_data, dataset),
                        "seconds": seconds,
                    }
                )
        results["models"].append(entry)
    return results


def render_posthoc_report(results: dict[str, Any], command: str) -> str:
    """The study's results as a Markdown report headed by ``command``."""
    lines = [
        "# Compressing trained image classifiers afterwards, then distilling",
        "",
        f"Made by `{command}`. Each model is trained dense with its recipe, compressed at the paper's "
        "factor (the paper's layers) with random masks, weight-chosen masks (W²) or calibrated ones (masks for "
        f"W² E[x²] on {results['profile'].get('calibration', 0)} training images, kept weights refitted by least "
        "squares), and distilled from the dense "
        "model (KL on logits at T = 2, no labels, AdamW at each model's lr, batch "
        f"{results['profile']['batch_size']}, cosine schedule; each budget a separate run from the same start). "
        "Test accuracy in %; MPD from scratch is trained with the same recipe and epochs."
        + (
            " Every convolution but the first is compressed too; l1-filters: the trained model L1-norm "
            "filter-pruned to the MPD model's parameter count, distilled the same way."
            if results["profile"].get("convs")
            else ""
        ),
        "",
    ]
    for m in results["models"]:
        budgets = sorted({r["steps"] for r in m["rows"]})
        names = [f"{s} steps" + (" (1 epoch)" if s == m["epoch_steps"] else "") for s in budgets]
        lines += [
            f"## {m['model']} at {m['compression']}x ({m['epochs']} training epochs; distillation lr {m['lr']:g})",
            "",
            f"Dense: {100 * m['dense_accuracy']:.2f} %. MPD trained from scratch: {100 * m['scratch_accuracy']:.2f} %.",
            "",
            "| masks | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for masks in results["profile"]["masks"]:
            acc = {r["steps"]: r["accuracy"] for r in m["rows"] if r["masks"] == masks}
            lines.append(f"| {masks} | " + " | ".join(f"{100 * acc[s]:.2f}" for s in budgets) + " |")
        lines.append("")
    return "\n".join(lines)


def write_posthoc_report(results: dict[str, Any], out: Path, command: str, machine: dict[str, Any]) -> None:
    """Write the study's ``report.md`` and ``results.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**results, "command": command, "machine": machine}, indent=1))
    (out / "report.md").write_text(render_posthoc_report(results, command))
