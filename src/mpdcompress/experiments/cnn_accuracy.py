"""Accuracy of whole-CNN compression trained from scratch on real data: the dense model, MPD on
its convolutions and FC layers, and a thin dense network with the same number of parameters,
each trained with the model's recipe from several seeds."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..bench.cnn import thin_width
from ..errors import ConfigError
from ..models import build_model, paper_filter
from ..train import TrainConfig, train

__all__ = ["CnnAccuracyProfile", "resumable_rows", "run_cnn_accuracy", "render_cnn_accuracy"]


# What the study compares, in the order it trains and reports them.
VARIANTS = ("dense", "mpd_conv_fc", "thin_dense")


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


def resumable_rows(previous: dict[str, Any], profile: CnnAccuracyProfile) -> list[dict[str, Any]]:
    """The rows of an earlier run of this study (its ``results.json``) that ``profile`` would
    train again: same model, data, factor, epochs and train limit, a seed ``profile`` asks for.
    A run with other settings is refused (ConfigError naming them): its rows measure something else."""
    ours, theirs = asdict(profile), previous.get("profile", {})
    differing = [key for key in ours if key != "seeds" and theirs.get(key) != ours[key]]
    if differing:
        changes = ", ".join(f"{key} {theirs.get(key)!r} there, {ours[key]!r} here" for key in differing)
        raise ConfigError(f"the earlier results were made with other settings ({changes}); resume with the same ones")
    return [row for row in previous.get("rows", []) if row["seed"] in profile.seeds]


def run_cnn_accuracy(
    profile: CnnAccuracyProfile,
    progress: Callable[[str], None] | None = None,
    done: Sequence[dict[str, Any]] = (),
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train every variant from every seed; returns test accuracies, per-epoch test accuracies and
    sizes. Rows in ``done`` (from :func:`resumable_rows`) are kept, not trained again, so a study of
    hours can be finished over several sittings; ``on_row`` gets the results so far after every
    trained row (a run cut short keeps what it trained)."""
    say = progress or (lambda message: None)
    mpd_parameters = _mpd_parameters(profile)
    width = thin_width(profile.model, mpd_parameters)
    variants = {
        "dense": {"compression": None},
        "mpd_conv_fc": {"compression": profile.compression, "compress_convs": True},
        "thin_dense": {"compression": None, "width": width},
    }

    def report_epochs(event: dict[str, Any]) -> None:
        if event["event"] == "epoch":
            say(f"  epoch {event['epoch']}: test accuracy {100 * event['test_accuracy']:.2f} %")

    rows = {(row["variant"], row["seed"]): row for row in done}
    results: dict[str, Any] = {"profile": asdict(profile), "thin_width": width}

    def so_far() -> dict[str, Any]:  # every row there is, the kept ones included, in table order
        results["rows"] = [rows[v, s] for v in variants for s in profile.seeds if (v, s) in rows]
        return results

    for variant, options in variants.items():
        for seed in profile.seeds:
            if (variant, seed) in rows:
                say(f"{variant}, seed {seed}: {100 * rows[variant, seed]['accuracy']:.2f} % (from the earlier run)")
                continue
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
            result = train(config, progress=report_epochs)
            parameters = sum(p.numel() for p in result.model.parameters())
            if variant == "mpd_conv_fc":  # the masked model stores dense tensors; count what packing keeps
                parameters = mpd_parameters
            rows[variant, seed] = {
                "variant": variant,
                "seed": seed,
                "accuracy": result.test_accuracy,
                "parameters": parameters,
                "epoch_accuracies": [epoch["test_accuracy"] for epoch in result.history],
                "seconds": result.seconds,
            }
            say(f"{variant}, seed {seed}: {100 * result.test_accuracy:.2f} %")
            if on_row is not None:
                on_row(so_far())
    return so_far()


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
    runs = len(VARIANTS) * len(p["seeds"])
    if len(results["rows"]) < runs:
        lines += ["", f"Partial: {len(results['rows'])} of the {runs} training runs are done."]
    return "\n".join(lines + _epoch_table(results["rows"], variants)) + "\n"


def _epoch_table(rows: list[dict[str, Any]], variants: Iterable[str]) -> list[str]:
    """Test accuracy after every epoch, mean over seeds, for the variants whose rows recorded it
    (rows of runs made before the study kept them have none)."""
    curves = {}
    for variant in variants:
        per_seed = [r.get("epoch_accuracies") for r in rows if r["variant"] == variant]
        if per_seed and all(per_seed):
            curves[variant] = [100 * statistics.mean(epoch) for epoch in zip(*per_seed)]
    if not curves:
        return []
    epochs = max(len(curve) for curve in curves.values())
    lines = [
        "",
        "Test accuracy after each epoch, mean over the seeds (%):",
        "",
        "| variant | " + " | ".join(str(e) for e in range(1, epochs + 1)) + " |",
        "|---|" + "---|" * epochs,
    ]
    for variant, curve in curves.items():
        lines.append(f"| {variant} | " + " | ".join(f"{a:.2f}" for a in curve) + " |")
    return lines
