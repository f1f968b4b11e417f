"""Every error mpdcompress raises on purpose derives from :class:`MPDCompressError`.

Each class also keeps the built-in parent it had before this hierarchy existed (``ValueError``,
``TypeError``, ``KeyError``, ``FileNotFoundError``, ``RuntimeError``), so ``except ValueError``
code written against earlier releases still catches what it caught. The command line catches
:class:`MPDCompressError` alone: anything else is a bug and shows its traceback.
"""

from __future__ import annotations

__all__ = [
    "MPDCompressError",
    "CompressionError",
    "CompressionTypeError",
    "ConfigError",
    "UnknownNameError",
    "ModelFileError",
    "ModelFileNotFoundError",
    "UnsupportedArchitectureError",
    "EngineUnavailableError",
    "ExportError",
    "DataUnavailableError",
    "DataCorruptError",
    "CheckpointError",
    "TrainingDiverged",
    "MaskMismatchError",
    "DistributedFailure",
    "NonFiniteWeightsWarning",
    "MissingDependencyError",
    "first_line",
]


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"``, for one-line reports of someone else's error."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__


class MPDCompressError(Exception):
    """Base of every error mpdcompress raises on purpose."""


class CompressionError(MPDCompressError, ValueError):
    """A compression request that cannot be met: factor out of range, shapes that disagree,
    a mask that is not a permuted block-diagonal one, nothing selected to compress."""


class CompressionTypeError(MPDCompressError, TypeError):
    """A compression argument of the wrong type (a float factor, a non-module)."""


class ConfigError(MPDCompressError, ValueError):
    """An option or configuration value that makes no sense (an unknown mode, a zero batch)."""


class UnknownNameError(ConfigError, KeyError):
    """A name (model, dataset, recipe, layer shape, engine...) that no registry holds."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelFileError(MPDCompressError, ValueError):
    """A model file that is damaged, inconsistent or not an mpdcompress file."""


class ModelFileNotFoundError(ModelFileError, FileNotFoundError):
    """No model file at the path given."""


class MissingDependencyError(MPDCompressError, ImportError):
    """An optional dependency (an extra of the package) that the call needs is not installed."""


class UnsupportedArchitectureError(MPDCompressError, TypeError):
    """A module that cannot be described in (or rebuilt from) a model file by itself."""


class EngineUnavailableError(MPDCompressError, RuntimeError):
    """The engine that was asked for cannot run this call (not installed, wrong device or dtype)."""


class ExportError(MPDCompressError, RuntimeError):
    """The exporter could not turn the model into ONNX."""


class DataUnavailableError(MPDCompressError, FileNotFoundError):
    """A dataset that is not on this machine (the message says how to get it)."""


class DataCorruptError(MPDCompressError, ValueError):
    """A dataset file that is truncated, corrupt or not in the expected format."""


class CheckpointError(MPDCompressError, ValueError):
    """A training checkpoint that cannot resume this run."""


class TrainingDiverged(MPDCompressError, RuntimeError):
    """The training loss stopped being a finite number (a learning rate far too high, say)."""


class MaskMismatchError(MPDCompressError, RuntimeError):
    """Processes of one distributed run built different masks."""


class DistributedFailure(MPDCompressError, RuntimeError):
    """Another process of a distributed run died or lost its connection."""


class NonFiniteWeightsWarning(UserWarning):
    """A loaded model holds NaN or Inf weights (only with ``on_nonfinite="warn"``)."""
