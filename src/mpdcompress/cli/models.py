"""How the command line gets a model from a file: rebuilt from the architecture the file
records, or built by the user's own class (``--model-class``) when the file was saved from a
custom model; and the example inputs an export traces."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import math
from pathlib import Path

from ..errors import ConfigError, first_line

# Values of the random example the export traces with: 2**28 floats are 1 GiB.
_MAX_EXAMPLE_VALUES = 2**28

__all__ = [
    "add_model_class_arguments",
    "add_mask_storage_argument",
    "load_model_file",
    "example_inputs",
    "parse_dynamic_dims",
]


def add_model_class_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model-class`` and ``--model-kwargs`` (files saved from the user's own modules)."""
    parser.add_argument(
        "--model-class",
        metavar="MODULE:CLASS",
        help="builds the architecture of a file saved from a custom model: an importable module "
        "(my_package.models:MyNet) or a Python file (path/to/models.py:MyNet); its code is run",
    )
    parser.add_argument(
        "--model-kwargs", default="{}", metavar="JSON", help="keyword arguments for --model-class, as a JSON object"
    )


def add_mask_storage_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--mask-storage`` (how the written file stores its random masks)."""
    parser.add_argument(
        "--mask-storage",
        choices=("orders", "seed"),  # files.seeded_masks.MASK_STORAGE; the parser does not import torch
        default="orders",
        help="seed: leave out the row and column orders of random masks and draw them again from the recorded "
        "seed on load (smallest files; loads where torch draws the same permutations, checked by digest)",
    )


def _user_class(spec: str):
    module_name, sep, class_name = spec.rpartition(":")
    if not sep or not module_name or not class_name.isidentifier():
        raise ConfigError(f"--model-class must be MODULE:CLASS or path/to/file.py:CLASS, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"--model-class: no file {path}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--model-class: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the user's module failed while it ran (SyntaxError, its own errors)
        raise ConfigError(f"--model-class: your module {module_name!r} failed: {first_line(exc)}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"--model-class: {module_name!r} has no {class_name!r}")
    if not isinstance(cls, type):
        raise ConfigError(f"--model-class: {spec!r} is a {type(cls).__name__}, not a class")
    return cls


def load_model_file(path: str, args: argparse.Namespace):
    """The model in ``path``; built from ``--model-class`` when one is given."""
    from torch import nn

    from ..files.io import load

    if not args.model_class:
        return load(path)
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-kwargs is not JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError("--model-kwargs must be a JSON object")
    cls = _user_class(args.model_class)
    try:
        template = cls(**kwargs)
    except Exception as exc:  # the keywords do not fit, or the user's constructor raised
        raise ConfigError(f"--model-class: your {cls.__name__}(**{kwargs}) failed: {first_line(exc)}") from None
    if not isinstance(template, nn.Module):
        raise ConfigError(f"--model-class built a {type(template).__name__}, not a torch.nn.Module")
    return load(path, model=template)


def parse_dynamic_dims(items: list[str]) -> dict[int, str]:
    """Parse ``--dynamic-dims 0=batch 1=sequence`` into ``{0: 'batch', 1: 'sequence'}``."""
    dims = {}
    for item in items:
        axis, sep, name = item.partition("=")
        if not sep or not axis.isdigit() or not name.isidentifier():
            raise ConfigError(f"--dynamic-dims takes AXIS=NAME items (0=batch 1=sequence), got {item!r}")
        if int(axis) in dims:
            raise ConfigError(f"--dynamic-dims names axis {axis} twice ({dims[int(axis)]} and {name})")
        if name in dims.values():
            raise ConfigError(f"--dynamic-dims gives the name {name!r} to two axes; each dynamic axis needs its own")
        dims[int(axis)] = name
    return dims


def example_inputs(model, args: argparse.Namespace, shape: tuple[int, ...] | None):
    """The user's example tensors (a safetensors file, passed to forward by name), or a random
    input of ``shape`` with a batch of 2: floats, or token ids below the first embedding's size."""
    import torch
    from torch import nn

    if args.example_inputs:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(args.example_inputs)
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"--example-inputs: cannot read {args.example_inputs}: {exc}") from None
        # The file keeps its names sorted; the graph's inputs follow forward's parameters.
        order = list(inspect.signature(model.forward).parameters)
        return dict(sorted(tensors.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    if shape is None:
        raise ConfigError("the file does not record its input shape; pass --input-shape (or --example-inputs)")
    if 2 * math.prod(shape) > _MAX_EXAMPLE_VALUES:
        raise ConfigError(
            f"an example input of shape (2, {', '.join(map(str, shape))}) would hold {2 * math.prod(shape):,} values; "
            f"the export traces with at most {_MAX_EXAMPLE_VALUES:,} (check --input-shape)"
        )
    if args.input_dtype == "int64":
        embeddings = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
        return torch.randint(0, min(embeddings or [2]), (2, *shape))
    return torch.randn(2, *shape)
