"""PNG figures for reports (matplotlib's Agg backend, so no display is needed; imported only when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def decorate(
    ax: Any, xlabel: str, ylabel: str | None = None, title: str | None = None, legend: int | None = None
) -> None:
    """Axis labels, a light grid and (`legend`: its font size, 0 for the default) the legend."""
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend is not None:
        ax.legend(fontsize=legend or None)


def save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path
