"""The ``mpdcompress`` command line. The only place that prints or exits."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .demo import run_demo

    bar = tqdm(total=args.steps, desc=f"training LeNet-300-100 shape at c={args.compression}", unit="step",
               disable=args.quiet)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    result = run_demo(compression=args.compression, steps=args.steps, seed=args.seed, progress=progress)
    bar.close()
    print(f"loss {result.first_loss:.3f} -> {result.last_loss:.3f} over {result.steps} steps (Adam, batch 50)")
    print(f"test accuracy (synthetic cluster task): {100 * result.test_accuracy:.2f} %")
    print(f"FC weights: dense {result.dense_fc_params:,} -> packed {result.packed_fc_params:,} "
          f"({result.dense_fc_params / result.packed_fc_params:.2f}x smaller)")
    print(f"packed vs masked model: max |difference| / output scale = {result.max_rel_error:.2e}")
    print(f"packed vs dense forward at batch {result.speedup_batch}: {result.packed_speedup:.2f}x faster")
    ok = result.max_rel_error <= 1e-5
    print("exactness check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpdcompress", description="Matrix permutation decomposition for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="mask, train, pack and check a small model on synthetic data")
    demo.add_argument("--compression", "-c", type=int, default=10)
    demo.add_argument("--steps", type=int, default=400)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        print(f"mpdcompress {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
