"""Which activation layout the PyTorch engine should use at small batches, measured.

Every packed model stack of the registry's CPU benchmark runs at batch 1-64 in both layouts of
the engine: feature-major activations ``(features, batch)`` between layers (block GEMMs with the
batch as their N dimension) and batch-major ``(batch, features)`` (the batch as M), timed
round-robin in one process with the dense model beside them. The engine switches at
``BATCH_MAJOR_BELOW``; this is the measurement that sets it. Writes
results/small_batch_layout/{small_batch_layout.json,report.md}. Run it on an idle machine.

    python benchmarks/small_batch_layout.py [--threads 2] [--out results/small_batch_layout]
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import mpdcompress as mpd
from mpdcompress.bench.machine import describe_machine
from mpdcompress.kernels import torch_engine
from mpdcompress.models import MODELS, build_model, paper_filter
from mpdcompress.timing import interleaved_medians

STACKS = {"lenet300": 10, "alexnet-fc": 8, "transformer-mlp": 8}
BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 64)
LAYOUTS = {"batch-major": 10**9, "feature-major": 0}  # BATCH_MAJOR_BELOW that forces each


class _Layout(torch.nn.Module):
    """``model`` run with the engine's threshold set to ``below`` for the call."""

    def __init__(self, model: torch.nn.Module, below: int) -> None:
        super().__init__()
        self.model, self.below = model, below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saved, torch_engine.BATCH_MAJOR_BELOW = torch_engine.BATCH_MAJOR_BELOW, self.below
        try:
            return self.model(x)
        finally:
            torch_engine.BATCH_MAJOR_BELOW = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="results/small_batch_layout")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, c in STACKS.items():
        torch.manual_seed(0)
        dense = build_model(name).eval()
        packed = mpd.pack(mpd.mpdify_(copy.deepcopy(dense), c, filter_fn=paper_filter(dense, name), seed=0)).eval()
        variants = {"dense": dense, **{layout: _Layout(packed, below) for layout, below in LAYOUTS.items()}}
        for batch in BATCHES:
            x = torch.randn(batch, *MODELS[name].input_shape)
            with torch.no_grad():
                seconds = interleaved_medians(
                    {k: (lambda m=m: m(x)) for k, m in variants.items()}, repeats=15, min_time=0.02
                )
            rows.append({"model": name, "compression": c, "batch": batch, "seconds": seconds})
            print(
                f"{name} c={c} batch {batch}: "
                + ", ".join(f"{k} {seconds['dense'] / seconds[k]:.2f}x" for k in LAYOUTS),
                flush=True,
            )
    command = "python benchmarks/small_batch_layout.py " + " ".join(sys.argv[1:])
    result = {"command": command.strip(), "machine": describe_machine("cpu"), "threads": args.threads, "rows": rows}
    lines = [
        "# PyTorch engine: activation layout at small batches",
        "",
        f"Made by `{result['command']}` ({args.threads} threads, {result['machine'].get('cpu', '?')}, "
        f"torch {result['machine'].get('torch', '?')}). Speed-up over the dense model (medians, round-robin in one "
        f"process) with activations batch-major or feature-major between the packed layers; the engine runs "
        f"batch-major below {torch_engine.BATCH_MAJOR_BELOW} rows.",
        "",
        "| model | c | batch | batch-major × | feature-major × | batch-major / feature-major |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["seconds"]
        lines.append(
            f"| {r['model']} | {r['compression']} | {r['batch']} | {s['dense'] / s['batch-major']:.2f}× "
            f"| {s['dense'] / s['feature-major']:.2f}× | {s['feature-major'] / s['batch-major']:.2f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "small_batch_layout.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
