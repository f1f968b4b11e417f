"""LeNet-300-100 and Deep MNIST trained dense, compressed afterwards at 10x with random and
weight-chosen masks, distilled for 0, 100, 1000 steps and one epoch, against MPD from scratch.

Usage: python benchmarks/posthoc_mnist.py [--lenet-epochs 20] [--deep-epochs 3] [--out results/posthoc]
       python benchmarks/posthoc_mnist.py --lenet-epochs 0 --convs -c 4 --masks weights calibrated l1-filters
           --out results/posthoc-cnn   (Deep MNIST with its convolutions compressed, against filter pruning)
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from mpdcompress.bench.machine import describe_machine
from mpdcompress.experiments.posthoc import PosthocProfile, run_posthoc_study, write_posthoc_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lenet-epochs", type=int, default=20, help="0 leaves LeNet-300-100 out")
    parser.add_argument("--deep-epochs", type=int, default=3, help="0 leaves Deep MNIST out")
    parser.add_argument("--convs", action="store_true", help="compress the convolutions too (all but the first)")
    parser.add_argument("-c", "--compression", type=int, help="default: each model's paper factor")
    parser.add_argument("--masks", nargs="+", default=["random", "weights", "calibrated"])
    parser.add_argument("--out", default="results/posthoc")
    args = parser.parse_args()
    models = (("lenet300", args.lenet_epochs, 1e-2),) if args.lenet_epochs else ()
    models += (("deep-mnist", args.deep_epochs, 1e-3),) if args.deep_epochs else ()
    torch.manual_seed(0)
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f}s] {message}", flush=True)

    profile = PosthocProfile(models=models, masks=tuple(args.masks), compression=args.compression, convs=args.convs)
    results = run_posthoc_study(profile, say)
    command = ("python benchmarks/posthoc_mnist.py " + " ".join(sys.argv[1:])).strip()
    write_posthoc_report(results, Path(args.out), command, describe_machine())
    print((Path(args.out) / "report.md").read_text())


if __name__ == "__main__":
    main()
