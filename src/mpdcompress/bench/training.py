"""Training-step benchmark: dense vs masked (the paper's way) vs compact (packed) training."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..timing import interleaved_medians
from .model import build_stack

__all__ = ["run_training_bench", "training_state_bytes"]

FORMS = {"dense": "dense", "masked": "masked", "compact": "packed"}


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of trainable weights and of the optimizer's state (after at least one step)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    return {"weights": weights, "optimizer": state, "total": weights + state}


def run_training_bench(
    names: Iterable[str],
    factors: Iterable[int],
    batch_for: dict[str, int],
    *,
    repeats: int = 5,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """One Adam step (forward, backward, update) per form; ratios are masked time / compact time."""
    rows = []
    for name in names:
        for c in factors:
            batch = batch_for.get(name, 512)
            steps, memory = {}, {}
            for form, built in FORMS.items():
                model, shape = build_stack(name, built, compression=c)
                model = model.to(device).train()
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                x = torch.randn(batch, *shape, device=device)
                classes = model(x[:1]).shape[-1]
                y = torch.randint(0, classes, (batch,), device=device)

                def step(model=model, opt=opt, x=x, y=y) -> None:
                    opt.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()

                step()
                memory[form] = training_state_bytes(model, opt)
                steps[form] = step
            seconds = interleaved_medians(steps, repeats=repeats, warmup=1, device=device)
            rows.append(
                {
                    "model": name,
                    "compression": c,
                    "batch": batch,
                    "device": device,
                    "seconds": seconds,
                    "compact_vs_masked": seconds["masked"] / seconds["compact"],
                    "compact_vs_dense": seconds["dense"] / seconds["compact"],
                    "state_bytes": memory,
                    "compact_state_fraction_of_masked": memory["compact"]["total"] / memory["masked"]["total"],
                }
            )
            if progress is not None:
                progress(f"training {name} c={c}: compact {rows[-1]['compact_vs_masked']:.2f}x masked")
    return rows
