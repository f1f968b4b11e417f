"""Does sharing one channel order per residual stream cost accuracy? The ResNet-18 shape trained
from scratch, dense and with MPD on its convolutions with independent and with shared stream
orders, on real images: Fashion-MNIST (CIFAR-10 itself is not on this machine) written in
CIFAR-10's binary format, 28x28 grey padded to 32x32 and repeated in three channels.

Usage: python benchmarks/shared_streams_accuracy.py [-c 4] [--width 0.25] [--epochs 3] [--seeds 0 1]
       [--train-limit N] [--out results/shared_streams_accuracy]
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from mpdcompress.data.sources import load_fashion_mnist
from mpdcompress.experiments.study_files import command_line, timed_study, write_study
from mpdcompress.train import TrainConfig, train


def write_as_cifar10(root: Path) -> None:
    """Fashion-MNIST as CIFAR-10's binary release: records of one label byte and 3x32x32 pixels."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        data = load_fashion_mnist(split)
        images = F.pad(data.images.view(-1, 1, 28, 28), (2, 2, 2, 2)).expand(-1, 3, -1, -1)
        records = np.concatenate(
            [data.labels.numpy().astype(np.uint8)[:, None], images.reshape(len(images), -1).numpy()], 1
        )
        for name, part in zip(names, np.array_split(records, len(names))):
            (folder / f"{name}.bin").write_bytes(part.astype(np.uint8).tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--compression", type=int, default=4)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--out", default="results/shared_streams_accuracy")
    args = parser.parse_args()
    variants = {
        "dense": {"compression": None},
        "mpd_independent": {"compression": args.compression, "compress_convs": True},
        "mpd_shared_streams": {"compression": args.compression, "compress_convs": True, "shared_streams": True},
    }

    def study() -> dict:
        rows = []
        with tempfile.TemporaryDirectory() as root:
            write_as_cifar10(Path(root))
            for variant, options in variants.items():
                for seed in args.seeds:
                    config = TrainConfig(
                        model="resnet18-cifar", dataset="cifar10", data_root=root, width=args.width, epochs=args.epochs,
                        batch_size=128, optimizer="adam", lr=1e-3, seed=seed, train_limit=args.train_limit, **options,
                    )  # fmt: skip
                    result = train(config)
                    rows.append({"variant": variant, "seed": seed, "accuracy": result.test_accuracy})
                    print(f"{variant}, seed {seed}: {100 * result.test_accuracy:.2f} %", flush=True)
        return {"profile": vars(args), "rows": rows}

    results = timed_study(study)
    lines = [
        f"# ResNet-18 shape at width {args.width}: independent vs shared residual-stream orders at c = {args.compression}",
        "",
        f"Command: `{command_line('benchmarks/shared_streams_accuracy.py', sys.argv[1:])}`. Trained from scratch "
        f"on Fashion-MNIST written as CIFAR-10 (padded to 32x32, grey in three channels), {args.epochs} epochs, "
        "Adam 1e-3, batch 128, MPD on every convolution but the first (the classifier stays dense); test accuracy "
        f"on the 10,000 test images. Wall time {results['wall_seconds'] / 60:.0f} minutes on "
        f"{results['machine']['cpu']} ({results['machine']['cpu_count']} cores), torch {results['machine']['torch']}.",
        "",
        "| variant | test accuracy, mean | per seed |",
        "|---|---|---|",
    ]
    for variant in variants:
        accuracies = [100 * r["accuracy"] for r in results["rows"] if r["variant"] == variant]
        lines.append(
            f"| {variant} | {statistics.mean(accuracies):.2f} % | {', '.join(f'{a:.2f}' for a in accuracies)} |"
        )
    report = "\n".join(lines) + "\n"
    write_study(args.out, results, report)
    print(report)


if __name__ == "__main__":
    main()
