"""Model files and exports: ``save``/``load`` (safetensors with a checked manifest), the header
and architecture checks behind them, crash-safe writes, ONNX export and Hugging Face folders."""

from .io import FORMAT_VERSION, ModelFileError, NonFiniteWeightsWarning, load, read_manifest, save
from .onnx import ExportError, export_onnx

__all__ = [
    "save",
    "load",
    "read_manifest",
    "ModelFileError",
    "NonFiniteWeightsWarning",
    "FORMAT_VERSION",
    "export_onnx",
    "ExportError",
]
