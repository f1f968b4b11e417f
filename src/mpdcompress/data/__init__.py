"""Datasets from local files in their standard release formats (never downloaded): MNIST,
Fashion-MNIST, CIFAR-10, ImageNet folders, and real English text; ``datasets`` is the registry."""

from .sources import *  # noqa: F403
from .sources import __all__ as _sources

__all__ = list(_sources)
