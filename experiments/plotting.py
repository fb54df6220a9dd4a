"""The experiments' plots share one look: a 6.4 x 4.0 inch figure at 110 dpi, a light
grid, a small legend, written as a PNG with the Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def new_axes() -> tuple[Any, Any]:
    """A (figure, axes) pair on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0), dpi=110)


def save(fig: Any, ax: Any, path: Path, title: str) -> None:
    """Title, grid and legend on ``ax``; ``fig`` written to ``path`` (atomically) and closed."""
    from adfed.rundir import save_figure

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
