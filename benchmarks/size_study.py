"""The smallest model: LeNet-300-100 on MNIST, MPD at c = 4, 8, 10, 16 × fp32 / int8 / int4,
whole-file bytes, test accuracy and CPU speed, beside the dense model quantized the same way and
Deep Compression's published figures.

Usage: python benchmarks/size_study.py [--model lenet300] [--dataset mnist] [-c 4 8 10 16]
       [--formats int8 int4 int4-g128] [--epochs 20] [--qat-steps 0] [--train-limit N]
       [--out results/size]
"""

import argparse
import sys

from mpdcompress.experiments.size_study import SizeProfile, plot_size_study, render_size_study, run_size_study
from mpdcompress.experiments.study_files import command_line, timed_study, write_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet300")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("-c", "--compressions", type=int, nargs="+", default=[4, 8, 10, 16])
    parser.add_argument("--formats", nargs="+", default=["int8", "int4", "int4-g128"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--qat-steps", type=int, default=0, help="quantization-aware steps per 4-bit format")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--convs", action="store_true", help="MPD on the convolutions too (but the first)")
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
        qat_steps=args.qat_steps,
        compress_convs=args.convs,
    )
    results = timed_study(lambda: run_size_study(profile, progress=lambda message: print(message, flush=True)))
    report = render_size_study(results, command_line("benchmarks/size_study.py", sys.argv[1:]))
    plot_size_study(results, write_study(args.out, results, report) / "size_accuracy.png")
    print(report)


if __name__ == "__main__":
    main()
