"""One model in every runtime it deploys to: PyTorch eager, ONNX Runtime and ExecuTorch (XNNPACK),
dense fp32 beside packed fp32 and quantized, timed side by side within each runtime.

Each runtime's ratios are to the dense fp32 model in that same runtime; every output is checked
against PyTorch's before it is timed.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.convert import mpdify_, pack
from ..core.quantize import quantize_
from ..models import build_model, model_spec, paper_filter
from ..timing import interleaved_medians

__all__ = ["packed_variants", "run_runtime_bench", "render_runtime_bench"]

# Variants exported with int8_activations=True (ExecuTorch: XNNPACK's int8 kernels; ONNX Runtime:
# MatMulNBits at accuracy level 4), and ONNX variants with int4 layers as MatMulNBits.
_INT8_ACTIVATIONS = " + int8 activations"
_MATMULNBITS = " as MatMulNBits"


def packed_variants(name: str, c: int, formats: tuple[str, ...]) -> dict[str, nn.Module]:
    """Registry model ``name`` (random weights, seed 0) as ``dense fp32``, packed at ``c`` as
    ``MPD c=<c> fp32``, and that packed model quantized in each format (``MPD c=<c> int8``...)."""
    torch.manual_seed(0)
    dense = build_model(name).eval()
    masked = copy.deepcopy(dense)
    mpdify_(masked, c, filter_fn=paper_filter(masked, name), seed=0)
    packed = pack(masked, inplace=True).eval()
    variants = {"dense fp32": dense, f"MPD c={c} fp32": packed}
    for fmt in formats:
        variants[f"MPD c={c} {fmt}"] = quantize_(copy.deepcopy(packed), fmt)
    return variants


def _sessions(runtime: str, models: dict[str, nn.Module], example: torch.Tensor, folder: Path) -> dict[str, Any]:
    """Per variant, a function of one input tensor that runs it in ``runtime``."""
    runners: dict[str, Any] = {}
    for label, model in models.items():
        if runtime == "pytorch":
            runners[label] = model
        elif runtime == "onnxruntime":
            import onnxruntime as ort

            from ..files.onnx import export_onnx

            path = export_onnx(
                model,
                example,
                folder / f"{len(runners)}.onnx",
                quantized_ops="matmulnbits" if label.endswith(_MATMULNBITS) else "dequantize",
                int8_activations=label.endswith(_INT8_ACTIVATIONS),
            )
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            runners[label] = lambda x, s=session: torch.from_numpy(s.run(None, {"input": x.numpy()})[0])
        else:
            from executorch.runtime import Runtime

            from ..files.executorch import export_executorch

            path = export_executorch(
                model, example, folder / f"{len(runners)}.pte", int8_activations=label.endswith(_INT8_ACTIVATIONS)
            )
            method = Runtime.get().load_program(path).load_method("forward")
            runners[label] = lambda x, m=method: m.execute([x])[0]
    return runners


def run_runtime_bench(
    name: str = "alexnet-fc",
    compression: int = 8,
    formats: tuple[str, ...] = ("int8", "int4"),
    batches: tuple[int, ...] = (1, 64),
    runtimes: tuple[str, ...] = ("pytorch", "onnxruntime", "executorch"),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Median seconds per forward of every variant in every runtime, and its largest error
    against the same variant in PyTorch."""
    say = progress or (lambda message: None)
    shape = model_spec(name).input_shape
    models = packed_variants(name, compression, formats)
    # fbgemm's int8 GEMMs exist in PyTorch only: the other runtimes get the exported float graph.
    dynamic = quantize_(copy.deepcopy(models[f"MPD c={compression} fp32"]), "int8-dynamic")
    models_pytorch = {**models, f"MPD c={compression} int8-dynamic": dynamic}
    # XNNPACK's quantized kernels: symmetric formats, activations rounded to int8 on the fly.
    models_executorch = {
        **models,
        **{
            f"MPD c={compression} {fmt}{_INT8_ACTIVATIONS}": models[f"MPD c={compression} {fmt}"]
            for fmt in formats
            if "asym" not in fmt
        },
    }
    # ONNX Runtime's MatMulNBits: int4 layers weight-only, every format with int8 activations.
    models_onnx = {
        **models,
        **{
            f"MPD c={compression} {fmt}{_MATMULNBITS}": models[f"MPD c={compression} {fmt}"]
            for fmt in formats
            if fmt.startswith("int4")
        },
        **{f"MPD c={compression} {fmt}{_INT8_ACTIVATIONS}": models[f"MPD c={compression} {fmt}"] for fmt in formats},
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for runtime in runtimes:
            say(f"{runtime}: exporting")
            chosen = {"pytorch": models_pytorch, "onnxruntime": models_onnx, "executorch": models_executorch}[runtime]
            runners = _sessions(runtime, chosen, torch.randn(2, *shape), Path(folder))
            for batch in batches:
                x = torch.randn(batch, *shape)
                errors = {
                    label: float((run(x) - chosen[label](x)).abs().max() / chosen[label](x).abs().max())
                    for label, run in runners.items()
                }
                seconds = interleaved_medians(
                    {label: (lambda r=run: r(x)) for label, run in runners.items()}, repeats=11, min_time=0.05
                )
                for label in runners:
                    rows.append(
                        {
                            "runtime": runtime,
                            "variant": label,
                            "batch": batch,
                            "seconds": seconds[label],
                            "vs_dense": seconds["dense fp32"] / seconds[label],
                            "relative_error_vs_pytorch": errors[label],
                        }
                    )
                say(f"{runtime} batch {batch}: done")
    return {"model": name, "compression": compression, "formats": list(formats), "rows": rows}


def render_runtime_bench(results: dict[str, Any], command: str) -> str:
    """The measurements as Markdown: speed-ups over dense fp32 within each runtime."""
    batches = sorted({r["batch"] for r in results["rows"]})
    lines = [
        f"# {results['model']} in every runtime: dense fp32 vs MPD c = {results['compression']} fp32 and quantized",
        "",
        f"Command: `{command}`. Ratios of medians timed round-robin within one runtime (higher is faster than "
        "that runtime's dense fp32 model); errors: largest difference to the same model in PyTorch, relative "
        "to its largest output.",
        "",
        "Forms: in PyTorch, quantized blocks dequantize in every forward (`int8-dynamic`: fbgemm's int8 GEMMs, "
        "activations quantized on the fly); in ONNX Runtime they are stored as integers and dequantized by "
        "standard operators, which ONNX Runtime folds to float weights at load, unless exported as its "
        "`MatMulNBits` kernel (`as MatMulNBits`: 4-bit weights, float activations); in ExecuTorch weight-only "
        "blocks dequantize in every call inside XNNPACK (which has no weight-only kernel), then run its linear. "
        "`+ int8 activations`: "
        "activations rounded to int8 per row on the fly (XNNPACK's kernels, ONNX Runtime's `MatMulNBits` at "
        "accuracy level 4), close to but not exactly the weight-only output.",
        "",
        "| runtime | model | " + " | ".join(f"batch {b}" for b in batches) + " | max error vs PyTorch |",
        "|---|---|" + "---|" * (len(batches) + 1),
    ]
    keys = dict.fromkeys((r["runtime"], r["variant"]) for r in results["rows"])
    for runtime, variant in keys:
        cells = {r["batch"]: r for r in results["rows"] if (r["runtime"], r["variant"]) == (runtime, variant)}
        error = max(r["relative_error_vs_pytorch"] for r in cells.values())
        speed = " | ".join(f"{cells[b]['vs_dense']:.2f}×" for b in batches)
        lines.append(f"| {runtime} | {variant} | {speed} | {error:.1e} |")
    return "\n".join(lines) + "\n"
