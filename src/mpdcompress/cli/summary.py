"""Facts about a compressed model or model file: layers, factors, parameter counts, sizes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.layout import BlockLayout
from ..files.io import read_manifest
from ..models import build_model, fc_weight_count, fc_weights_kept, model_spec, paper_filter

__all__ = ["file_summary", "model_summary"]


def _layer_rows(layers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, layer in layers.items():
        layout = BlockLayout.create(layer["d_out"], layer["d_in"], layer["compression"], name)
        rows.append(
            {
                "name": name,
                "source": layer.get("source", name),
                "shape": (layout.d_out, layout.d_in),
                "compression": layout.compression,
                "dense_weights": layout.d_out * layout.d_in,
                "kept_weights": layout.nnz,
                "stored_weights": layout.padded_numel,
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
        "file_bytes": Path(path).stat().st_size,
        "dense_compressed_layers_bytes": dense_bytes,
    }


def model_summary(name: str, compression: int | None = None) -> dict[str, Any]:
    """FC weight counts of a registered model, dense and compressed as the registry says (the
    paper's way for paper models), next to the paper's Table 1 where it has the model."""
    from ..core.convert import mpdify_

    spec = model_spec(name)
    model = build_model(name)
    c = compression or spec.compression
    dense = fc_weight_count(model)
    kept = fc_weights_kept(mpdify_(model, c, filter_fn=paper_filter(model, name)))
    paper = spec.paper
    return {
        "model": name,
        "description": spec.description,
        "compression": c,
        "fc_weights_dense": dense,
        "fc_weights_mpd": kept,
        "paper_fc_weights_dense": paper.fc_weights[0] if paper else None,
        "paper_fc_weights_mpd": paper.fc_weights[1] if paper else None,
    }
