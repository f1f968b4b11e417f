"""``mpdcompress distill``: compress a registered pretrained sentence encoder and recover it by
distillation on real text, then save it (config.json + model file) and report the agreement."""

from __future__ import annotations

import argparse

from ..core.config import MASKS, MODES
from ..core.roles import ROLE_GROUPS, ROLES
from ..data.text import CORPORA
from ..errors import ConfigError
from ..posthoc.sentence import PRETRAINED
from .arguments import nonnegative_int, positive_float, positive_int, seed

__all__ = ["add_distill_parser"]


def _cmd_distill(args: argparse.Namespace) -> int:
    import copy

    from tqdm import tqdm

    from ..core.convert import mpdify_, pack
    from ..core.roles import select_roles
    from ..data.text import held_out_split, interleave, load_corpus, sample_sentences
    from ..files.hf import save_compressed
    from ..nn import MaskedWeight
    from ..posthoc.calibrate import compress_calibrated
    from ..posthoc.sentence import embed, length_batches, load_sentence_encoder, neighbour_agreement, pretrained_spec

    if args.resume and not args.checkpoint:
        raise ConfigError("--resume continues from --checkpoint: give the checkpoint file")
    spec = pretrained_spec(args.model)
    roles = args.roles or list(spec.roles)
    compression = args.compression or spec.compression
    corpora = _training_corpora(args, spec.corpus)
    teacher, tokenizer = load_sentence_encoder(args.model, args.model_dir)
    parts, sources = [], {}
    for name, folder in corpora.items():
        part, held = held_out_split(load_corpus(name, folder))
        parts.append(part)
        sources[f"{name} (held out)"] = held[: args.eval_sentences]
    # Interleaved in equal shares, so that the first --calibration sentences and every stretch of
    # batches mix them.
    train = interleave(parts)
    for entry in args.eval_corpus or []:
        name, _, folder = entry.partition("=")
        if name in corpora and not folder:
            continue  # its held-out part is evaluated already
        sources[name] = sample_sentences(load_corpus(name, folder or None), args.eval_sentences)
    references = {source: embed(teacher, tokenizer, sentences) for source, sentences in sources.items()}

    def agreement() -> str:
        scores = {
            source: neighbour_agreement(embed(student, tokenizer, sources[source]), reference)
            for source, reference in references.items()
        }
        return "; ".join(f"{source}: {_agreement(s)}" for source, s in scores.items())

    filter_fn = select_roles(roles)
    if args.block_steps and not args.calibration:
        raise ConfigError("--block-steps tunes on the calibration sentences: give --calibration as well")
    if args.calibration:
        calibration = length_batches(tokenizer, train[: args.calibration], args.batch_size, args.seed)
        bars: dict[str, tqdm] = {}

        def calibrated(event: dict) -> None:
            kind = next(k for k in ("mask", "layer", "block") if k in event)
            if kind not in bars:
                description = {"mask": "choosing masks", "layer": "refitting", "block": "tuning"}[kind]
                bars[kind] = tqdm(desc=description, unit="block" if kind == "block" else "layer", disable=args.quiet)
            bars[kind].total = event[f"{kind}s"]
            bars[kind].update(1)

        student = compress_calibrated(
            teacher,
            compression,
            calibration,
            filter_fn=filter_fn,
            masks=args.masks,
            seed=args.seed,
            block_steps=args.block_steps,
            progress=calibrated,
        )
        for bar in bars.values():
            bar.close()
        how = f"{args.masks} masks for {args.calibration} calibration sentences, kept weights refitted"
        if args.block_steps:
            how += f" and tuned {args.block_steps} steps per block"
    else:
        student = mpdify_(
            copy.deepcopy(teacher),
            compression,
            filter_fn=filter_fn,
            masks=args.masks,
            seed=args.seed,
            progress=not args.quiet,
        )
        how = f"{args.masks} masks"
    print(f"compressed {', '.join(roles)} layers at {compression}x ({how}): " + agreement())
    if args.steps:
        _distill(args, student, teacher, tokenizer, train)
        print(f"after {args.steps} steps: " + agreement())
    # Compact distillation trains the packed form already; a masked student is packed here.
    packed = pack(student) if any(isinstance(m, MaskedWeight) for m in student.modules()) else student
    folder = save_compressed(packed.encoder, args.output)
    print(f"saved the packed encoder to {folder} (load with mpdcompress.files.hf.load_compressed)")
    return 0


def _distill(args: argparse.Namespace, student, teacher, tokenizer, train: list[str]) -> None:
    from tqdm import tqdm

    from ..experiments.pretrained import distill_encoder
    from ..posthoc.distill import DistillConfig
    from ..posthoc.sentence import length_batches

    config = DistillConfig(steps=args.steps, lr=args.lr, seed=args.seed, checkpoint_every=args.checkpoint_every)
    bar = tqdm(total=args.steps, desc="distilling", unit="step", disable=args.quiet)

    def progress(event: dict) -> None:
        bar.n = event["step"]
        bar.set_postfix(loss=f"{event['loss']:.4f}", refresh=False)
        bar.update(0)

    batches = length_batches(tokenizer, train, args.batch_size, args.seed)
    result = distill_encoder(
        student,
        teacher,
        batches,
        config,
        mode=args.mode,
        checkpoint=args.checkpoint,
        resume=args.resume,
        progress=progress,
    )
    bar.close()
    print(f"distilled {result.steps} steps in {result.seconds / 60:.1f} min")


def _training_corpora(args: argparse.Namespace, default: str) -> dict[str, str | None]:
    """Name → folder (None: where Debian installs it) of each calibration and distillation corpus."""
    entries = [entry.partition("=") for entry in args.corpus or [default]]
    corpora = {name: folder or None for name, _, folder in entries}
    unknown = sorted(set(corpora) - set(CORPORA))
    if unknown:
        raise ConfigError(f"unknown corpus {unknown}: choose from {', '.join(CORPORA)}")
    if args.corpus_dir:
        if len(corpora) > 1:
            raise ConfigError("--corpus-dir names the folder of one corpus: give several as NAME=DIR")
        corpora = {name: args.corpus_dir for name in corpora}
    return corpora


def _agreement(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def add_distill_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``distill`` subcommand (pretrained sentence encoders) to ``sub``."""
    p = sub.add_parser(
        "distill",
        help="compress a pretrained sentence encoder and recover it by distillation on real text",
    )
    p.add_argument("--model", choices=list(PRETRAINED), default="all-minilm-l6-v2")
    p.add_argument("--model-dir", help="folder with config.json, model.safetensors, tokenizer.json")
    p.add_argument("--compression", "-c", type=positive_int, help="default: the model's registry factor")
    p.add_argument("--masks", choices=MASKS, default="weights")
    p.add_argument(
        "--calibration",
        type=nonnegative_int,
        default=0,
        help="training sentences that choose the masks (W² E[x²]) and refit the kept weights before "
        "distilling (default 0: masks from the weights alone; after 2000 steps both end alike)",
    )
    p.add_argument(
        "--block-steps",
        type=nonnegative_int,
        default=0,
        help="after the refit, tune each transformer layer's compressed weights to the teacher's layer "
        "output on the calibration sentences, this many steps per layer (default 0: no tuning)",
    )
    p.add_argument("--roles", nargs="+", choices=[*ROLE_GROUPS, *ROLES], help="layers to compress (default: mlp)")
    p.add_argument("--mode", choices=MODES, default="compact", help="compact trains the packed blocks directly")
    p.add_argument(
        "--corpus",
        nargs="+",
        metavar="NAME[=DIR]",
        help=f"calibration, distillation and held-out text ({', '.join(CORPORA)}; default: wordnet); several "
        "are interleaved in equal shares (the smaller repeated), each evaluated on its own held-out part",
    )
    p.add_argument("--corpus-dir", help="where the (one) corpus's files are, if not where Debian installs them")
    p.add_argument(
        "--eval-corpus",
        nargs="+",
        metavar="NAME[=DIR]",
        help=f"also report the agreement on these corpora ({', '.join(CORPORA)}), which nothing was "
        "calibrated or distilled on (DIR: where its files are)",
    )
    p.add_argument(
        "--steps",
        type=nonnegative_int,
        default=1000,
        help="distillation steps (0: none, the compressed or calibrated student is saved as it is)",
    )
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--eval-sentences", type=positive_int, default=1000, help="held-out sentences to evaluate on")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--checkpoint", help="checkpoint file, written every --checkpoint-every steps")
    p.add_argument("--checkpoint-every", type=positive_int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("-o", "--output", required=True, help="folder for config.json and the compressed model file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_distill)
