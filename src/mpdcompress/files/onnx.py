"""ONNX export of packed models (Gather + batched MatMul + Add, opset >= 17), quantized layers
dequantized in the graph or as ONNX Runtime's MatMulNBits."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import ConfigError, ExportError
from .export_inputs import DynamicDims, Inputs, check_runs_on, dynamic_shapes, quiet_export, split_inputs

__all__ = ["export_onnx", "ExportError", "MIN_OPSET", "max_opset", "QUANTIZED_OPS"]

MIN_OPSET = 17  # LayerNormalization and the batched MatMul patterns the packed graph uses
QUANTIZED_OPS = ("dequantize", "matmulnbits")


def max_opset() -> int:
    """The newest opset the installed ``onnx`` package knows (torch exports up to it or refuses)."""
    try:
        import onnx
    except ImportError:
        return MIN_OPSET + 1
    return int(onnx.defs.onnx_opset_version())


def export_onnx(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    dynamic_dims: DynamicDims | tuple[DynamicDims, ...] | dict[str, DynamicDims] | None = None,
    quantized_ops: str = "dequantize",
    int8_activations: bool = False,
) -> Path:
    """Export ``model`` (packed or not) to ONNX; returns the path.

    A ``transformers`` model is exported without its key-value cache (``use_cache`` is off for
    the export and restored after).

    ``example_inputs``: one tensor, a tuple of positional tensors, or a dict of keyword tensors
    (``{"input_ids": ..., "attention_mask": ...}``), with the dtypes the model takes (token ids
    for a model that starts with an embedding). ``dynamic_dims`` names the dimensions that may
    change at run time, per input (``{0: "batch", 1: "sequence"}``; a tuple or dict of those for
    several inputs); a name used by several inputs is one dimension. By default (and with
    ``dynamic_batch``) dimension 0 of every input is the dynamic ``batch``.

    The packed forward traces to ``Gather`` (permutations), ``MatMul`` on ``(c, ., .)`` tensors
    (the block GEMMs) and ``Add``, which every ONNX runtime executes natively: the export always
    traces the PyTorch engine, whatever engine runs the model in this process.

    Quantized layers (:func:`~mpdcompress.quantize_`): with ``quantized_ops="dequantize"`` their
    integers are stored and dequantized by standard operators (``Cast``, ``Mul``) that every
    runtime runs; ONNX Runtime folds them to float weights when it loads the file.
    ``"matmulnbits"`` exports int4 linear layers as ONNX Runtime's contrib operator
    ``MatMulNBits`` (domain ``com.microsoft``; other runtimes may lack it), which keeps the
    integers and multiplies with them, activations in float (the weight-only output, to float
    rounding); int8 layers keep the dequantizing form there, which ran faster.
    ``int8_activations`` (implies ``"matmulnbits"``) exports every quantized linear layer, int8
    and int4, as ``MatMulNBits`` at accuracy level 4: activations rounded to int8 per row on the
    fly, integer dot products; faster, close to but not exactly the weight-only output.
    Quantized convolutions always dequantize.
    """
    if not MIN_OPSET <= opset <= max_opset():
        raise ConfigError(f"opset must be in {MIN_OPSET}..{max_opset()}, got {opset}")
    if quantized_ops not in QUANTIZED_OPS:
        raise ConfigError(f"quantized_ops must be one of {QUANTIZED_OPS}, got {quantized_ops!r}")
    translations = None
    if quantized_ops == "matmulnbits" or int8_activations:
        from .onnx_matmulnbits import matmulnbits_form_, translation_table

        model = copy.deepcopy(model)  # the export form is set on a copy
        if not matmulnbits_form_(model, int8_activations):
            raise ConfigError(
                "MatMulNBits exports quantized linear layers, int4 ones (int8 too with int8_activations), "
                "and the model has none (quantize_ it first)"
            )
        translations = translation_table()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, kwargs = split_inputs(example_inputs)
    names = [*(["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]), *kwargs]
    options = {"input_names": names}
    dims = dynamic_shapes(args, kwargs, dynamic_dims, dynamic_batch)
    if dims is not None:
        options["dynamic_shapes"] = dims
    try:
        with quiet_export(model):  # eval mode first: a check forward in training mode would move BatchNorm statistics
            check_runs_on(model, args, kwargs)
            program = torch.onnx.export(
                model,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                opset_version=opset,
                external_data=False,
                output_names=["output"],
                verbose=False,
                custom_translation_table=translations,
                **options,
            )
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many unrelated types; one precise one for callers
        raise ExportError(f"ONNX export failed: {exc}") from exc
    written = dict(program.model.opset_imports).get("", opset)
    if written != opset:  # torch falls back to another opset without failing
        raise ExportError(f"ONNX export wrote opset {written} where opset {opset} was asked for")
    return atomic_path(path, lambda tmp: program.save(str(tmp)))
