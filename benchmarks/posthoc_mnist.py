"""LeNet-300-100 and Deep MNIST trained dense, compressed afterwards at 10x with random and
weight-chosen masks, distilled for 0, 100, 1000 steps and one epoch, against MPD from scratch.

Usage: python benchmarks/posthoc_mnist.py [--lenet-epochs 20] [--deep-epochs 3] [--out results/posthoc]
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
    parser.add_argument("--lenet-epochs", type=int, default=20)
    parser.add_argument("--deep-epochs", type=int, default=3, help="0 leaves Deep MNIST out")
    parser.add_argument("--out", default="results/posthoc")
    args = parser.parse_args()
    models = (("lenet300", args.lenet_epochs, 1e-2),) + (
        (("deep-mnist", args.deep_epochs, 1e-3),) if args.deep_epochs else ()
    )
    torch.manual_seed(0)
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f}s] {message}", flush=True)

    results = run_posthoc_study(PosthocProfile(models=models), say)
    command = ("python benchmarks/posthoc_mnist.py " + " ".join(sys.argv[1:])).strip()
    write_posthoc_report(results, Path(args.out), command, describe_machine())
    print((Path(args.out) / "report.md").read_text())


if __name__ == "__main__":
    main()
