"""The smallest model: whole-file bytes, test accuracy and CPU speed of MPD × {fp32, int8, int4}
against the dense model, the dense model quantized the same way (what a user tries first), and
Deep Compression's published figures.

Every size is a file on disk: MPD models as :func:`~mpdcompress.save` writes them (manifest,
permutations, biases, scales and dense layers included); the dense baselines as a safetensors
file of their state dict (quantized: integer weights and scales, as torchao-style weight-only
quantization stores them). A quantized format applies to the whole model: the dense layers a
packed model keeps (the classifier) are quantized alike (``quantize_(..., dense_layers=True)``).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bench.runtimes import packed_variants
from ..core.convert import pack
from ..core.qat import fake_quantize_
from ..core.quantize import QuantConfig, quantize_
from ..data.datasets import load_dataset
from ..files.io import save
from ..models import model_spec
from ..nn.packed_conv import BlockDiagonalConv
from ..paper import DEEP_COMPRESSION
from ..plotting import pyplot
from ..posthoc.distill import DistillConfig, distill
from ..timing import interleaved_medians
from ..train import TrainConfig, train
from ..train.inputs import open_datasets, sampled_batches
from ..train.loop import evaluate

__all__ = ["SizeProfile", "run_size_study", "render_size_study", "plot_size_study"]


@dataclass(frozen=True)
class SizeProfile:
    """What the study trains and measures."""

    model: str = "lenet300"
    dataset: str = "mnist"
    compressions: tuple[int, ...] = (4, 8, 10, 16)
    formats: tuple[str, ...] = ("int8", "int4", "int4-g128")
    epochs: int = 20
    seed: int = 0
    train_limit: int | None = None
    speed_compression: int = 10  # the factor timed at batch 1 and 64
    size_only: str | None = "alexnet-fc"  # a model sized and timed with random weights (no data here)
    size_only_compression: int = 8
    # Quantization-aware training: each 4-bit format also as the packed model distilled from its
    # own fp32 form for this many steps with its blocks rounded as stored (0: none).
    qat_steps: int = 0
    qat_lr: float = 1e-4
    qat_batch: int = 64
    compress_convs: bool = False  # also the convolutions (but the image-reading one), weight-only quantized


def _file_bytes(write: Callable[[Path], object]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        write(path)
        return path.stat().st_size


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    from safetensors.torch import save_file

    return _file_bytes(lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))


def _speed(models: dict[str, nn.Module], input_shape: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Median seconds per forward at batch 1 and 64, every model timed round-robin."""
    out = {}
    for batch in (1, 64):
        x = torch.randn(batch, *input_shape)
        calls = {name: (lambda m=m: m(x)) for name, m in models.items()}
        with torch.no_grad():
            out[str(batch)] = interleaved_medians(calls, repeats=21, min_time=0.01)
    return out


def run_size_study(profile: SizeProfile, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the dense model and one MPD model per factor, then size, score and time every format."""
    say = progress or (lambda message: None)
    spec = model_spec(profile.model)
    splits = {split: load_dataset(profile.dataset, split) for split in ("train", "test")}
    test = splits["test"]
    base = TrainConfig(model=profile.model, dataset=profile.dataset, epochs=profile.epochs, seed=profile.seed)
    train_images, test_images = open_datasets(base.resolved(), splits["train"], test)
    batches = sampled_batches(train_images, profile.dataset, profile.qat_batch, profile.seed)

    def score(model: nn.Module) -> float:
        return evaluate(model, test_images, profile.dataset)

    def trained(compression: int | None) -> nn.Module:
        label = "dense" if compression is None else f"MPD c={compression}"
        say(f"{label}: training {profile.epochs} epochs")
        config = TrainConfig(
            model=profile.model,
            dataset=profile.dataset,
            compression=compression,
            epochs=profile.epochs,
            seed=profile.seed,
            mask_seed=profile.seed,
            train_limit=profile.train_limit,
            compress_convs=profile.compress_convs,
        )
        return train(config, train_split=splits["train"], test_split=test).model.eval()

    dense = trained(None)
    rows = [
        {"model": "dense", "format": "fp32", "bytes": _safetensors_bytes(dense.state_dict()), "accuracy": score(dense)}
    ]
    for name in profile.formats:
        quantized = quantize_(copy.deepcopy(dense), name, dense_layers=True)
        rows.append(
            {
                "model": "dense",
                "format": name,
                "bytes": _safetensors_bytes(quantized.state_dict()),
                "accuracy": score(quantized),
            }
        )
    timed: dict[str, nn.Module] = {"dense fp32": dense}
    for c in profile.compressions:
        packed = pack(trained(c))
        variants = {"fp32": packed}
        for name in profile.formats:
            variants[name] = quantize_(copy.deepcopy(packed), name, dense_layers=True)
        for name in profile.formats if profile.qat_steps else ():
            if QuantConfig.parse(name).bits == 4:
                say(f"MPD c={c} {name}: {profile.qat_steps} quantization-aware steps")
                variants[f"{name} QAT"] = _quantization_aware(packed, name, batches, profile)
        for name, model in variants.items():
            size, seeded = (
                _file_bytes(lambda p, m=model, s=storage: save(m, p, input_shape=spec.input_shape, mask_storage=s))
                for storage in ("orders", "seed")
            )
            rows.append(
                {
                    "model": f"mpd c={c}",
                    "compression": c,
                    "format": name,
                    "bytes": size,
                    "seed_bytes": seeded,
                    "accuracy": score(model),
                }
            )
            say(
                f"MPD c={c} {name}: {size:,} bytes ({seeded:,} with masks as seeds), {100 * rows[-1]['accuracy']:.2f} %"
            )
        if c == profile.speed_compression:
            timed.update({f"MPD c={c} fp32": packed, f"MPD c={c} int8": variants.get("int8", packed)})
            timed[f"MPD c={c} int8-dynamic"] = quantize_(
                copy.deepcopy(packed), "int8-dynamic", dense_layers=True, filter_fn=_linear_layers
            )
    say("timing at batch 1 and 64")
    results = {"profile": asdict(profile), "rows": rows, "seconds": _speed(timed, spec.input_shape)}
    if profile.size_only:
        say(f"{profile.size_only}: sizes and speed with random weights")
        results["size_only"] = _size_only(profile.size_only, profile.size_only_compression, profile.formats)
    return results


def _linear_layers(module: nn.Module, name: str) -> bool:
    """fbgemm's int8 GEMMs (dynamic activations) are for linear layers: convolutions stay float."""
    return not isinstance(module, BlockDiagonalConv)


def _quantization_aware(packed: nn.Module, name: str, batches, profile: SizeProfile) -> nn.Module:
    """``packed`` quantized as ``name`` after learning the rounding: distilled from itself in fp32
    with its blocks rounded as stored (:func:`fake_quantize_`); its dense layers are rounded
    after training."""
    student = fake_quantize_(copy.deepcopy(packed), name)
    config = DistillConfig(steps=profile.qat_steps, lr=profile.qat_lr, seed=profile.seed, logits=("output",))
    distill(student, packed, batches, config)
    return quantize_(student.eval(), name, dense_layers=True)


def _size_only(name: str, c: int, formats: tuple[str, ...]) -> dict[str, Any]:
    """File bytes of the dense and the packed model in every format, and their speed (random
    weights: what is measured does not depend on them)."""
    spec = model_spec(name)
    models = packed_variants(name, c, formats)
    dense, packed = models.pop("dense fp32"), models[f"MPD c={c} fp32"]
    sizes = {"dense fp32": _safetensors_bytes(dense.state_dict())}
    for fmt in formats:
        sizes[f"dense {fmt}"] = _safetensors_bytes(quantize_(copy.deepcopy(dense), fmt, dense_layers=True).state_dict())
    for label, model in models.items():
        sizes[label.replace("MPD", "mpd")] = _file_bytes(lambda p, m=model: save(m, p, input_shape=spec.input_shape))
    timed = {"dense fp32": dense, f"MPD c={c} fp32": packed}
    if f"MPD c={c} int8" in models:
        timed[f"MPD c={c} int8"] = models[f"MPD c={c} int8"]
    timed[f"MPD c={c} int8-dynamic"] = quantize_(copy.deepcopy(packed), "int8-dynamic")
    return {"model": name, "compression": c, "bytes": sizes, "seconds": _speed(timed, spec.input_shape)}


def render_size_study(results: dict[str, Any], command: str) -> str:
    """The study as Markdown: sizes, ratios to the dense fp32 file, accuracy, speed."""
    p = results["profile"]
    rows = results["rows"]
    dense = next(r for r in rows if r["model"] == "dense" and r["format"] == "fp32")
    fp32 = {r["compression"]: r for r in rows if r.get("compression") and r["format"] == "fp32"}
    lines = [
        f"# The smallest model: {p['model']} on {p['dataset']}, MPD × int8 / int4",
        "",
        f"Command: `{command}`. Each model trained from scratch for {p['epochs']} epochs (seed {p['seed']}) "
        "with the model's recipe"
        + ("; MPD on its convolutions too (but the one that reads the image)" if p.get("compress_convs") else "")
        + "; quantized after training, no fine-tuning"
        + (
            f" (rows marked QAT: the packed model first distilled from its own fp32 form for {p['qat_steps']:,} "
            f"steps of {p['qat_batch']} training images, AdamW at lr {p['qat_lr']:g}, with its blocks rounded as "
            "stored: `fake_quantize_`; its classifier rounded after)"
            if p.get("qat_steps")
            else ""
        )
        + ". Sizes are whole files: MPD as "
        "`mpdcompress.save` writes them (manifest, permutations, biases, scales; the classifier, which MPD leaves "
        "dense, quantized like the blocks: `quantize_(..., dense_layers=True)`); the "
        "dense baselines as a safetensors file of their state dict. *Masks as seeds*: the same MPD file written "
        'with `save(..., mask_storage="seed")`, which leaves out the random masks\' orders and draws them again '
        "from the recorded seed on load (checked by digest). Accuracy on the test split.",
        "",
        "| model | format | file bytes | smaller than dense fp32 | masks as seeds: bytes (smaller) | test accuracy "
        "| vs dense | vs fp32 MPD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = fp32.get(r.get("compression"))
        versus = "" if base is None or r is base else f"{100 * (r['accuracy'] - base['accuracy']):+.2f}"
        seeded = f"{r['seed_bytes']:,} ({dense['bytes'] / r['seed_bytes']:.1f}×)" if "seed_bytes" in r else ""
        lines.append(
            f"| {r['model']} | {r['format']} | {r['bytes']:,} | {dense['bytes'] / r['bytes']:.1f}× | {seeded} | "
            f"{100 * r['accuracy']:.2f} % | {100 * (r['accuracy'] - dense['accuracy']):+.2f} | {versus} |"
        )
    # Deep Compression's LeNet figures are on MNIST: beside another dataset they compare nothing.
    reference = DEEP_COMPRESSION.get(p["model"]) if p["dataset"] == "mnist" else None
    if reference is not None:
        error = (
            ""
            if reference.top1_error is None
            else f", top-1 error {reference.top1_error[0]} % → {reference.top1_error[1]} %"
        )
        lines += [
            "",
            f"Deep Compression (Han et al., ICLR 2016, pruning + quantization + Huffman coding): "
            f"{reference.dense_bytes / 1000:,.0f} KB → {reference.compressed_bytes / 1000:,.0f} KB, "
            f"{reference.ratio:.0f}× smaller{error}; its sparse result needs sparse kernels to run.",
        ]
    lines += ["", *_targets(rows, dense, fp32), "", f"## Speed of {p['model']} on this CPU (PyTorch eager)", ""]
    lines += _speed_table(results["seconds"])
    if "size_only" in results:
        lines += _size_only_section(results["size_only"])
    lines += [
        "",
        "Speed: ratios of medians timed round-robin in one run (higher is faster). Weight-only int8 dequantizes "
        "its blocks in every forward (PyTorch has no fast weight-only int8 GEMM on this CPU: its "
        "`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` measured 4-60× slower than the float blocks); "
        "int8-dynamic runs fbgemm's int8 GEMMs with activations quantized on the fly (linear layers; compressed "
        "convolutions stay float there).",
    ]
    return "\n".join(lines) + "\n"


def _speed_table(seconds: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| model | batch 1 vs dense | batch 64 vs dense |", "|---|---|---|"]
    for name in seconds["1"]:
        cells = [f"{seconds[b]['dense fp32'] / seconds[b][name]:.2f}×" for b in ("1", "64")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return lines


def _size_only_section(section: dict[str, Any]) -> list[str]:
    sizes = section["bytes"]
    dense = sizes["dense fp32"]
    lines = [
        "",
        f"## {section['model']} (size and speed only: random weights, no data here)",
        "",
        "| model | file bytes | smaller than dense fp32 |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {size:,} | {dense / size:.1f}× |" for name, size in sizes.items()]
    reference = DEEP_COMPRESSION.get(section["model"].split("-")[0])
    if reference is not None:
        lines += [
            "",
            f"Deep Compression's whole AlexNet: {reference.ratio:.0f}× smaller "
            f"({reference.dense_bytes / 1e6:.0f} MB → {reference.compressed_bytes / 1e6:.1f} MB).",
        ]
    return [*lines, "", *_speed_table(section["seconds"])]


def _targets(rows: list[dict[str, Any]], dense: dict[str, Any], fp32: dict[int, dict[str, Any]]) -> list[str]:
    """Issue 27's LeNet targets, each met or not by the best row that satisfies it, with masks
    stored as orders first and, where that falls short, as seeds."""
    out = ["## Targets", "", "Set for LeNet-300-100 (issue 27); for other models, the same bars for comparison.", ""]
    for ratio, points, to_fp32 in ((40, 1.0, 0.2), (60, 1.5, None)):
        condition = f"≥ {ratio}× smaller, within {points} point of dense" + (
            f" and {to_fp32} of fp32 MPD at the same c" if to_fp32 else ""
        )
        for size, how in (("bytes", ""), ("seed_bytes", " with masks as seeds")):
            fits = [
                r
                for r in rows
                if r.get("compression")
                and dense["bytes"] / r.get(size, r["bytes"]) >= ratio
                and 100 * (dense["accuracy"] - r["accuracy"]) <= points
                and (to_fp32 is None or 100 * (fp32[r["compression"]]["accuracy"] - r["accuracy"]) <= to_fp32)
            ]
            if fits:
                best = max(fits, key=lambda r: r["accuracy"])
                out.append(
                    f"- {condition}: **met**{how} by {best['model']} {best['format']} "
                    f"({dense['bytes'] / best.get(size, best['bytes']):.1f}×, {100 * best['accuracy']:.2f} %)."
                )
                break
        else:
            out.append(f"- {condition}: **not met** by any row, with masks as orders or as seeds.")
    return out


def plot_size_study(results: dict[str, Any], path: Path) -> Path:
    """Test accuracy against how many times smaller than the dense fp32 file, per format."""
    plt = pyplot()
    rows = results["rows"]
    dense = next(r for r in rows if r["model"] == "dense" and r["format"] == "fp32")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for family in ("dense", "mpd"):
        for fmt in dict.fromkeys(r["format"] for r in rows):
            points = [r for r in rows if r["model"].startswith(family) and r["format"] == fmt]
            if points:
                xs = [dense["bytes"] / r["bytes"] for r in points]
                ax.plot(
                    xs, [100 * r["accuracy"] for r in points], "o-" if family == "mpd" else "s", label=f"{family} {fmt}"
                )
    reference = DEEP_COMPRESSION.get(results["profile"]["model"])
    if reference is not None and reference.top1_error is not None:
        ax.plot([reference.ratio], [100 - reference.top1_error[1]], "k*", markersize=12, label="Deep Compression")
    ax.set_xscale("log")
    ax.set_xlabel("times smaller than the dense fp32 file")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
