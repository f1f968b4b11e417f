"""Model-level benchmark: each paper model (and its FC stack) dense vs packed, end to end."""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Iterable

import torch
from torch import nn

from ..convert import mpdify, pack
from ..models import INPUT_SHAPES, PAPER_SETUPS, build_model, fc_stack, paper_filter
from ..timing import interleaved_medians
from .memory import model_weight_bytes

__all__ = ["MODEL_STACKS", "build_stack", "file_bytes", "run_model_bench"]


def file_bytes(dense: nn.Module, packed: nn.Module) -> dict[str, int]:
    """Bytes on disk: the dense model as plain safetensors vs the packed model as an mpdcompress file."""
    from safetensors.torch import save_file

    from ..io import save

    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, f"{tmp}/dense.safetensors")
        save(packed, f"{tmp}/packed.safetensors")
        return {"dense": os.path.getsize(f"{tmp}/dense.safetensors"), "packed": os.path.getsize(f"{tmp}/packed.safetensors")}

# name → (builder, input shape, compression, FC-only?)
MODEL_STACKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, bool]] = {
    "lenet300": (lambda: build_model("lenet300"), INPUT_SHAPES["lenet300"], 10, True),
    "alexnet-fc": (lambda: fc_stack([16384, 4096, 4096, 1000]), (16384,), 8, True),
    "transformer-mlp": (lambda: fc_stack([768, 3072, 768]), (768,), 8, True),
    "deep-mnist": (lambda: build_model("deep-mnist"), INPUT_SHAPES["deep-mnist"], 10, False),
    "tf-cifar10": (lambda: build_model("tf-cifar10"), INPUT_SHAPES["tf-cifar10"], 10, False),
    "alexnet-bn": (lambda: build_model("alexnet-bn"), INPUT_SHAPES["alexnet-bn"], 8, False),
}


def build_stack(name: str, form: str, seed: int = 0, compression: int | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """``form`` is ``dense``, ``masked`` or ``packed``; paper models compress the paper's layers.

    ``compression`` overrides the stack's usual factor. Returned in eval mode.
    """
    if name not in MODEL_STACKS:
        raise KeyError(f"unknown stack {name!r}; choose from {sorted(MODEL_STACKS)}")
    if form not in ("dense", "masked", "packed"):
        raise ValueError(f"form must be dense, masked or packed, got {form!r}")
    builder, shape, c, _ = MODEL_STACKS[name]
    c = compression or c
    torch.manual_seed(seed)
    model = builder()
    if form != "dense":
        flt = paper_filter(model, name) if name in PAPER_SETUPS else None
        mpdify(model, c, filter=flt, seed=seed)
        if form == "packed":
            model = pack(model)
    return model.eval(), shape


def run_model_bench(
    names: Iterable[str] = tuple(MODEL_STACKS),
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
        fc_only = MODEL_STACKS[name][3]
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
                seconds = interleaved_medians({form: (lambda run=run: run(x)) for form, run in runners.items()},
                                              repeats=repeats, min_time=min_time, device=device)
            rows.append({
                "model": name, "fc_only": fc_only, "compression": MODEL_STACKS[name][2], "batch": batch,
                "device": device, "compile_mode": compile_mode, "seconds": seconds,
                "speedup_vs_dense": {k: seconds["dense"] / v for k, v in seconds.items()},
                "state_dict_bytes": sizes, "file_bytes": files,
            })
            if progress is not None:
                progress(f"{name} batch={batch}: packed {seconds['dense'] / seconds['packed']:.2f}x dense")
    return rows
