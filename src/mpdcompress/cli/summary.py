"""Facts about a compressed model or model file: layers, factors, parameter counts, sizes."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..core.layout import BlockLayout
from ..core.quantize import QuantConfig
from ..files.io import read_manifest
from ..models import build_model, fc_weight_count, fc_weights_kept, model_spec, paper_filter
from ..nn import MaskedWeight

__all__ = ["file_summary", "model_summary"]


def _layer_rows(layers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, layer in layers.items():
        layout = BlockLayout.create(layer["d_out"], layer["d_in"], layer["compression"], name)
        kernel = layer.get("kernel_size") or []  # a convolution's weights: per channel pair
        positions = math.prod(kernel)
        rows.append(
            {
                "name": name,
                "source": layer.get("source", name),
                "shape": (layout.d_out, layout.d_in, *kernel),
                "compression": layout.compression,
                "dense_weights": layout.d_out * layout.d_in * positions,
                "kept_weights": layout.nnz * positions,
                "stored_weights": layout.padded_numel * positions,
                "format": QuantConfig(**layer["quantization"]).describe() if "quantization" in layer else "float",
            }
        )
    return rows


def file_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What a model file holds, and its size next to the dense fp32 weights of the same layers."""
    manifest = read_manifest(path)
    rows = _layer_rows(manifest["layers"])
    dense_bytes = 4 * sum(r["dense_weights"] + r["shape"][0] for r in rows)
    return {
        "path": str(path),
        "form": manifest["form"],
        "writer": manifest.get("writer"),
        "has_architecture": manifest.get("architecture") is not None,
        "layers": rows,
        "quantized_dense_layers": _quantized_dense_rows(manifest.get("quantized_linears", {})),
        "seeded_layers": sorted(manifest.get("seeded_orders", {})),
        "mask_seed": (manifest.get("config") or {}).get("seed"),
        "file_bytes": Path(path).stat().st_size,
        "dense_compressed_layers_bytes": dense_bytes,
    }


def _quantized_dense_rows(layers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The dense layers the file stores quantized (``quantize_(..., dense_layers=True)``)."""
    return [
        {
            "name": name,
            "shape": (a["out_features"], a["in_features"]),
            "format": QuantConfig(a["bits"], a["group_size"], a["symmetric"], a["activations"]).describe(),
        }
        for name, a in layers.items()
    ]


def _conv_weights(model: nn.Module) -> tuple[int, int]:
    """(dense, kept) weights of the model's convolutions, masked ones counting what they keep."""
    dense = kept = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            dense += m.weight.numel()
            kept += int(m.mask.expand_as(m.weight).sum()) if isinstance(m, MaskedWeight) else m.weight.numel()
    return dense, kept


def model_summary(name: str, compression: int | None = None) -> dict[str, Any]:
    """Weight counts of a registered model's FC layers, dense and compressed as the registry says
    (the paper's way for paper models), next to the paper's Table 1 where it has the model; and
    of its convolutions, dense and compressed with ``convs=True``."""
    from ..core.convert import mpdify_

    spec = model_spec(name)
    model = build_model(name)
    c = compression or spec.compression
    dense = fc_weight_count(model)
    selected = paper_filter(model, name)
    fc = any(type(m) is nn.Linear and selected(m, n) for n, m in model.named_modules())
    kept = fc_weights_kept(mpdify_(model, c, filter_fn=selected)) if fc else dense
    convs = None
    if not spec.fc_only:
        whole = build_model(name)
        convs = _conv_weights(mpdify_(whole, c, filter_fn=paper_filter(whole, name), convs=True))
    paper = spec.paper
    return {
        "model": name,
        "description": spec.description,
        "compression": c,
        "fc_weights_dense": dense,
        "fc_weights_mpd": kept,
        "paper_fc_weights_dense": paper.fc_weights[0] if paper else None,
        "paper_fc_weights_mpd": paper.fc_weights[1] if paper else None,
        "conv_weights_dense": None if convs is None else convs[0],
        "conv_weights_mpd": None if convs is None else convs[1],
    }
