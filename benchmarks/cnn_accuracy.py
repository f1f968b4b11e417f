"""Deep MNIST on MNIST trained from scratch: dense vs MPD on its convolutions and FC layers at
c = 4 vs a thin dense network of the same parameter count, two seeds each.

Results are rewritten after every training run; ``--resume`` keeps the runs already in ``--out``
(same settings, any of the seeds asked for), so a study of hours can be finished in parts.

Usage: python benchmarks/cnn_accuracy.py [--model deep-mnist] [--dataset mnist] [-c 4] [--epochs 3]
       [--seeds 0 1] [--train-limit N] [--out results/cnn_accuracy] [--resume]
"""

import argparse
import json
import sys
from pathlib import Path

from mpdcompress.errors import ConfigError
from mpdcompress.experiments.cnn_accuracy import (
    CnnAccuracyProfile,
    render_cnn_accuracy,
    resumable_rows,
    run_cnn_accuracy,
)
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
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    args = parser.parse_args()
    profile = CnnAccuracyProfile(
        args.model, args.dataset, args.compression, args.epochs, tuple(args.seeds), args.train_limit
    )
    # The command a reader would type to make the whole table again (--resume only splits the work).
    command = command_line("benchmarks/cnn_accuracy.py", [a for a in sys.argv[1:] if a != "--resume"])
    done = []
    previous = Path(args.out) / "results.json"
    if args.resume and previous.exists():
        try:
            done = resumable_rows(json.loads(previous.read_text()), profile)
        except ConfigError as error:
            sys.exit(f"cnn_accuracy.py: {error}")

    def write(results: dict) -> str:  # after every training run (a run cut short keeps them) and at the end
        report = render_cnn_accuracy(results, command)
        write_study(args.out, results, report)
        return report

    # The machine and wall time (this sitting's; each row has its own seconds) come with the last write.
    results = timed_study(
        lambda: run_cnn_accuracy(profile, lambda message: print(message, flush=True), done=done, on_row=write)
    )
    print(write(results))


if __name__ == "__main__":
    main()
