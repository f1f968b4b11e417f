"""Host (Python) time per eager packed-layer call on the Triton engine, kernel launches stubbed.

What a GPU hides nothing of at batch 1: the Python between ``module(x)`` and the kernel launch.
The launches are replaced by no-ops and tiles come from a pre-filled table, so only our own host
code is timed, on the CPU; calls are under ``torch.no_grad()``, where the engine replays its
cached launch plan. For scale: a dense ``nn.Linear`` on the CPU (compute included) and the floor
of any layer call (torch's module call plus one output allocation). Writes results/host_overhead/host_overhead.json.

    TRITON_INTERPRET=1 python benchmarks/host_overhead.py
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the engine accept CPU tensors
import torch  # noqa: E402
from torch import nn  # noqa: E402

import mpdcompress as mpd  # noqa: E402
from mpdcompress.kernels import triton_kernels, tuning  # noqa: E402


class _Floor(nn.Module):
    """What any layer call costs in torch before its own code: the module call and one output."""

    def forward(self, x):
        return x.new_empty((x.shape[0], 512))


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, x, calls=20000) -> float:
    with torch.no_grad():
        for _ in range(200):
            fn(x)
        best = float("inf")
        for _ in range(20):  # best of many short runs: this shared 2-core machine is noisy
            start = time.perf_counter()
            for _ in range(calls // 20):
                fn(x)
            best = min(best, (time.perf_counter() - start) / (calls // 20))
    return best * 1e6


def main(out: Path) -> dict:
    torch.set_num_threads(1)
    triton_kernels._block_linear = _NoLaunch()
    triton_kernels._block_weight_grad = _NoLaunch()
    triton_kernels._split_k_sum = _NoLaunch()
    tuning.interpreting = lambda: False  # look tiles up as on a GPU
    tuning.measure = lambda options, run: {options[0]: 1.0}
    os.environ["MPDCOMPRESS_TILE_CACHE"] = str(out / "tiles.json")
    torch.manual_seed(0)
    layer = mpd.pack(mpd.mpdify_(nn.Linear(512, 512), 8))
    chain = mpd.pack(mpd.mpdify_(nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)), 8))
    dense = nn.Linear(512, 512)
    x = torch.randn(1, 512)
    with mpd.use_engine("triton"):
        result = {
            "what": "host microseconds per eager call at batch 1, Triton engine, launches stubbed (best of 20 runs)",
            "command": "python benchmarks/host_overhead.py",
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "packed_layer_us": per_call_us(layer, x),
            "packed_chain_of_2_us": per_call_us(chain, x),
            "dense_linear_cpu_us_for_scale": per_call_us(dense, x),
            "floor_module_call_and_one_allocation_us": per_call_us(_Floor(), x),
        }
    (out / "tiles.json").unlink(missing_ok=True)
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/host_overhead")
    out.mkdir(parents=True, exist_ok=True)
    result = main(out)
    (out / "host_overhead.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
