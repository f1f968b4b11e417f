"""Training-step benchmark: dense vs masked (the paper's way) vs compact (packed) training."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..timing import interleaved_medians
from .model import build_stack

__all__ = ["adam_step_times", "run_training_bench", "training_state_bytes"]

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


def adam_step_times(
    models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *, repeats: int, device: str | torch.device
) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Median seconds of one Adam step (forward, backward, update) of each model on ``(x, y)``,
    timed round-robin, and the bytes of its weights and Adam state."""
    steps, memory = {}, {}
    for key, model in models.items():
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        step()  # Adam's state exists from the first step on
        memory[key] = training_state_bytes(model, opt)
        steps[key] = step
    return interleaved_medians(steps, repeats=repeats, warmup=1, device=device), memory


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
            models = {}
            for form, built in FORMS.items():
                models[form], shape = build_stack(name, built, compression=c)
                models[form].to(device)
            x = torch.randn(batch, *shape, device=device)
            classes = models["dense"](x[:1]).shape[-1]
            y = torch.randint(0, classes, (batch,), device=device)
            seconds, memory = adam_step_times(models, x, y, repeats=repeats, device=device)
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
