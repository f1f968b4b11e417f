"""matplotlib, headless: the one place reports and figures get it from (an optional extra)."""

from __future__ import annotations

__all__ = ["pyplot"]


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend; ImportError without ``mpdcompress[plots]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
