"""The compression options, checked in one place: :class:`MPDConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import CompressionTypeError, ConfigError

__all__ = ["MPDConfig", "MODES", "INITS", "MASKS", "MAX_SEED", "check_choice", "checked_device"]

# torch.manual_seed and numpy take seeds up to 2**64 - 1; a signed 64-bit seed fits everywhere.
MAX_SEED = 2**63 - 1
DEVICE_TYPES = ("cpu", "cuda")

Mode = Literal["masked", "compact"]
Init = Literal["dense", "block"]
# masked: dense weight x fixed mask (the paper's training form); compact: the packed blocks only.
MODES: tuple[str, ...] = ("masked", "compact")
# dense: keep the weights as they are (masked); block: rescale to the block width's fan-in
# (nn.Linear's initialization for a layer whose fan-in is what a masked row really sees).
INITS: tuple[str, ...] = ("dense", "block")
# random: seeded random permutations (the paper); weights: chosen to keep the most of the trained
# weight's squared mass (mask_search.py), for compressing a model that is already trained;
# weights-joint: the same, with the hidden units between layers that feed each other (an MLP's
# up and down projections) grouped once for both, so no permutation is left between them.
MASKS: tuple[str, ...] = ("random", "weights", "weights-joint")


def checked_device(device: Any, what: str = "device", *, available: bool = True) -> torch.device:
    """``device`` as a ``torch.device`` that mpdcompress can use (``cpu`` or ``cuda[:N]``; with
    ``available``, only where CUDA is there), else :class:`ConfigError` saying why."""
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"{what} must be a device name such as 'cpu' or 'cuda', got {device!r}")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{what} {str(device)!r} is not a device name such as 'cpu', 'cuda' or 'cuda:1'") from None
    if resolved.type not in DEVICE_TYPES:
        raise ConfigError(f"{what} {str(device)!r}: mpdcompress runs on {' or '.join(DEVICE_TYPES)} devices")
    if available and resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} {str(device)!r} was asked for but torch.cuda.is_available() is False")
    return resolved


def check_choice(what: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``; else a ConfigError naming ``what`` and the choices."""
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


@dataclass(frozen=True)
class MPDConfig:
    """How :func:`~mpdcompress.mpdify_` compresses a model.

    ``compression``: one factor for every selected ``nn.Linear``, or ``{qualified name: factor}``
    (only those layers). ``seed``: masks are drawn from ``layer_seed(seed, name)``, the same in
    every process. ``permute=False`` gives plain block-diagonal masks (the paper's ablation).
    ``mode="compact"`` packs right away so the blocks train directly. ``init="dense"`` (default)
    never changes the kept weights; ``"block"`` is for training from scratch. ``masks="weights"``
    chooses each mask to keep the most of the layer's trained weight instead of at random.
    ``convs=True`` also compresses ``nn.Conv1d`` / ``nn.Conv2d`` layers on their channel plane,
    except those the default rules skip (see :func:`~mpdcompress.mpdify_`); a convolution named
    in a ``compression`` mapping is compressed either way. ``shared_streams=True`` (with random
    masks) gives every compressed convolution that reads or writes one residual stream the same
    channel order there, so that the packed model keeps the stream in that order with no gathers
    (:mod:`mpdcompress.core.streams`); the default draws every layer's orders independently.
    """

    compression: int | Mapping[str, int]
    seed: int = 0
    permute: bool = True
    mode: Mode = "masked"
    init: Init = "dense"
    masks: Literal["random", "weights", "weights-joint"] = "random"
    convs: bool = False
    shared_streams: bool = False

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_choice("init", self.init, INITS)
        check_choice("masks", self.masks, MASKS)
        if self.masks.startswith("weights") and not self.permute:
            raise ConfigError(
                f"masks={self.masks!r} chooses the permutations; it cannot be combined with permute=False"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise CompressionTypeError(f"seed must be an int, got {type(self.seed).__name__} {self.seed!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be from 0 to 2**63 - 1, got {self.seed}")
        if self.shared_streams and self.masks != "random":
            raise ConfigError(
                f"shared_streams draws the stream orders at random; it cannot be combined with masks={self.masks!r}"
            )
        for flag in ("permute", "convs", "shared_streams"):
            if not isinstance(getattr(self, flag), bool):
                raise CompressionTypeError(f"{flag} must be a bool, got {type(getattr(self, flag)).__name__}")
        if not isinstance(self.compression, Mapping) and (
            isinstance(self.compression, bool) or not isinstance(self.compression, int)
        ):
            raise CompressionTypeError(
                f"compression must be an int or a mapping of layer names to ints, got "
                f"{type(self.compression).__name__} {self.compression!r}"
            )

    @classmethod
    def of(cls, config: "MPDConfig | int | Mapping[str, int]", **options: Any) -> "MPDConfig":
        """``config`` with ``options`` replaced if it is an MPDConfig, else ``MPDConfig(config, **options)``."""
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)} - {"compression"})
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)}; MPDConfig takes seed, permute, mode, init, masks, convs and "
                "shared_streams"
            )
        if not isinstance(config, cls):
            return cls(config, **options)
        return dataclasses.replace(config, **options) if options else config

    def to_json(self) -> dict[str, Any]:
        """What the model file's manifest records."""
        compression = dict(self.compression) if isinstance(self.compression, Mapping) else self.compression
        return {
            "compression": compression,
            "seed": self.seed,
            "permute": self.permute,
            "mode": self.mode,
            "init": self.init,
            "masks": self.masks,
            "convs": self.convs,
            # Only when set, so files of the default config stay readable by releases before it.
            **({"shared_streams": True} if self.shared_streams else {}),
        }
