"""Hugging Face ``transformers`` models in and out of a folder, compressed.

``model.save_pretrained`` cannot describe packed layers (``from_pretrained`` would report them
as missing keys and initialize them at random) nor GPT-2's masked Conv1D layers (stored
transposed), so ``pack`` and ``mpdify_`` make it refuse on those models. :func:`save_compressed`
writes the model's ``config.json`` beside an mpdcompress model file (validated, no pickle);
:func:`load_compressed` builds the architecture from that config and loads the file into it.
Masked models of plain linear layers also survive ``save_pretrained`` (their stored weights are
zero off the mask, so the dense model that ``from_pretrained`` rebuilds computes the same
function, without the masks).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from torch import nn

from ..errors import CompressionTypeError, MissingDependencyError, ModelFileNotFoundError
from .io import load, save

__all__ = ["MODEL_FILE", "save_compressed", "load_compressed", "hf_module"]

MODEL_FILE = "mpdcompress.safetensors"


def hf_module(name: str) -> ModuleType:
    """``transformers`` or ``tokenizers``, imported when first needed; a missing one is a
    :class:`MissingDependencyError` that names the extra installing it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingDependencyError(f"this needs {name}: pip install 'mpdcompress[hf]'") from None


def save_compressed(model: nn.Module, folder: str | os.PathLike, *, config=None) -> Path:
    """Write ``config.json`` (``model.config`` or ``config``) and the compressed model file into
    ``folder``; returns the folder."""
    folder = Path(folder)
    config = config if config is not None else getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise CompressionTypeError("save_compressed needs a transformers model (with .config) or config=")
    folder.mkdir(parents=True, exist_ok=True)
    save(model, folder / MODEL_FILE)  # first: a model that cannot be saved leaves no half folder
    config.save_pretrained(str(folder))
    return folder


def load_compressed(folder: str | os.PathLike, model_class=None, **load_options) -> nn.Module:
    """The compressed model saved by :func:`save_compressed`, in eval mode. ``model_class``
    (default ``transformers.AutoModel``) builds the architecture from the saved config."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        raise ModelFileNotFoundError(
            f"{folder} holds no {MODEL_FILE}: not saved by mpdcompress.files.hf.save_compressed"
        )
    transformers = hf_module("transformers")
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model_class = model_class or transformers.AutoModel
    template = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    return load(folder / MODEL_FILE, model=template, **load_options).eval()
