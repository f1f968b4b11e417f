"""Dense vs packed models exported to ONNX and run by onnxruntime on the CPU, side by side."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..files.onnx import export_onnx
from ..timing import interleaved_medians
from .model import build_stack

__all__ = ["run_onnx_bench"]


def run_onnx_bench(
    names: Iterable[str],
    batches: Iterable[int],
    *,
    threads: int | None = None,
    repeats: int = 7,
    min_time: float = 0.05,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time onnxruntime sessions of the dense and packed exports; ratio = dense / packed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            sessions = {}
            for form in ("dense", "packed"):
                model, shape = build_stack(name, form)
                path = export_onnx(model, torch.randn(2, *shape), Path(tmp) / f"{name}-{form}.onnx")
                sessions[form] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            packed_torch = model
            for batch in batches:
                x = torch.randn(batch, *shape)
                feed = {"input": x.numpy()}
                with torch.no_grad():
                    error = float(abs(sessions["packed"].run(None, feed)[0] - packed_torch(x).numpy()).max())
                seconds = interleaved_medians(
                    {form: (lambda s=s: s.run(None, feed)) for form, s in sessions.items()},
                    repeats=repeats,
                    min_time=min_time,
                )
                rows.append(
                    {
                        "model": name,
                        "batch": batch,
                        "seconds": seconds,
                        "speedup": seconds["dense"] / seconds["packed"],
                        "max_abs_error_vs_torch": error,
                        "onnxruntime": ort.__version__,
                    }
                )
                if progress is not None:
                    progress(f"onnx {name} batch={batch}: packed {rows[-1]['speedup']:.2f}x dense")
    return rows
