"""Facts about a compressed model or model file: layers, factors, parameter counts, sizes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


from .io import read_manifest
from .layout import BlockLayout
from .models import PAPER_SETUPS, build_model, fc_weight_count, fc_weights_kept, paper_filter

__all__ = ["file_summary", "paper_model_summary", "PAPER_FC_WEIGHTS"]

# Table 1 of the paper: FC parameters dense → MPD.
PAPER_FC_WEIGHTS: dict[str, tuple[int, int]] = {
    "lenet300": (272_000, 27_200),
    "deep-mnist": (3_220_000, 322_000),
    "tf-cifar10": (958_400, 95_840),
    "alexnet-bn": (87_980_000, 11_000_000),
}


def _layer_rows(layers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, layer in layers.items():
        layout = BlockLayout.create(layer["d_out"], layer["d_in"], layer["compression"], name)
        rows.append({"name": name, "source": layer.get("source", name), "shape": (layout.d_out, layout.d_in),
                     "compression": layout.compression, "dense_weights": layout.d_out * layout.d_in,
                     "kept_weights": layout.nnz, "stored_weights": layout.padded_numel})
    return rows


def file_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What a model file holds, and its size next to the dense fp32 weights of the same layers."""
    manifest = read_manifest(path)
    rows = _layer_rows(manifest["layers"])
    dense_bytes = 4 * sum(r["dense_weights"] + r["shape"][0] for r in rows)
    return {"path": str(path), "form": manifest["form"], "writer": manifest.get("writer"),
            "has_architecture": manifest.get("architecture") is not None, "layers": rows,
            "file_bytes": Path(path).stat().st_size, "dense_compressed_layers_bytes": dense_bytes}


def paper_model_summary(name: str, compression: int | None = None) -> dict[str, Any]:
    """FC weight counts of a paper model, dense and compressed as in the paper, next to Table 1."""
    from .convert import mpdify

    model = build_model(name)
    c = compression or int(PAPER_SETUPS[name]["compression"])
    dense = fc_weight_count(model)
    kept = fc_weights_kept(mpdify(model, c, filter=paper_filter(model, name)))
    paper_dense, paper_mpd = PAPER_FC_WEIGHTS[name]
    return {"model": name, "compression": c, "fc_weights_dense": dense, "fc_weights_mpd": kept,
            "paper_fc_weights_dense": paper_dense, "paper_fc_weights_mpd": paper_mpd}
