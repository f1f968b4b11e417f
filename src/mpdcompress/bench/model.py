"""Model-level benchmark: each paper model (and its FC stack) dense vs packed, end to end."""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Iterable

import torch
from torch import nn

from ..core.convert import mpdify_, pack
from ..errors import ConfigError
from ..models import MODELS, build_model, model_spec, paper_filter
from ..timing import interleaved_medians
from .memory import model_weight_bytes

__all__ = ["build_stack", "file_bytes", "run_model_bench"]


def file_bytes(dense: nn.Module, packed: nn.Module) -> dict[str, int]:
    """Bytes on disk: the dense model as plain safetensors vs the packed model as an mpdcompress file."""
    from safetensors.torch import save_file

    from ..files.io import save

    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, f"{tmp}/dense.safetensors")
        save(packed, f"{tmp}/packed.safetensors")
        return {
            "dense": os.path.getsize(f"{tmp}/dense.safetensors"),
            "packed": os.path.getsize(f"{tmp}/packed.safetensors"),
        }


def build_stack(
    name: str, form: str, seed: int = 0, compression: int | None = None
) -> tuple[nn.Module, tuple[int, ...]]:
    """``form`` is ``dense``, ``masked`` or ``packed``; paper models compress the paper's layers.

    ``compression`` overrides the stack's usual factor. Returned in eval mode.
    """
    spec = model_spec(name)
    if form not in ("dense", "masked", "packed"):
        raise ConfigError(f"form must be dense, masked or packed, got {form!r}")
    c = compression or spec.compression
    torch.manual_seed(seed)
    model = build_model(name)
    if form != "dense":
        mpdify_(model, c, filter_fn=paper_filter(model, name), seed=seed)
        if form == "packed":
            model = pack(model)
    return model.eval(), spec.input_shape


def run_model_bench(
    names: Iterable[str] = tuple(MODELS),
    batches: dict[bool, Iterable[int]] | None = None,
    *,
    device: str = "cpu",
    repeats: int = 7,
    min_time: float = 0.05,
    compile_mode: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Dense vs packed time (and masked, the training form) for each stack; ratio = dense / packed.

    With ``compile_mode`` (``"default"``, ``"reduce-overhead"``, ...), every form is run through
    ``torch.compile`` with that mode, so the comparison is compiled dense vs compiled packed.
    """
    batches = batches or {True: (1, 64, 512), False: (1, 64)}
    rows = []
    for name in names:
        fc_only = model_spec(name).fc_only
        forms = {form: build_stack(name, form) for form in ("dense", "masked", "packed")}
        forms = {k: (m.to(device), s) for k, (m, s) in forms.items()}
        sizes = {k: model_weight_bytes(m) for k, (m, _) in forms.items()}
        files = file_bytes(forms["dense"][0], forms["packed"][0])
        runners = {
            form: (torch.compile(model, mode=compile_mode, dynamic=False) if compile_mode else model)
            for form, (model, _) in forms.items()
        }
        for batch in batches[fc_only]:
            x = torch.randn(batch, *forms["dense"][1], device=device)
            with torch.no_grad():
                seconds = interleaved_medians(
                    {form: (lambda run=run: run(x)) for form, run in runners.items()},
                    repeats=repeats,
                    min_time=min_time,
                    device=device,
                )
            rows.append(
                {
                    "model": name,
                    "fc_only": fc_only,
                    "compression": model_spec(name).compression,
                    "batch": batch,
                    "device": device,
                    "compile_mode": compile_mode,
                    "seconds": seconds,
                    "speedup_vs_dense": {k: seconds["dense"] / v for k, v in seconds.items()},
                    "state_dict_bytes": sizes,
                    "file_bytes": files,
                }
            )
            if progress is not None:
                progress(f"{name} batch={batch}: packed {seconds['dense'] / seconds['packed']:.2f}x dense")
    return rows
