"""The AlexNet FC stack (16384-4096-4096-1000) at c = 8 in PyTorch eager, ONNX Runtime and
ExecuTorch (XNNPACK), dense fp32 vs packed fp32, int8 and int4, batch 1 and 64.

Needs "mpdcompress[onnx,quant,mobile]" and an otherwise idle machine.
Usage: python benchmarks/runtimes.py [--model alexnet-fc] [-c 8] [--formats int8 int4]
       [--batches 1 64] [--runtimes pytorch onnxruntime executorch] [--out results/runtimes]
"""

import argparse
import sys

from mpdcompress.bench.runtimes import render_runtime_bench, run_runtime_bench
from mpdcompress.experiments.study_files import command_line, timed_study, write_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="alexnet-fc")
    parser.add_argument("-c", "--compression", type=int, default=8)
    parser.add_argument("--formats", nargs="+", default=["int8", "int4"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--runtimes", nargs="+", default=["pytorch", "onnxruntime", "executorch"])
    parser.add_argument("--out", default="results/runtimes")
    args = parser.parse_args()
    results = timed_study(
        lambda: run_runtime_bench(
            args.model,
            args.compression,
            tuple(args.formats),
            tuple(args.batches),
            tuple(args.runtimes),
            progress=lambda message: print(message, flush=True),
        )
    )
    report = render_runtime_bench(results, command_line("benchmarks/runtimes.py", sys.argv[1:]))
    write_study(args.out, results, report)
    print(report)


if __name__ == "__main__":
    main()
