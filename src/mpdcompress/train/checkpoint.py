"""Training checkpoints: written atomically by rank 0, read back without unpickling code.

A checkpoint holds the model and optimizer state, the position in training (completed epochs
plus optimizer steps into the next one, so a run can stop and resume mid-epoch), the running
loss of the unfinished epoch, and every rank's random-number state.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_atomic
from .config import CheckpointError, TrainConfig, comparable

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "write_checkpoint", "read_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 2


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically, tagged with the checkpoint format."""
    state = {"format": CHECKPOINT_FORMAT, **state}
    write_atomic(path, lambda f: torch.save(state, f))


def read_checkpoint(path: Path | None, config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The checkpoint at ``path``, refused unless it was made by the same configuration."""
    if path is None or not path.is_file():
        raise CheckpointError(f"nothing to resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for damaged files
        # torch's own text would advise weights_only=False, i.e. running the file's code: not here.
        raise CheckpointError(f"{path}: not a readable mpdcompress checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a checkpoint of this mpdcompress version (format "
            f"{state.get('format') if isinstance(state, dict) else '?'}, expected {CHECKPOINT_FORMAT})"
        )
    # Fields added since the checkpoint was written count as their defaults (what it ran with).
    saved = {f.name: f.default for f in fields(TrainConfig)} | state["config"]
    if comparable(saved) != comparable(asdict(config)):
        differ = sorted(k for k, v in comparable(asdict(config)).items() if saved.get(k) != v)
        raise CheckpointError(f"{path} was made with a different configuration ({', '.join(differ)} differ)")
    return state
