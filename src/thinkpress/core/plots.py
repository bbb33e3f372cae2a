"""One place for figure set-up and saving (headless Agg backend, a grid on every panel, 120 dpi)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def figure(path: str | Path, ncols: int, *, panel: tuple[float, float] = (5, 4.2)) -> Iterator[list[Any]]:
    """Yield a row of ``ncols`` matplotlib axes (``panel`` inches each); on a clean exit save them to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(panel[0] * ncols, panel[1]), squeeze=False)
    try:
        yield list(axes[0])
        for ax in axes[0]:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
