"""The smallest model: LeNet-300-100 on MNIST, MPD at c = 4, 8, 10, 16 × fp32 / int8 / int4,
whole-file bytes, test accuracy and CPU speed, beside the dense model quantized the same way and
Deep Compression's published figures.

Usage: python benchmarks/size_study.py [--model lenet300] [--dataset mnist] [-c 4 8 10 16]
       [--formats int8 int4 int4-g64] [--epochs 20] [--train-limit N] [--out results/size]
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from mpdcompress.atomic import write_atomic
from mpdcompress.bench.machine import describe_machine
from mpdcompress.experiments.size_study import SizeProfile, plot_size_study, render_size_study, run_size_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet300")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("-c", "--compressions", type=int, nargs="+", default=[4, 8, 10, 16])
    parser.add_argument("--formats", nargs="+", default=["int8", "int4", "int4-g64"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--out", default="results/size")
    args = parser.parse_args()
    profile = SizeProfile(
        args.model,
        args.dataset,
        tuple(args.compressions),
        tuple(args.formats),
        args.epochs,
        args.seed,
        args.train_limit,
        speed_compression=10 if 10 in args.compressions else args.compressions[0],
    )
    started = time.perf_counter()
    results = run_size_study(profile, progress=lambda message: print(message, flush=True))
    results["machine"] = describe_machine("cpu")
    results["wall_seconds"] = time.perf_counter() - started
    command = "python benchmarks/size_study.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", lambda f: f.write(json.dumps(results, indent=1).encode()))
    report = render_size_study(results, command.strip())
    write_atomic(out / "report.md", lambda f: f.write(report.encode()))
    plot_size_study(results, out / "size_accuracy.png")
    print(report)


if __name__ == "__main__":
    main()
