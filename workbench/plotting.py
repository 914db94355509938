"""Figures: matplotlib on the Agg backend, PNGs written atomically, figures always closed.

Every plot in the workbench goes through here, so none of them needs a display, a
half-written PNG is never left behind, and no figure leaks when saving fails.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from workbench.storage import atomic_write


def pyplot() -> Any:
    """`matplotlib.pyplot` on the non-interactive Agg backend (headless machines, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 100) -> Path:
    """Write `fig` as a PNG at `path` atomically and close it (also when writing fails)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def png_bytes(fig: Any) -> bytes:
    """A `matplotlib.figure.Figure` made without pyplot (nothing to close) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
