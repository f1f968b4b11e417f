"""``mpdcompress train``: one process, or every rank of a torchrun job (only rank 0 talks)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
from pathlib import Path

from ..errors import ConfigError
from .arguments import device_name, nonnegative_float, nonnegative_int, positive_float, positive_int, seed

__all__ = ["add_train_parser"]


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand (paper models, recipes, torchrun) to ``sub``."""
    from ..data.datasets import DATASETS
    from ..models import MODELS
    from ..train import RECIPES

    tr = sub.add_parser(
        "train",
        help="train a paper model (dense, masked or compact), on one process or under torchrun",
        description="Runs unchanged under `torchrun --nproc_per_node=N` (DDP: NCCL on GPUs, gloo on CPU).",
    )
    tr.add_argument("--recipe", choices=sorted(RECIPES), help="a named training setup; other flags override it")
    tr.add_argument("--model", choices=list(MODELS), help="default: lenet300, or the recipe's")
    tr.add_argument(
        "--dataset",
        choices=list(DATASETS),
        help="default: the model's; 'fake' = random images of the model's input shape",
    )
    tr.add_argument(
        "--compression", "-c", type=nonnegative_int, help="0 trains the dense baseline (default: the paper's factor)"
    )
    tr.add_argument(
        "--no-permute", dest="permute", action="store_false", help="plain block-diagonal masks (the paper's ablation)"
    )
    tr.add_argument(
        "--width",
        type=positive_float,
        help="every inner width (channels, hidden features) times this: 0.5 trains a thin dense baseline",
    )
    tr.add_argument(
        "--compress-convs",
        action="store_true",
        help="compress the convolutions too (grouped convolutions when packed), all but the one reading the image",
    )
    tr.add_argument(
        "--shared-streams",
        action="store_true",
        help="with --compress-convs: the convolutions on one residual stream share its channel order, so the "
        "packed model needs no gathers there (ResNets)",
    )
    tr.add_argument(
        "--mode",
        choices=["masked", "compact"],
        default="masked",
        help="compact trains the packed block-diagonal form directly (~1/c of the cost)",
    )
    tr.add_argument(
        "--qat",
        metavar="FORMAT",
        help="with --mode compact: train with the blocks rounded as FORMAT (int8, int4, int4-g128, ...) stores them; "
        "then `mpdcompress quantize --format FORMAT` stores exactly those blocks",
    )
    tr.add_argument(
        "--init",
        choices=["block", "dense"],
        default="block",
        help="block: fan-in = block width (default); dense: nn.Linear's initialization",
    )
    tr.add_argument("--seed", type=seed, default=0, help="initialization and data order")
    tr.add_argument("--mask-seed", type=nonnegative_int, help="masks (default: --seed)")
    tr.add_argument("--epochs", type=positive_int)
    tr.add_argument(
        "--batch-size", type=positive_int, help="global batch per optimizer step, summed over all processes"
    )
    tr.add_argument(
        "--micro-batch",
        type=positive_int,
        help="images per process per forward pass; smaller than batch/processes accumulates gradients",
    )
    tr.add_argument("--lr", type=positive_float)
    tr.add_argument("--optimizer", choices=["adam", "sgd"])
    tr.add_argument("--weight-decay", type=nonnegative_float)
    tr.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast (CPU and CUDA)")
    tr.add_argument("--compile", action="store_true", help="torch.compile the (DDP-wrapped) model")
    tr.add_argument("--train-limit", type=positive_int, help="use only the first N training images")
    tr.add_argument(
        "--workers", type=nonnegative_int, default=4, help="image-decoding processes per rank (ImageNet folders)"
    )
    tr.add_argument(
        "--device", type=device_name, default="cpu", help="cpu or cuda (under torchrun: each rank's local GPU)"
    )
    tr.add_argument("--data", dest="data_root", help="data folder (default $MPDCOMPRESS_DATA or ~/.cache/mpdcompress)")
    tr.add_argument(
        "--out",
        default="runs/train",
        help="folder for checkpoint.pt, result.json and the model file (shared by all ranks)",
    )
    tr.add_argument(
        "--checkpoint-every", type=positive_int, help="also checkpoint every N optimizer steps within an epoch"
    )
    tr.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    tr.add_argument("--dry-run", action="store_true", help="print the whole plan and exit; needs no data")
    tr.add_argument("--nproc", type=positive_int, help="with --dry-run outside torchrun: plan for this many processes")
    tr.add_argument(
        "--estimate",
        action="store_true",
        help="time a few real steps and print the projected wall time of the whole run, then exit",
    )
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=run_train)


def _config(args: argparse.Namespace):
    import dataclasses

    from ..models import model_spec
    from ..train import TrainConfig

    # Every TrainConfig field that has a flag of the same name (argparse dest) comes from the command line.
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.recipe is None:
        # Without --recipe, the model's own recipe and dataset (its registry entry).
        spec = model_spec(args.model or "lenet300")
        given["model"] = spec.name
        given["dataset"] = args.dataset or spec.dataset
        if spec.recipe is None:  # the registry's factor, as a recipe would give it; -c 0: dense
            factor = spec.compression if given["compression"] is None else given["compression"] or None
            values = {k: v for k, v in given.items() if v is not None}
            return TrainConfig(**{**values, "compression": factor})
    return TrainConfig.from_recipe(args.recipe or model_spec(given["model"]).recipe, **given)


def _print_plan(plan, recipe: str | None) -> None:
    from ..train import RECIPES

    p = plan
    kind = f"MPD c={p.compression}, {p.mode} mode" if p.compression else "dense"
    print(f"plan: {p.model} on {p.dataset} ({kind}, {p.precision})" + (f", recipe {recipe}" if recipe else ""))
    if recipe:
        print(f"  recipe source: {RECIPES[recipe].source}")
    print(
        f"  data: {p.data_location} ({'present' if p.data_present else 'NOT present'}), {p.train_images:,} "
        "training images"
    )
    print(
        f"  FC weights: dense {p.fc_weights_dense:,} -> kept {p.fc_weights_kept:,} "
        f"({p.fc_weights_dense / p.fc_weights_kept:.2f}x fewer)"
    )
    print(f"  parameters: dense model {p.parameters_dense:,}; trained here {p.parameters_trained:,}")
    print(
        f"  optimizer: {p.optimizer} lr {p.lr} ({p.lr_schedule}), momentum {p.momentum}, weight decay {p.weight_decay}"
    )
    print(
        f"  batch: global {p.global_batch} = {p.world_size} processes x {p.micro_batch} per forward x "
        f"{p.accumulation} accumulation step(s)"
    )
    print(f"  steps: {p.steps_per_epoch:,} per epoch x {p.epochs} epochs = {p.total_steps:,} optimizer steps")


class _StopOnSignal:
    """SIGTERM or a first Ctrl-C asks the trainer to stop at the next step; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None


def run_train(args: argparse.Namespace) -> int:
    from ..train import TrainingInterrupted, init_from_env, make_plan
    from ..train.distributed import barrier, shutdown

    config = _config(args)
    if args.nproc and not args.dry_run:
        raise ConfigError(
            f"--nproc plans a run with --dry-run; to train with {args.nproc} processes, start "
            f"`torchrun --nproc_per_node={args.nproc} -m mpdcompress train ...`"
        )
    if args.dry_run:
        world = int(os.environ.get("WORLD_SIZE", args.nproc or 1))
        if int(os.environ.get("RANK", 0)) == 0:
            _print_plan(make_plan(config, world), args.recipe)
        return 0
    ctx = init_from_env(config.device)
    try:
        code = _estimate(config, args, ctx) if args.estimate else _train(config, args, ctx)
        barrier(ctx)  # a rank that tore its process group down while others still work would abort the job
        return code
    except TrainingInterrupted as exc:
        if ctx.is_main:
            print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    finally:
        shutdown()


def _estimate(config, args, ctx) -> int:
    import dataclasses

    from ..train import RECIPES, make_plan
    from ..train.config import recipe_for_model
    from ..train.plan import estimate_step_seconds

    plan = make_plan(config, ctx.world_size)
    projected, stand_in = plan, ""
    recipe = RECIPES[args.recipe] if args.recipe else recipe_for_model(config.model)
    if config.dataset == "fake" and recipe is not None and recipe.dataset != "fake":
        # Fake images time the steps; the run they stand for is over the recipe's real dataset.
        projected = make_plan(dataclasses.replace(config, dataset=recipe.dataset), ctx.world_size)
        stand_in = f" over {recipe.dataset}'s {projected.train_images:,} training images (fake images timed)"
    seconds = estimate_step_seconds(config)
    if ctx.is_main:
        _print_plan(plan, args.recipe)
        step = statistics.median(seconds)
        total = step * projected.total_steps
        print(
            f"measured: {step * 1e3:.1f} ms per optimizer step (median of {len(seconds)}, data loading included) "
            f"on {ctx.world_size} process(es), {plan.global_batch / step:,.0f} images/s"
        )
        print(
            f"projected: {total / 3600:.1f} h for {projected.total_steps:,} steps{stand_in} on this hardware "
            "(evaluation passes not included)"
        )
    return 0


def _train(config, args, ctx) -> int:
    from tqdm import tqdm

    from ..files.io import save
    from ..models import model_spec
    from ..train import train

    main = ctx.is_main
    resolved = config.resolved()
    if main:
        where = f"{ctx.world_size} processes ({ctx.backend})" if ctx.distributed else "1 process"
        print(
            f"training {resolved.model} on {resolved.dataset} with {where}: "
            + (
                f"MPD c={resolved.compression} {resolved.mode}{'' if resolved.permute else ' (non-permuted)'}"
                + (", convolutions too" if resolved.compress_convs else "")
                + (" (residual streams share their channel orders)" if resolved.shared_streams else "")
                + (f", blocks trained as {resolved.qat}" if resolved.qat else "")
                if resolved.compression
                else "dense"
            )
            + f", {resolved.optimizer} lr {resolved.lr}, batch {resolved.batch_size}, {resolved.epochs} epochs, "
            f"seed {resolved.seed}, {resolved.precision}"
        )
    bar = None

    def progress(event: dict) -> None:
        nonlocal bar
        if event["event"] == "step":
            if bar is None:
                bar = tqdm(
                    total=event["steps_per_epoch"],
                    initial=event["step"] - 1,
                    desc=f"epoch {event['epoch'] + 1}/{resolved.epochs}",
                    unit="step",
                    disable=args.quiet,
                    leave=False,
                )
            bar.update(1)
            if event["loss"] is not None:
                bar.set_postfix(loss=f"{event['loss']:.4f}")
        else:
            if bar is not None:
                bar.close()
                bar = None
            print(
                f"epoch {event['epoch']}: train loss {event['train_loss']:.4f}, test accuracy "
                f"{100 * event['test_accuracy']:.2f} %",
                flush=True,
            )

    out = Path(args.out)
    result = train(config, checkpoint_dir=out, resume=args.resume, progress=progress, should_stop=_StopOnSignal())
    if not main:
        return 0
    (out / "result.json").write_text(json.dumps({k: v for k, v in vars(result).items() if k != "model"}, indent=1))
    print(
        f"final test accuracy {100 * result.test_accuracy:.2f} % with {result.fc_weights:,} FC weights; "
        f"checkpoint in {out / 'checkpoint.pt'}"
    )
    if resolved.compression:
        name = "packed" if resolved.mode == "compact" else "masked"
        path = save(result.model, out / f"{name}.safetensors", input_shape=model_spec(resolved.model).input_shape)
        if name == "masked":
            hint = f" (pack it with: mpdcompress pack {path} -o packed.safetensors)"
        elif resolved.qat:
            hint = f" (quantize it with: mpdcompress quantize {path} -o quantized.safetensors --format {resolved.qat})"
        else:
            hint = ""
        print(f"{name} model: {path}{hint}")
    return 0
