"""Weight-chosen vs random masks on a trained LeNet-300-100, compressed after training at 10x.

Trains the dense model (the trainer's recipe, real MNIST), then for each compressed layer
reports the fraction of W² the mask keeps and the test accuracy right after compression (no
fine-tuning), for random masks and for masks from ``mask_from_weight``.

Usage: python benchmarks/mask_search_lenet.py [--epochs 3] [--out results/mask_search]
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import mpdcompress as mpd
from mpdcompress.bench.machine import describe_machine
from mpdcompress.models import paper_filter
from mpdcompress.train import TrainConfig, train
from mpdcompress.train.inputs import open_datasets
from mpdcompress.train.loop import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--compression", type=int, default=10)
    parser.add_argument("--out", default="results/mask_search")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = TrainConfig(model="lenet300", compression=None, epochs=args.epochs)
    result = train(config)
    dense = result.model.eval()
    _, test_data = open_datasets(config.resolved())
    rows = {"dense_accuracy": result.test_accuracy, "epochs": args.epochs, "compression": args.compression}
    for masks in ("random", "weights"):
        started = time.perf_counter()
        model = mpd.mpdify_(
            copy.deepcopy(dense), args.compression, masks=masks, filter_fn=paper_filter(dense, "lenet300")
        )
        seconds = time.perf_counter() - started  # compressing, mask search included
        kept = {
            name: mpd.kept_mass(dense.get_submodule(name).weight, layer.mpd_mask)
            for name, layer in mpd.compressed_layers(model).items()
        }
        rows[masks] = {
            "kept_mass": kept,
            "accuracy_without_fine_tuning": evaluate(model, test_data, "mnist"),
            "seconds_to_compress": seconds,
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows["command"] = "python benchmarks/mask_search_lenet.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out"
    )
    rows["machine"] = describe_machine()
    (out / "lenet.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps({k: v for k, v in rows.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
