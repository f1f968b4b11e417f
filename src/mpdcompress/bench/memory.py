"""Memory figures: bytes of stored weights and indices, and the peak RSS of running a model."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch import nn

__all__ = ["model_weight_bytes", "peak_rss_bytes"]


def model_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of everything in ``state_dict``: floating tensors as ``weights``, integer ones as ``indices``."""
    weights = indices = 0
    for tensor in model.state_dict().values():
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.dtype.is_floating_point:
            weights += nbytes
        else:
            indices += nbytes
    return {"weights": weights, "indices": indices, "total": weights + indices}


_RSS_SCRIPT = """
import gc, json, torch
from mpdcompress.bench.model import build_stack
torch.set_num_threads({threads})
if {form!r} == "baseline":
    model, shape = torch.nn.Identity(), (1,)
else:
    model, shape = build_stack({name!r}, {form!r})
x = torch.randn({batch}, *shape)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) so building the model does not count
with torch.no_grad():
    model(x)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps(int(status["VmHWM"].split()[0]) * 1024))
"""


def peak_rss_bytes(stack: str, form: str, batch: int, threads: int | None = None) -> int:
    """Peak resident memory while a fresh process runs one batch through ``stack`` in ``form``.

    ``form="baseline"`` runs nothing: the cost of an empty torch process, to subtract.

    The model is built first and the kernel's peak counter is reset before the forward, so the
    figure is what inference needs with the model resident, not what building it took (Linux only).
    """
    code = _RSS_SCRIPT.format(name=stack, form=form, batch=batch, threads=threads or torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"peak RSS probe for {stack}/{form} failed: {proc.stderr.strip()[-500:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1]))
