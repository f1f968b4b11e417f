"""Compressing a pretrained sentence encoder after the fact, and recovering it by distillation.

For each factor and mask kind (random, chosen from the weights, chosen jointly for each MLP,
and "calibrated": chosen for ``W² E[x²]`` on a few hundred training sentences with the kept
weights refitted to the dense layers, :mod:`mpdcompress.posthoc.calibrate`), the study compresses the
teacher's selected layers, measures how closely the student's sentence embeddings agree with
the teacher's on held-out sentences (mean cosine, recall@10 of the teacher's neighbours), then
distills the students it is asked to and measures again. Magnitude pruning to the same density
is the post-hoc baseline; size and CPU speed compare the packed student with the dense teacher.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bench.model import file_bytes
from ..core.convert import compressed_layers, mpdify_, pack
from ..core.mask_search import kept_mass
from ..core.roles import select_roles
from ..nn import MPDLinear
from ..posthoc.calibrate import compress_calibrated
from ..posthoc.distill import DistillConfig, DistillResult, distill
from ..posthoc.sentence import embed, length_batches, length_order, neighbour_agreement, tokenize
from ..timing import interleaved_medians

__all__ = [
    "PretrainedProfile",
    "QUICK_PROFILE",
    "run_pretrained_study",
    "render_pretrained_report",
    "magnitude_prune_",
    "distill_encoder",
]


@dataclass(frozen=True)
class PretrainedProfile:
    """What the pretrained-encoder study runs: model, corpus, factors, mask kinds, roles and budgets."""

    model: str = "all-minilm-l6-v2"
    corpus: str = "wordnet"
    factors: tuple[int, ...] = (2, 4, 8)
    masks: tuple[str, ...] = ("random", "weights", "weights-joint", "calibrated")
    roles: tuple[str, ...] = ("mlp",)
    eval_sentences: int = 2000  # held-out sentences for cosine and recall@10
    calibration: int = 2048  # training sentences that calibrate the "calibrated" students
    block_steps: int = 600  # Adam steps per transformer layer tuning a "calibrated" student (0: refit only)
    distilled: tuple[tuple[str, int], ...] = (("calibrated", 4), ("weights", 4))
    steps: int = 2000  # distillation steps per distilled student
    batch_size: int = 32
    lr: float = 1e-3
    mode: str = "compact"
    seed: int = 0


QUICK_PROFILE = PretrainedProfile(
    factors=(4,),
    masks=("random", "weights", "calibrated"),
    eval_sentences=300,
    calibration=128,
    block_steps=30,
    distilled=(("calibrated", 4), ("weights", 4)),
    steps=100,
)


def magnitude_prune_(model: nn.Module, density: float, filter_fn: Callable[[nn.Module, str], bool]) -> None:
    """Unstructured magnitude pruning, the post-hoc baseline: in each selected ``nn.Linear``, keep
    the ``density`` share of weights with the largest magnitude and zero the rest."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and filter_fn(module, name):
            w = module.weight.data
            keep = max(1, round(density * w.numel()))
            threshold = w.abs().flatten().kthvalue(w.numel() - keep + 1).values
            w.mul_(w.abs() >= threshold)


def _freeze_embeddings(model: nn.Module) -> None:
    # Compression leaves token embeddings alone, and they are half of MiniLM's parameters:
    # updating them would double the optimizer's work for nothing.
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.requires_grad_(False)


def distill_encoder(
    student: nn.Module,
    teacher: nn.Module,
    batches,
    config: DistillConfig,
    *,
    mode: str = "compact",
    checkpoint=None,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> DistillResult:
    """Distill a compressed sentence encoder (in place) from its teacher: in ``mode="compact"``
    the masked student is packed first so only the blocks train; token embeddings stay frozen."""
    if mode == "compact" and any(isinstance(m, MPDLinear) for m in student.modules()):
        pack(student, inplace=True, fold_dense=False)
    _freeze_embeddings(student)
    return distill(student, teacher, batches, config, checkpoint=checkpoint, resume=resume, progress=progress)


def _packed(model: nn.Module) -> nn.Module:
    return pack(model) if any(isinstance(m, MPDLinear) for m in model.modules()) else model


def run_pretrained_study(
    teacher: nn.Module,
    tokenizer,
    train_sentences: list[str],
    test_sentences: list[str],
    profile: PretrainedProfile,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every measurement of the study as one JSON-ready dict (see the module's description)."""
    say = progress or (lambda message: None)
    filter_fn = select_roles(*profile.roles)
    test = test_sentences[: profile.eval_sentences]
    teacher.eval()
    reference = embed(teacher, tokenizer, test)
    results: dict[str, Any] = {"profile": asdict(profile), "rows": [], "baselines": [], "speed": []}
    batches = length_batches(tokenizer, train_sentences, profile.batch_size, profile.seed)
    calibration = length_batches(tokenizer, train_sentences[: profile.calibration], profile.batch_size, profile.seed)
    students: dict[tuple[str, int], nn.Module] = {}

    def tuned(event: dict[str, Any]) -> None:
        if "block" in event:
            say(f"  tuned {event['block']}: error {event['error_before']:.4f} -> {event['error_after']:.4f}")

    for c in profile.factors:
        pruned = copy.deepcopy(teacher)
        magnitude_prune_(pruned, 1 / c, filter_fn)
        results["baselines"].append(
            {"method": "magnitude", "compression": c, **neighbour_agreement(embed(pruned, tokenizer, test), reference)}
        )
        for masks in profile.masks:
            say(f"compressing at {c}x with {masks} masks")
            started = time.perf_counter()
            if masks == "calibrated":
                student = compress_calibrated(
                    teacher,
                    c,
                    calibration,
                    filter_fn=filter_fn,
                    seed=profile.seed,
                    block_steps=profile.block_steps,
                    progress=tuned,
                )
            else:
                student = mpdify_(copy.deepcopy(teacher), c, filter_fn=filter_fn, masks=masks, seed=profile.seed)
            seconds = time.perf_counter() - started
            per_layer = {
                name: kept_mass(teacher.get_submodule(name).weight, layer.mpd_mask)
                for name, layer in compressed_layers(student).items()
            }
            kept = list(per_layer.values())
            row = {
                "masks": masks,
                "compression": c,
                "layers": len(kept),
                "kept_mass": per_layer,
                "kept_mass_mean": sum(kept) / len(kept),
                "kept_mass_min": min(kept),
                "seconds_to_compress": seconds,
                "before": neighbour_agreement(embed(student, tokenizer, test), reference),
            }
            if (masks, c) in profile.distilled:
                say(f"distilling the {c}x {masks}-mask student ({profile.steps} steps)")
                distill_seconds = _distilled(student, teacher, batches, profile, say)
                row["after"] = neighbour_agreement(embed(student, tokenizer, test), reference)
                say(f"  after: cosine {row['after']['cosine']:.3f}, recall@10 {row['after']['recall@10']:.3f}")
                row["distill_steps"] = profile.steps
                row["distill_seconds"] = distill_seconds
                students[(masks, c)] = student
            results["rows"].append(row)
    results["speed"] = _speed(teacher, students, tokenizer, test, say)
    return results


def _distilled(student, teacher, batches, profile: PretrainedProfile, say) -> float:
    def report(event: dict[str, Any]) -> None:
        if event["step"] % max(1, profile.steps // 10) == 0:
            say(f"  step {event['step']}/{event['steps']}: loss {event['loss']:.4f}")

    config = DistillConfig(steps=profile.steps, lr=profile.lr, seed=profile.seed)
    return distill_encoder(student, teacher, batches, config, mode=profile.mode, progress=report).seconds


def _speed(teacher, students, tokenizer, sentences, say) -> list[dict[str, Any]]:
    """Packed students vs the dense teacher: file size, and CPU time per batch measured side by
    side (interleaved), at batch 1 and 32 on held-out sentences of median length."""
    say("timing packed students against the dense teacher")
    rows = []
    ordered = [sentences[i] for i in length_order(tokenizer, sentences)]
    middle = len(ordered) // 2
    inputs = {b: tokenize(tokenizer, ordered[middle : middle + b]) for b in (1, 32)}
    for (masks, c), student in students.items():
        packed = _packed(student).eval()
        sizes = file_bytes(teacher, packed)
        row = {"masks": masks, "compression": c, "file_vs_dense": sizes["packed"] / sizes["dense"]}
        with torch.inference_mode():
            for b, batch in inputs.items():
                times = interleaved_medians(
                    {"dense": lambda: teacher(**batch), "packed": lambda: packed(**batch)}, repeats=15, min_time=0.05
                )
                row[f"speedup_batch{b}"] = times["dense"] / times["packed"]
        rows.append(row)
    return rows


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def render_pretrained_report(results: dict[str, Any], command: str, machine: dict[str, Any]) -> str:
    """The pretrained-encoder study's results as a Markdown report headed by ``command``."""
    profile = results["profile"]
    lines = [
        f"# Compressing a pretrained {profile['model']} after training",
        "",
        f"Made by `{command}` on {machine.get('cpu', 'this machine')}. Compressed: the "
        f"{', '.join(profile['roles'])} layers. Agreement with the dense teacher on "
        f"{profile['eval_sentences']} held-out {profile['corpus']} sentences: mean cosine of the sentence "
        "embeddings, and recall@10 of each sentence's 10 nearest neighbours under the teacher. "
        f"Distillation: {profile['steps']} steps of {profile['batch_size']} sentences ({profile['mode']} mode, "
        f"AdamW lr {profile['lr']}, token embeddings frozen), matching every layer's hidden states and the "
        "sentence embedding. Masks: `random`; `weights`, chosen to keep the most of W²; `weights-joint`, "
        "one grouping of each MLP's hidden units for both of its layers; `calibrated`, chosen for W² E[x²] on "
        f"{profile.get('calibration', 0)} training sentences, then each layer's kept weights and bias refitted by "
        "least squares to the dense layer's output"
        + (
            f", then each transformer layer's compressed weights tuned together ({profile['block_steps']} Adam "
            "steps) to the teacher's layer output on the same sentences"
            if profile.get("block_steps")
            else ""
        )
        + " (`mpdcompress.posthoc.calibrate.compress_calibrated`; its time is in the compress column).",
        "",
        "| c | masks | kept W² (mean / min) | cosine before | recall@10 before | cosine after | recall@10 after "
        "| compress time | distill time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        after = r.get("after")
        minutes = f"{r['distill_seconds'] / 60:.1f} min" if after else "—"
        lines.append(
            f"| {r['compression']} | {r['masks']} | {_fmt(r['kept_mass_mean'])} / {_fmt(r['kept_mass_min'])} "
            f"| {_fmt(r['before']['cosine'])} | {_fmt(r['before']['recall@10'])} "
            f"| {_fmt(after['cosine']) if after else '—'} | {_fmt(after['recall@10']) if after else '—'} "
            f"| {r['seconds_to_compress']:.0f} s | {minutes} |"
        )
    for c in profile["factors"]:
        by_kind = {r["masks"]: r["kept_mass"] for r in results["rows"] if r["compression"] == c}
        if "random" in by_kind and "weights" in by_kind:
            wins = sum(by_kind["weights"][n] > by_kind["random"][n] for n in by_kind["random"])
            lines.append(
                f"\nAt {c}x, weight-chosen masks keep more of W² than random masks on {wins} of "
                f"{len(by_kind['random'])} layers."
            )
    lines += ["", "Post-hoc baseline, no fine-tuning (unstructured magnitude pruning to density 1/c, same layers):", ""]
    lines += ["| c | cosine | recall@10 |", "|---|---|---|"]
    lines += [f"| {b['compression']} | {_fmt(b['cosine'])} | {_fmt(b['recall@10'])} |" for b in results["baselines"]]
    for b in results["baselines"]:
        ours = [r for r in results["rows"] if r["compression"] == b["compression"] and r["masks"] == "calibrated"]
        if ours:
            before = ours[0]["before"]
            verdict = (
                "above" if before["cosine"] > b["cosine"] and before["recall@10"] > b["recall@10"] else "not above"
            )
            lines.append(
                f"\nAt {b['compression']}x before distillation, calibrated MPD keeps cosine {_fmt(before['cosine'])} "
                f"and recall@10 {_fmt(before['recall@10'])}: {verdict} magnitude pruning on both."
            )
    lines += ["", "Packed distilled students against the dense teacher (CPU, measured side by side):", ""]
    lines += ["| c | masks | file size vs dense | speed-up batch 1 | speed-up batch 32 |", "|---|---|---|---|---|"]
    lines += [
        f"| {s['compression']} | {s['masks']} | {_fmt(s['file_vs_dense'])} | {s['speedup_batch1']:.2f}x "
        f"| {s['speedup_batch32']:.2f}x |"
        for s in results["speed"]
    ]
    return "\n".join(lines) + "\n"


def write_pretrained_report(results: dict[str, Any], out: Path, command: str, machine: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**results, "command": command, "machine": machine}, indent=1))
    (out / "report.md").write_text(render_pretrained_report(results, command, machine))
