"""Deep MNIST on MNIST trained from scratch: dense vs MPD on its convolutions and FC layers at
c = 4 vs a thin dense network of the same parameter count, two seeds each.

Usage: python benchmarks/cnn_accuracy.py [--model deep-mnist] [--dataset mnist] [-c 4] [--epochs 3]
       [--seeds 0 1] [--train-limit N] [--out results/cnn_accuracy]
"""

import argparse
import sys

from mpdcompress.experiments.cnn_accuracy import CnnAccuracyProfile, render_cnn_accuracy, run_cnn_accuracy
from mpdcompress.experiments.study_files import command_line, timed_study, write_study


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
    results = timed_study(lambda: run_cnn_accuracy(profile, progress=lambda message: print(message, flush=True)))
    report = render_cnn_accuracy(results, command_line("benchmarks/cnn_accuracy.py", sys.argv[1:]))
    write_study(args.out, results, report)
    print(report)


if __name__ == "__main__":
    main()
