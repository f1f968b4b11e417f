"""Measure how exactly packed models reproduce masked ones: max |packed - masked| / max |masked|.

Random layer shapes (uneven blocks included), factors, batches and seeds, plus the paper's
models; fp32 and fp64. Writes results/exactness.json. Usage: python benchmarks/exactness.py [N]
"""

import json
import random
import sys
from pathlib import Path

import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.models import build_model, model_spec


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main(n: int = 500) -> dict:
    rng = random.Random(0)
    worst = {"float32": 0.0, "float64": 0.0}
    for i in range(n):
        dims = [rng.randint(1, 300) for _ in range(rng.randint(2, 4))]
        mods = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        torch.manual_seed(i)
        model = nn.Sequential(*mods[:-1])
        factors = {str(2 * k): rng.randint(1, min(a, b)) for k, (a, b) in enumerate(zip(dims[:-1], dims[1:]))}
        mpd.mpdify_(model, factors, seed=i)
        for dtype in (torch.float32, torch.float64):
            m = model.to(dtype).eval()
            x = torch.randn(rng.randint(1, 64), dims[0], dtype=dtype)
            with torch.no_grad():
                worst[str(dtype).split(".")[1]] = max(worst[str(dtype).split(".")[1]], rel_error(mpd.pack(m)(x), m(x)))
    paper = {}
    for name in ("lenet300", "deep-mnist", "tf-cifar10", "alexnet-bn"):
        torch.manual_seed(0)
        model = mpd.mpdify_(build_model(name), 8).eval()
        x = torch.randn(4, *model_spec(name).input_shape)
        with torch.no_grad():
            paper[name] = rel_error(mpd.pack(model)(x), model(x))
    result = {
        "random_chains": n,
        "max_rel_error": worst,
        "paper_models_fp32_c8": paper,
        "command": f"python benchmarks/exactness.py {n}",
    }
    out = Path("results/exactness.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 500), indent=1))
