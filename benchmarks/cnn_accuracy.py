"""Deep MNIST on MNIST trained from scratch: dense vs MPD on its convolutions and FC layers at
c = 4 vs a thin dense network of the same parameter count, two seeds each.

Usage: python benchmarks/cnn_accuracy.py [--model deep-mnist] [--dataset mnist] [-c 4] [--epochs 3]
       [--seeds 0 1] [--train-limit N] [--out results/cnn_accuracy]
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from mpdcompress.atomic import write_atomic
from mpdcompress.bench.machine import describe_machine
from mpdcompress.experiments.cnn_accuracy import CnnAccuracyProfile, render_cnn_accuracy, run_cnn_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deep-mnist")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("-c", "--compression", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--out", default="results/cnn_accuracy")
    args = parser.parse_args()
    profile = CnnAccuracyProfile(
        args.model, args.dataset, args.compression, args.epochs, tuple(args.seeds), args.train_limit
    )
    started = time.perf_counter()
    results = run_cnn_accuracy(profile, progress=lambda message: print(message, flush=True))
    results["machine"] = describe_machine("cpu")
    results["wall_seconds"] = time.perf_counter() - started
    command = "python benchmarks/cnn_accuracy.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", lambda f: f.write(json.dumps(results, indent=1).encode()))
    write_atomic(out / "report.md", lambda f: f.write(render_cnn_accuracy(results, command.strip()).encode()))
    print(render_cnn_accuracy(results, command.strip()))


if __name__ == "__main__":
    main()
