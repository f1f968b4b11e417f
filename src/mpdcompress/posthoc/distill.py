"""Recovery by distillation: train a compressed student to reproduce its dense teacher.

The student is any model :func:`~mpdcompress.mpdify_` compressed (masked or compact mode); the
teacher is the model before compression. Each step runs both on one batch of the user's inputs
(labels are not needed) and matches their outputs:

* logits (by default a tensor named ``logits``; a classifier whose output is one plain tensor
  names it ``output``: ``DistillConfig(logits=("output",))``): KL divergence of the softened
  distributions, times ``T²``;
* every other tensor (a plain output, an embedding, each of a tuple of hidden states): mean
  squared error divided by the teacher's mean square, so terms of any scale weigh alike.

Runs are resumable: checkpoints hold the student, the optimizer, the step, the loss history and
the random state, and are read back without unpickling code.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import write_atomic
from ..errors import CheckpointError, ConfigError
from ..progress import Progress, reporting

__all__ = ["DistillConfig", "DistillResult", "distill", "distillation_loss", "model_outputs", "batch_to"]

_FORMAT = 1


@dataclass(frozen=True)
class DistillConfig:
    """Distillation options: steps, AdamW's learning rate and decay, warm-up, temperature, which outputs are logits."""

    steps: int
    lr: float = 1e-3  # best of 3e-4, 1e-3, 3e-3 in a 300-step A/B on MiniLM at c=4 (cosine 0.825, 0.851, 0.837)
    weight_decay: float = 0.0
    warmup: float = 0.05  # share of the steps with a linear warm-up; then cosine decay to zero
    temperature: float = 2.0  # softening of logits (KL terms only)
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 200
    seed: int = 0
    dropout: bool = False  # train the student with its dropout on (off: a cleaner target to match)
    # Names of the outputs matched by KL; a plain tensor output is named "output". LeNet-300-100
    # at 10x, one epoch from weight-chosen masks: 97.67 % with KL on its logits, 96.74 % with
    # relative MSE (results/posthoc).
    logits: tuple[str, ...] = ("logits",)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a share of the steps in [0, 1), got {self.warmup!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature!r}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be at least 1, got {self.checkpoint_every!r}")
        if isinstance(self.logits, str) or not all(isinstance(n, str) for n in self.logits):
            raise ConfigError(f"logits must be a tuple of output names, got {self.logits!r}")
        object.__setattr__(self, "logits", tuple(self.logits))  # a list would not compare equal on resume


@dataclass
class DistillResult:
    """What a distillation run did: steps taken, seconds and the logged loss history."""

    steps: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss"} every logged step


def model_outputs(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on ``batch`` the way it is usually called: keywords for a mapping, positional
    for a tuple or list, one argument otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _named_tensors(output: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return {prefix or "output": output}
    if isinstance(output, Mapping) or hasattr(output, "items"):  # dicts and transformers' ModelOutput
        items = output.items()
    elif isinstance(output, (tuple, list)):
        items = ((str(i), v) for i, v in enumerate(output))
    else:
        return {}
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found.update(_named_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def distillation_loss(
    student_out: Any, teacher_out: Any, temperature: float = 2.0, logits: Sequence[str] = ("logits",)
) -> torch.Tensor:
    """The loss between two outputs of the same structure (see the module's description);
    ``logits``: the names of the outputs matched by KL (the last part of a nested name counts)."""
    s, t = _named_tensors(student_out), _named_tensors(teacher_out)
    if not t or set(s) != set(t):
        raise ConfigError(f"student and teacher outputs differ in structure: {sorted(s)} vs {sorted(t)}")
    terms = []
    for key, target in t.items():
        if not target.is_floating_point():  # token ids, masks: nothing to match
            continue
        if s[key].shape != target.shape:
            raise ConfigError(f"output {key!r}: student {tuple(s[key].shape)} vs teacher {tuple(target.shape)}")
        pred, target = s[key].float(), target.detach().float()
        if key.split(".")[-1] in logits:
            tau = temperature
            kl = F.kl_div(
                F.log_softmax(pred / tau, -1).flatten(0, -2),
                F.log_softmax(target / tau, -1).flatten(0, -2),
                log_target=True,
                reduction="batchmean",
            )
            terms.append(kl * tau * tau)
        else:
            terms.append(F.mse_loss(pred, target) / target.square().mean().clamp_min(1e-12))
    if not terms:
        raise ConfigError(f"no floating-point output to match among {sorted(t)}")
    return torch.stack(terms).mean()


def _batches(source: Callable[[int], Any] | Sequence | Iterable, start: int):
    """Batch ``start``, ``start + 1``, ... of ``source``: a function of the step, a sequence
    (cycled), or an iterable such as a DataLoader (re-iterated when exhausted; on resume the
    batches already used are skipped)."""
    if callable(source) and not isinstance(source, (Sequence, torch.utils.data.DataLoader)):
        return (source(step) for step in itertools.count(start))
    if isinstance(source, Sequence):
        if not source:
            raise ConfigError("no batches to distill on")
        return (source[step % len(source)] for step in itertools.count(start))

    def cycle():
        skip = start
        while True:
            empty = True
            for batch in source:
                empty = False
                if skip:
                    skip -= 1
                    continue
                yield batch
            if empty:
                raise ConfigError("no batches to distill on")

    return cycle()


def _schedule(config: DistillConfig) -> Callable[[int], float]:
    warm = max(1, int(config.warmup * config.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, config.steps - warm)))

    return factor


def batch_to(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a mapping, tuple or list of them) with its tensors on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(v, device) for v in batch)
    return batch


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Callable[[int], Any] | Sequence | Iterable,
    config: DistillConfig,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: Progress = None,
) -> DistillResult:
    """Fine-tune ``student`` (in place) to reproduce ``teacher`` on ``batches``.

    ``batches``: a function of the step, a sequence of batches (cycled) or an iterable such as a
    DataLoader; a batch is whatever the models take (a tensor, a tuple of arguments, or a mapping
    of keyword arguments). ``loss_fn(student_out, teacher_out)`` defaults to
    :func:`distillation_loss`. The optimizer defaults to AdamW over the student's trainable
    parameters; the learning rate warms up, then decays to zero over ``config.steps``.

    With ``checkpoint`` (a file path), the state is written atomically every
    ``config.checkpoint_every`` steps and at the end; ``resume=True`` continues from it and
    refuses one made with a different configuration. ``progress`` receives ``{"step", "steps",
    "loss", "lr"}`` after every step (see :mod:`mpdcompress.progress`; by default a bar when
    standard error is a terminal). The teacher runs in eval mode without gradients; the
    student trains in train mode and is left in eval mode.
    """
    if student is teacher:
        raise ConfigError("the student must be a separate (compressed) copy of the teacher")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the student has no trainable parameters")
    device = params[0].device
    loss_fn = loss_fn or (lambda s, t: distillation_loss(s, t, config.temperature, config.logits))
    opt = optimizer or torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    schedule = _schedule(config)
    result = DistillResult()
    path = Path(checkpoint) if checkpoint is not None else None
    start = 0
    if resume:
        state = _read_checkpoint(path, config)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, result.history, result.seconds = int(state["step"]), list(state["history"]), float(state["seconds"])
    else:
        torch.manual_seed(config.seed)

    def save(step: int) -> None:
        if path is None:
            return
        state = {
            "format": _FORMAT,
            "config": asdict(config),
            "student": student.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "history": result.history,
            "seconds": result.seconds,
            "rng": torch.get_rng_state(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(state, f))

    teacher.eval()
    student.train(config.dropout)
    began = time.perf_counter() - result.seconds
    source = _batches(batches, start)
    with reporting(progress, "distilling", "step", done="step", total="steps") as report:
        for step in range(start, config.steps):
            batch = batch_to(next(source), device)
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * schedule(step)
            with torch.no_grad():
                target = model_outputs(teacher, batch)
            loss = loss_fn(model_outputs(student, batch), target)
            if not torch.isfinite(loss):
                raise ConfigError(f"distillation diverged at step {step} (loss {float(loss)}); lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            loss_value = float(loss.detach())
            result.history.append({"step": step + 1, "loss": loss_value})
            result.seconds = time.perf_counter() - began
            if report is not None:
                report({"step": step + 1, "steps": config.steps, "loss": loss_value, "lr": opt.param_groups[0]["lr"]})
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                save(step + 1)
    result.steps = config.steps
    student.eval()
    return result


def _read_checkpoint(path: Path | None, config: DistillConfig) -> dict[str, Any]:
    if path is None or not path.is_file():
        raise CheckpointError(f"nothing to resume: no distillation checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for damaged files
        raise CheckpointError(f"{path}: not a readable distillation checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a distillation checkpoint of this mpdcompress version")
    if state["config"] != asdict(config):
        differ = sorted(k for k, v in asdict(config).items() if state["config"].get(k) != v)
        raise CheckpointError(f"{path} was made with a different configuration ({', '.join(differ)} differ)")
    return state
