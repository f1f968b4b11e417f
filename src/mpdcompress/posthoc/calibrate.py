"""Compressing a trained model with a little of its data, before any fine-tuning.

Two uses of a few hundred calibration inputs, neither of which trains anything:

Convolutions (``convs=True``) are treated as linear layers on their input patches: the moment
is per input channel, over every position, and the fit regresses each output channel on the
patches of the input channels its block keeps (every kernel position of each).

* :func:`input_moments` measures ``E[x_j²]`` for each input feature of each selected layer. A
  mask that keeps ``W_ij`` drops ``W_ij x_j`` from the output otherwise, so the mass worth
  keeping is ``W_ij² E[x_j²]`` (the layer's expected output energy per weight), not ``W_ij²``:
  ``mpdify_(..., masks="weights", input_moments=...)`` searches masks for that mass.
* :func:`refit_` then sets the kept weights and bias of every compressed layer to the least-
  squares fit of the dense layer's output, given what the mask lets it see. For output ``i`` in
  block ``k`` (whose columns are ``S``) that is a small linear regression of the dense output on
  ``x_S``: the dropped inputs are partly predictable from the kept ones, and the fit folds that
  part into the kept weights (and the mean of the rest into the bias). Layers are fitted one at
  a time in forward order, each on the inputs the already-fitted student gives it, so a layer
  also corrects the error the layers before it left (as SparseGPT does for pruning).

:func:`compress_calibrated` is the one call: a compressed copy of a trained model, masks chosen
for its data and kept weights refitted, and on request tuned block by block on the same inputs
(:mod:`mpdcompress.posthoc.reconstruct`, the one step that trains); the model itself is left as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MPDConfig
from ..core.convert import LayerFilter, compressed_layers, conv_skip_reason, is_transposed_linear, mpdify_
from ..errors import CompressionError, ConfigError
from ..nn import MaskedWeight
from ..progress import Progress, reporting
from .reconstruct import default_blocks, reconstruct_
from .taps import evaluating, paired_calls, reiterable, run

__all__ = ["input_moments", "refit_", "compress_calibrated"]


_CONVS = (nn.Conv1d, nn.Conv2d)


def _features(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).double()


def _channels(x: torch.Tensor) -> torch.Tensor:
    """A convolution's input as one row of channels per position: ``(N * positions, C)``."""
    return x.detach().movedim(1, -1).reshape(-1, x.shape[1]).double()


def _patches(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """The input patches ``conv`` multiplies, one row per output position, columns ordered as its
    flattened weight (channel, then kernel position): ``(N * positions, C * kernel)``."""
    x = F.pad(x.detach().double(), conv._reversed_padding_repeated_twice)
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    if x.dim() == 3:  # a 1-D convolution is a 2-D one of height 1
        x, kernel, stride, dilation = x.unsqueeze(-2), (1, *kernel), (1, *stride), (1, *dilation)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _layers(model: nn.Module, filter_fn: LayerFilter | None, config: MPDConfig | None) -> dict[str, nn.Module]:
    """The layers ``mpdify_`` with ``config`` and ``filter_fn`` would compress."""

    def candidate(m: nn.Module, name: str) -> bool:
        if type(m) is nn.Linear or is_transposed_linear(m):
            return True
        if type(m) not in _CONVS or config is None:
            return False
        if isinstance(config.compression, Mapping):
            return name in config.compression
        return config.convs and conv_skip_reason(m, config.compression) is None

    return {
        name: m for name, m in model.named_modules() if candidate(m, name) and (filter_fn is None or filter_fn(m, name))
    }


def input_moments(
    model: nn.Module,
    batches: Iterable,
    *,
    filter_fn: LayerFilter | None = None,
    config: MPDConfig | None = None,
) -> dict[str, torch.Tensor]:
    """``E[x²]`` per input feature of every plain ``nn.Linear`` (or ``Conv1D``) that
    ``filter_fn(module, name)`` selects, over every position of every batch (float32, on CPU);
    with a ``config`` that compresses convolutions, per input channel of those too."""
    layers = _layers(model, filter_fn, config)
    if not layers:
        raise CompressionError("no nn.Linear layer was selected")
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def hook(name: str) -> Callable[[torch.Tensor], None]:
        def add(x: torch.Tensor) -> None:
            x = _channels(x) if type(layers[name]) in _CONVS else _features(x)
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] += x.shape[0]

        return add

    with evaluating(model):
        run(model, reiterable(batches), {m: hook(n) for n, m in layers.items()})
    unused = sorted(n for n, c in counts.items() if not c)
    if unused:
        raise CompressionError(f"the calibration batches never reach these layers: {unused}")
    return {name: (sums[name] / counts[name]).float().cpu() for name in layers}


class _Moments:
    """Running sums of the student's input ``u``, the teacher's input ``x`` and the products the
    fit needs, ``uᵀu`` and ``uᵀx``, in float64."""

    def __init__(self, dense: nn.Module) -> None:
        self.n = 0
        self.u = self.x = self.uu = self.ux = 0
        self.pending: list[torch.Tensor] = []  # the teacher's inputs of this batch, in call order
        self.features = (lambda x: _patches(x, dense)) if type(dense) in _CONVS else _features

    def teacher(self, x: torch.Tensor) -> None:
        self.pending.append(self.features(x))

    def student(self, u: torch.Tensor) -> None:
        u, x = self.features(u), self.pending.pop(0)  # refit_ checked that both layers run as often
        x = x.to(u.device)  # the teacher may sit on another device
        if u.shape != x.shape:
            raise CompressionError("student and teacher layers saw inputs of different shapes")
        self.n += u.shape[0]
        self.u, self.x = self.u + u.sum(0), self.x + x.sum(0)
        self.uu, self.ux = self.uu + u.t() @ u, self.ux + u.t() @ x


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a matrix on its features (a convolution's: on its input patches)."""
    weight = layer.weight.t() if is_transposed_linear(layer) else layer.weight
    return weight.detach().double().reshape(weight.shape[0], -1)


@torch.no_grad()
def _fit(layer: MaskedWeight, dense: nn.Module, m: _Moments, damping: float) -> None:
    """Least-squares kept weights (and bias) of ``layer``, block by block, from the moments."""
    w = _dense_weight(dense).to(m.uu.device)
    positions = w.shape[1] // layer.plane()[1]  # a convolution's kernel positions per channel
    b = dense.bias.detach().double().to(m.uu.device) if dense.bias is not None else None
    mu_u, mu_x = m.u / m.n, m.x / m.n
    uu, ux = m.uu / m.n, m.ux / m.n
    if layer.bias is not None:  # the bias absorbs the means: fit the centred parts
        uu, ux = uu - torch.outer(mu_u, mu_u), ux - torch.outer(mu_u, mu_x)
    mask = layer.mpd_mask
    layout = mask.layout
    new_w = torch.zeros_like(w)
    for k in range(layout.compression):
        rows = mask.row_order[layout.row_offsets[k] : layout.row_offsets[k] + layout.row_sizes[k]].to(w.device)
        channels = mask.col_order[layout.col_offsets[k] : layout.col_offsets[k] + layout.col_sizes[k]]
        cols = (channels[:, None] * positions + torch.arange(positions)).flatten().to(w.device)
        gram = uu[cols][:, cols]
        # Damping as GPTQ does: a share of the mean diagonal keeps the solve well posed for
        # inputs that never vary (padding features, dead units).
        gram = gram + torch.eye(len(cols), dtype=gram.dtype, device=gram.device) * (
            damping * gram.diagonal().mean().clamp_min(1e-12)
        )
        target = w[rows] @ ux[cols].t()  # Cov(dense output, kept inputs): (rows, |S|)
        new_w[rows[:, None], cols] = torch.linalg.solve(gram, target.t()).t()
    layer.weight.copy_(new_w.view_as(layer.weight).to(layer.weight))
    if layer.bias is not None:
        dense_mean = w @ mu_x + (b if b is not None else 0)
        layer.bias.copy_((dense_mean - new_w @ mu_u).to(layer.bias))
    layer.apply_mask_()


def refit_(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    *,
    damping: float = 0.01,
    layers: Collection[str] | None = None,
    progress: Progress = None,
) -> nn.Module:
    """Refit every compressed layer of ``student`` (masked form, from :func:`mpdify_`), or those
    ``layers`` names, to the same-named dense layer of ``teacher`` on ``batches`` (see the
    module's description); one pass over the batches per layer, in the order the forward reaches
    them. ``progress`` receives ``{"layer", "index", "layers"}`` after each layer (see
    :mod:`mpdcompress.progress`; by default a bar when standard error is a terminal). Returns
    ``student``."""
    if not damping > 0:
        raise ConfigError(f"damping must be positive, got {damping!r}")
    if student is teacher:
        raise ConfigError("the student must be a separate (compressed) copy of the teacher")
    masked = {n: m for n, m in compressed_layers(student).items() if isinstance(m, MaskedWeight)}
    if not masked:
        raise CompressionError("the student has no masked MPD layer to refit (refit before pack)")
    unknown = sorted(set(layers or ()) - set(masked))
    if unknown:
        raise CompressionError(f"the student has no masked MPD layers named {unknown}")
    fitted = {n: m for n, m in masked.items() if layers is None or n in layers}
    dense: dict[str, nn.Module] = {}
    for name in fitted:
        try:
            dense[name] = teacher.get_submodule(name)
        except AttributeError:
            raise CompressionError(f"the teacher has no layer {name!r} to refit the student's to") from None
        if _dense_weight(dense[name]).shape != _dense_weight(fitted[name]).shape:
            raise CompressionError(f"layer {name!r}: the teacher's weight is not the shape of the student's")
    batches = reiterable(batches)
    with (
        evaluating(teacher, student),
        reporting(progress, "refitting", "layer", done="index", total="layers") as report,
    ):
        order, calls = paired_calls(student, teacher, batches, fitted, dense, "layers")
        for index, name in enumerate(order):
            moments = _Moments(dense[name])
            # The teacher's layer runs first for each batch, then the student's same layer;
            # each forward stops at the layer's last call.
            for batch, times in zip(batches, calls[name]):
                if times:
                    run(teacher, [batch], {dense[name]: moments.teacher}, stop_after=times)
                    run(student, [batch], {fitted[name]: moments.student}, stop_after=times)
            _fit(fitted[name], dense[name], moments, damping)
            if report is not None:
                report({"layer": name, "index": index + 1, "layers": len(order)})
    return student


def compress_calibrated(
    model: nn.Module,
    config: MPDConfig | int | Mapping[str, int],
    batches: Iterable,
    *,
    filter_fn: LayerFilter | None = None,
    refit: bool = True,
    damping: float = 0.01,
    block_steps: int = 0,
    block_lr: float = 1e-3,
    progress: Progress = None,
    **options: Any,
) -> nn.Module:
    """A compressed copy of the trained ``model`` (left untouched, the teacher for a later
    :func:`~mpdcompress.posthoc.distill.distill`): selected layers get masks chosen for the mass
    ``W² E[x²]`` on ``batches`` (``masks="weights"`` unless the options say ``"weights-joint"``;
    ``"random"`` keeps random masks), then with ``refit`` their kept weights are refitted
    (:func:`refit_`), and with ``block_steps`` tuned block by block to the model's blocks
    (:func:`~mpdcompress.posthoc.reconstruct.reconstruct_`, that many steps per block at ``block_lr``).
    ``progress`` is handed to every step (the mask search, the refit, the tuning): a function
    receives their events, a bar (:mod:`mpdcompress.progress`) shows each. ``config``, ``filter_fn`` and ``options`` are
    :func:`mpdify_`'s."""
    defaults = {} if isinstance(config, MPDConfig) else {"masks": "weights"}
    config = MPDConfig.of(config, **{**defaults, **options})
    if config.mode != "masked":
        raise ConfigError("compress_calibrated fits the masked form: leave mode='masked', then pack the result")
    moments = input_moments(model, batches, filter_fn=filter_fn, config=config) if config.masks != "random" else None
    student = mpdify_(copy.deepcopy(model), config, filter_fn=filter_fn, input_moments=moments, progress=progress)
    if refit:
        refit_(student, model, batches, damping=damping, progress=progress)
    if block_steps:
        blocks = default_blocks(student)
        reconstruct_(
            student, model, batches, blocks=blocks, steps=block_steps, lr=block_lr, seed=config.seed, progress=progress
        )
        # Layers outside the blocks were fitted to what the blocks gave before they were tuned.
        outside = [n for n in compressed_layers(student) if not any(_within(n, b) for b in blocks)]
        if refit and outside:
            refit_(student, model, batches, damping=damping, layers=outside, progress=progress)
    return student


def _within(name: str, block: str) -> bool:
    return block == "" or name == block or name.startswith(block + ".")
