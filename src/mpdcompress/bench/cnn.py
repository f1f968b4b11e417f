"""Whole CNNs side by side: dense, MPD on the FC layers only, MPD on the convolutions and FC
layers, and what a CNN user picks instead at the same parameter count, a thinner dense network.

Every variant of one (model, factor, batch) is timed round-robin in one process, so the ratios
are what to read. Beside each speed-up stands its limit: the ratio of multiply-accumulates,
which an uncompressed first convolution caps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..core.batchnorm import fold_batchnorm_
from ..core.config import check_choice, checked_device
from ..core.convert import mpdify_, pack
from ..errors import ConfigError
from ..models import MODELS, build_model, paper_filter, scale_widths
from ..nn import MaskedWeight
from ..timing import cuda_medians, interleaved_medians
from .machine import describe_machine
from .training import adam_step_times

__all__ = [
    "CnnProfile",
    "CNN_MODELS",
    "run_cnn_bench",
    "render_cnn_report",
    "thin_dense",
    "thin_width",
    "bisect_scale",
    "parameter_count",
    "multiply_adds",
]

CNN_MODELS = ("deep-mnist", "tf-cifar10", "alexnet-bn", "resnet18-cifar", "vgg11-cifar")
VARIANTS = ("dense", "mpd_fc", "mpd_conv_fc", "thin_dense")
_FORMATS = {"channels_first": torch.contiguous_format, "channels_last": torch.channels_last}
LAYOUTS = tuple(_FORMATS)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class CnnProfile:
    """What the CNN section measures: models, factors, batches and samples per timing."""

    models: tuple[str, ...] = CNN_MODELS
    factors: tuple[int, ...] = (2, 4, 8)
    batches: tuple[int, ...] = (1, 64)
    repeats: int = 7
    # Memory formats every variant runs in; ratios are to the channels-first dense model, timed
    # round-robin with all of them (on this CPU, pooling runs far faster channels-last).
    layouts: tuple[str, ...] = LAYOUTS
    # Every variant times with its BatchNorms folded into the convolutions before them
    # (fold_batchnorm_), as a model is deployed; False times them as they train.
    fold_batchnorm: bool = True
    # On a GPU (cuDNN) every variant is timed by CUDA events, eagerly and as a CUDA-graph replay.
    device: str = "cpu"
    dtype: str = "fp32"
    # One Adam step (forward, backward, update; fp32, channels-first, BatchNorms training) at this
    # batch for every model and factor: dense, masked and compact training of MPD on the
    # convolutions and FC layers, and the thin dense network. None: no training rows.
    training_batch: int | None = 64


def multiply_adds(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one example's forward through ``model``'s convolutions and linear
    layers, counting only the weights a masked layer keeps."""
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        weight = module.weight
        per_output = weight[0].numel()  # in_channels/groups * kernel positions, or in_features
        density = 1.0
        if isinstance(module, MaskedWeight):
            layout = module.mpd_mask.layout
            density = layout.nnz / (layout.d_out * layout.d_in)
        total += round(output[0].numel() * per_output * density)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return total


def parameter_count(model: nn.Module) -> int:
    """How many parameters ``model`` holds."""
    return sum(p.numel() for p in model.parameters())


def bisect_scale(size_at: Callable[[float], int], target: int, iterations: int) -> tuple[float, float]:
    """``(low, high)`` around the scale in (0, 1] at which ``size_at(scale)`` reaches ``target``
    (``size_at`` grows with the scale), after ``iterations`` halvings."""
    low, high = 0.0, 1.0
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if size_at(mid) < target else (low, mid)
    return low, high


def thin_dense(name: str, parameters: int) -> nn.Module:
    """The registry model ``name`` with its inner widths scaled alike so that it holds about
    ``parameters`` parameters (bisection on the scale): the dense network of the same size."""
    return scale_widths(build_model(name), thin_width(name, parameters))


def thin_width(name: str, parameters: int) -> float:
    """The width scale at which the registry model ``name`` holds about ``parameters`` parameters."""
    model = build_model(name)
    low, high = bisect_scale(lambda scale: parameter_count(scale_widths(model, scale)), parameters, 30)
    return (low + high) / 2


def _variants(name: str, c: int) -> tuple[dict[str, nn.Module], dict[str, nn.Module], float]:
    """The four variants at factor ``c`` (packed where compressed), the two masked models, and the
    width scale of the thin dense network."""
    torch.manual_seed(0)
    dense = build_model(name).eval()
    # shared_streams: a residual network's streams stay in block order, without gathers (no
    # effect on networks without residual blocks).
    masked = {
        "mpd_conv_fc": mpdify_(
            copy.deepcopy(dense), c, filter_fn=paper_filter(dense, name), seed=0, convs=True, shared_streams=True
        )
    }
    if any(isinstance(m, nn.Linear) for n, m in dense.named_modules() if paper_filter(dense, name)(m, n)):
        masked["mpd_fc"] = mpdify_(copy.deepcopy(dense), c, filter_fn=paper_filter(dense, name), seed=0)
    models = {"dense": dense, **{k: pack(m).eval() for k, m in masked.items()}}
    width = thin_width(name, parameter_count(models["mpd_conv_fc"]))
    models["thin_dense"] = scale_widths(build_model(name), width).eval()
    return models, masked, width


def _training_variants(name: str, c: int, width: float) -> dict[str, nn.Module]:
    """The models whose training step is timed: dense, MPD on convs and FC masked (the paper's way)
    and compact (trained packed), and the thin dense network at ``width``, the packed model's size
    (the inference rows' bisection, not done again)."""
    torch.manual_seed(0)
    dense = build_model(name)
    compressed = {
        mode: mpdify_(
            copy.deepcopy(dense),
            c,
            filter_fn=paper_filter(dense, name),
            seed=0,
            convs=True,
            shared_streams=True,
            mode=mode,
        )
        for mode in ("masked", "compact")
    }
    return {"dense": dense, **compressed, "thin_dense": scale_widths(build_model(name), width)}


def _training_row(name: str, c: int, width: float, profile: CnnProfile, device: torch.device) -> dict[str, Any]:
    models = {k: m.to(device) for k, m in _training_variants(name, c, width).items()}
    batch = profile.training_batch
    x = torch.randn(batch, *MODELS[name].input_shape, device=device)
    y = torch.randint(0, MODELS[name].num_classes, (batch,), device=device)
    seconds, memory = adam_step_times(models, x, y, repeats=profile.repeats, device=device)
    return {"model": name, "compression": c, "batch": batch, "seconds": seconds, "state_bytes": memory}


def run_cnn_bench(
    profile: CnnProfile,
    *,
    command: str = "mpdcompress bench --profile cnn",
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time every variant of every model at every factor and batch; returns the result dict.
    ``on_row`` gets the result so far after each row (a run cut short keeps what it measured)."""
    say = progress or (lambda message: None)
    unknown = sorted(set(profile.layouts) - set(_FORMATS))
    if unknown or not profile.layouts:
        raise ConfigError(f"layouts must be some of {', '.join(_FORMATS)}, got {list(profile.layouts)}")
    device = checked_device(profile.device, "the CNN bench's device")
    dtype = check_choice("dtype", profile.dtype, tuple(DTYPES))
    result = {
        "command": command,
        "machine": describe_machine(str(device)),
        "profile": asdict(profile),
        "rows": [],
        "training_rows": [],
    }
    rows = result["rows"]
    for name in profile.models:
        shape = MODELS[name].input_shape
        for c in profile.factors:
            models, masked, width = _variants(name, c)
            dense_macs = multiply_adds(models["dense"], shape)
            sizes = {k: parameter_count(m) for k, m in models.items()}
            macs = {"dense": dense_macs, "thin_dense": multiply_adds(models["thin_dense"], shape)}
            macs.update({k: multiply_adds(m, shape) for k, m in masked.items()})
            if profile.fold_batchnorm:
                models = {k: fold_batchnorm_(m) for k, m in models.items()}
            models = {k: m.to(device=device, dtype=DTYPES[dtype]) for k, m in models.items()}
            placed = {layout: _in_layout(models, layout) for layout in profile.layouts}
            for batch in profile.batches:
                x = torch.randn(batch, *shape, device=device, dtype=DTYPES[dtype])
                calls = {}
                for layout, variants in placed.items():
                    xl = x.contiguous(memory_format=_FORMATS[layout])
                    calls.update({_key(k, layout): (lambda m=m, xl=xl: m(xl)) for k, m in variants.items()})
                row = {
                    "model": name,
                    "compression": c,
                    "batch": batch,
                    "layouts": list(profile.layouts),
                    "parameters": sizes,
                    "multiply_adds": macs,
                }
                with torch.no_grad():
                    if device.type == "cuda":
                        row["seconds"] = cuda_medians(calls, graph=False, repeats=profile.repeats)
                        row["graph_seconds"] = cuda_medians(calls, graph=True, repeats=profile.repeats)
                    else:
                        row["seconds"] = interleaved_medians(
                            calls, repeats=profile.repeats, min_time=0.05 if batch == 1 else 0
                        )
                rows.append(row)
                seconds = row["seconds"]
                if on_row is not None:
                    on_row(result)
                say(
                    f"{name} c={c} batch {batch}: "
                    + ", ".join(
                        f"{layout} {seconds[_key('dense', layout)] / seconds[_key('mpd_conv_fc', layout)]:.2f}x"
                        for layout in profile.layouts
                    )
                )
            if profile.training_batch:
                result["training_rows"].append(_training_row(name, c, width, profile, device))
                if on_row is not None:
                    on_row(result)
                s = result["training_rows"][-1]["seconds"]
                say(
                    f"{name} c={c} training step: masked {s['dense'] / s['masked']:.2f}x dense, compact {s['dense'] / s['compact']:.2f}x"
                )
    return result


def _key(variant: str, layout: str) -> str:
    """A variant's name in a row's timings: plain for channels-first, suffixed otherwise."""
    return variant if layout == "channels_first" else f"{variant} {layout}"


def _in_layout(models: dict[str, nn.Module], layout: str) -> dict[str, nn.Module]:
    if layout == "channels_first":
        return models
    return {k: copy.deepcopy(m).to(memory_format=_FORMATS[layout]) for k, m in models.items()}


def _machine(result: dict[str, Any]) -> str:
    machine = result["machine"]
    where = machine.get("gpu") if result["profile"].get("device", "cpu") != "cpu" else None
    where = f"{where} (cuDNN; timed by CUDA events)" if where else machine.get("cpu", "?")
    return f"{where}, torch {machine.get('torch', '?')}"


def render_cnn_report(result: dict[str, Any]) -> str:
    """The CNN section as Markdown: speed-ups over the channels-first dense model with their
    multiply-add limits, per memory format, and sizes."""
    lines = [
        "# Whole CNNs: MPD on convolutions and FC layers vs dense, FC-only MPD and a thin dense network",
        "",
        f"Command: `{result['command']}`. Machine: {_machine(result)}, {result['profile'].get('dtype', 'fp32')}. "
        "Each row's variants, in every memory format, were timed",
        "round-robin in one process; speed-ups are the time of the dense model in the row's first layout",
        "(channels-first unless only channels-last was asked for) / the variant's (medians), so the other",
        "layout's rows include what the layout alone gains (their *dense* column). Against the dense model",
        "in the same layout: divide by that column. *limit*: dense multiply-adds /",
        "the variant's (the uncompressed first convolution caps it). Parameters as a fraction of dense.",
        "MPD conv+FC draws one channel order per residual stream (`shared_streams=True`), so a packed ResNet",
        "gathers only inside its residual bodies.",
        "BatchNorms folded into the convolutions before them in every variant (`fold_batchnorm_`), as a model is "
        "deployed."
        if result["profile"].get("fold_batchnorm", False)
        else "BatchNorms run as they train (`--keep-batchnorm`).",
        "",
        "| model | c | batch | layout | dense × | MPD conv+FC × (limit) | MPD FC only × (limit) | thin dense × (limit) "
        "| params conv+FC | params thin |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        m, p = row["multiply_adds"], row["parameters"]
        layouts = row.get("layouts", ["channels_first"])
        # On a GPU: eager calls, then the same calls replayed from a CUDA graph (no host overhead).
        timings = [("", row["seconds"])] + ([(", CUDA graph", row["graph_seconds"])] if "graph_seconds" in row else [])
        for how, s in timings:
            reference = s[_key("dense", layouts[0])]
            for layout in layouts:

                def cell(variant: str, layout: str = layout, s: dict = s, reference: float | None = reference) -> str:
                    key = _key(variant, layout)
                    if key not in s:
                        return "— (no FC layer to compress)"
                    if s[key] is None or reference is None:
                        return "— (not capturable)"
                    return f"{reference / s[key]:.2f}× ({m['dense'] / m[variant]:.2f}×)"

                dense = cell("dense").split(" (")[0]
                lines.append(
                    f"| {row['model']} | {row['compression']} | {row['batch']} | {layout.replace('_', ' ')}{how} "
                    f"| {dense} | {cell('mpd_conv_fc')} | {cell('mpd_fc')} | {cell('thin_dense')} "
                    f"| {p['mpd_conv_fc'] / p['dense']:.3f} | {p['thin_dense'] / p['dense']:.3f} |"
                )
    return "\n".join(lines + _training_table(result.get("training_rows", []))) + "\n"


def _training_table(rows: list[dict[str, Any]]) -> list[str]:
    """Training-step speed-ups over dense, and the memory of compact training's weights and Adam state."""
    if not rows:
        return []
    lines = [
        "",
        "## Training step (Adam: forward, backward, update; fp32, channels-first, BatchNorms training)",
        "",
        "Speed-ups: the dense step's time / the variant's (medians, timed round-robin in one process). MPD "
        "on the convolutions and FC layers trained masked (`mpdify_`, the paper's way) and compact "
        '(`mode="compact"`, trained packed); the thin dense network has the packed model\'s parameters.',
        "",
        "| model | c | batch | masked × | compact × | compact × masked | thin dense × "
        "| weights + Adam state, compact / masked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s, m = row["seconds"], row["state_bytes"]
        lines.append(
            f"| {row['model']} | {row['compression']} | {row['batch']} | {s['dense'] / s['masked']:.2f}× "
            f"| {s['dense'] / s['compact']:.2f}× | {s['masked'] / s['compact']:.2f}× | {s['dense'] / s['thin_dense']:.2f}× "
            f"| {m['compact']['total'] / m['masked']['total']:.3f} |"
        )
    return lines
