"""Training throughput of the AlexNet FC stack, 1 process vs N processes (torchrun + DDP, gloo on CPU).

    python benchmarks/ddp_throughput.py [--out results/bench_ddp] [--nproc 2] [--batch 512] [--rounds 2]

Each configuration (masked/compact × 1/N processes) is a separate run that times real
optimizer steps through ``mpdcompress.train`` (data, forward, backward, all-reduce, step);
the configurations are run round-robin ``--rounds`` times so that machine drift cancels out,
and the report gives per-round ratios measured side by side. One process uses every core
through intra-op threads; N processes split them (torchrun gives each one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mpdcompress.bench.machine import describe_machine


def worker(args: argparse.Namespace) -> None:
    from mpdcompress.train import TrainConfig, init_from_env
    from mpdcompress.train.distributed import barrier, shutdown
    from mpdcompress.train.plan import estimate_step_seconds

    ctx = init_from_env("cpu")
    config = TrainConfig(
        model="alexnet-fc",
        dataset="fake",
        compression=8,
        mode=args.mode,
        batch_size=args.batch,
        train_limit=args.batch * (args.warmup + args.steps + 1),
        epochs=1,
    )
    seconds = estimate_step_seconds(config, steps=args.steps, warmup=args.warmup)
    if ctx.is_main:
        Path(args.result).write_text(
            json.dumps({"step_seconds": seconds, "world_size": ctx.world_size, "threads": torch.get_num_threads()})
        )
    barrier(ctx)
    shutdown()


def run_one(mode: str, nproc: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        script = [
            __file__,
            "--worker",
            "--mode",
            mode,
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--result",
            str(result),
        ]
        launcher = (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            if nproc > 1
            else [sys.executable]
        )
        subprocess.run(launcher + script, check=True, env=dict(os.environ), capture_output=True)
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/bench_ddp")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512, help="global batch (the paper's AlexNet recipe: 512)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    configs = [(mode, n) for mode in ("masked", "compact") for n in (1, args.nproc)]
    rounds = []
    for r in range(args.rounds):
        round_ = {}
        for mode, n in configs:
            print(f"round {r + 1}/{args.rounds}: {mode}, {n} process(es)", flush=True)
            round_[f"{mode}/{n}"] = statistics.median(run_one(mode, n, args)["step_seconds"])
        rounds.append(round_)
    rows = []
    for mode, n in configs:
        step = statistics.median(rd[f"{mode}/{n}"] for rd in rounds)
        vs_one = [rd[f"{mode}/1"] / rd[f"{mode}/{n}"] for rd in rounds]
        vs_masked = [rd[f"masked/{n}"] / rd[f"compact/{n}"] for rd in rounds] if mode == "compact" else []
        rows.append(
            {
                "mode": mode,
                "processes": n,
                "median_step_seconds": step,
                "images_per_second": args.batch / step,
                "speedup_vs_1_process": vs_one,
                "compact_speedup_vs_masked": vs_masked,
            }
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/ddp_throughput.py " + " ".join(sys.argv[1:])
    report = {
        "command": command.strip(),
        "machine": describe_machine(),
        "global_batch": args.batch,
        "model": "alexnet-fc (16384-4096-4096-1000), c=8, SGD, fake data",
        "rounds": rounds,
        "rows": rows,
    }
    (out / "ddp.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# Training throughput: 1 vs {args.nproc} processes (torchrun + DDP, gloo)",
        "",
        f"Made by `{report['command']}`. Machine: {report['machine']}.",
        "",
        f"AlexNet FC stack at c=8, global batch {args.batch}, SGD, fake data; median optimizer-step time of "
        f"{args.steps} steps after {args.warmup} warm-up steps, {args.rounds} round-robin rounds. Ratios are "
        "per round (same round, side by side).",
        "",
        "| mode | processes | step (s) | images/s | vs 1 process | compact vs masked |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        fmt = lambda xs: " / ".join(f"{x:.2f}x" for x in xs) or "–"  # noqa: E731
        lines.append(
            f"| {row['mode']} | {row['processes']} | {row['median_step_seconds']:.3f} | "
            f"{row['images_per_second']:.0f} | {fmt(row['speedup_vs_1_process'])} | "
            f"{fmt(row['compact_speedup_vs_masked'])} |"
        )
    (out / "ddp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
