"""One PNG figure for a benchmark report, drawn headless (no display on CI or servers)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def png(path: str | Path, ncols: int = 1, figsize: tuple[float, float] = (6, 3.5), title: str | None = None,
        dpi: int = 120) -> Iterator:
    """The axes of a 1 x `ncols` figure (one Axes when ncols is 1); on leaving the block the
    figure gets `title`, is laid out and written to `path`, and is closed either way."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield axes
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
