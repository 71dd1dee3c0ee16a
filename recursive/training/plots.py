"""Loss curves of a run's metrics file as a PNG (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import textwrap
from typing import Iterator, List, Tuple


def require_matplotlib(argument: str) -> None:
    """Raise, naming ``argument``, when matplotlib is missing (checked before a run, not after it)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"{argument}: plotting needs matplotlib (pip install 'recursive-kernels[plot]' or matplotlib)")


def read_metrics(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def figure(path: str, size: Tuple[float, float] = (6.4, 4.0), columns: int = 1) -> Iterator[object]:
    """One set of axes to draw on (a tuple of ``columns`` side by side when more than one), saved as a PNG at
    ``path`` (with a light grid) when the block ends."""
    require_matplotlib("plot")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    drawing, axes = plt.subplots(1, columns, figsize=size, dpi=120)
    try:
        yield axes if columns == 1 else tuple(axes)
        for each in axes.flat if columns > 1 else (axes,):
            each.grid(alpha=0.3)
        drawing.tight_layout()
        drawing.savefig(path)
    finally:
        plt.close(drawing)


def plot_metrics(metrics_path: str, png_path: str, title: str = "") -> None:
    """Training loss (each step) and held-out loss (where evaluated) against tokens seen, into ``png_path``."""
    rows = read_metrics(metrics_path)
    with figure(png_path) as axes:
        axes.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], lw=1, alpha=0.8, label="training loss")
        evaluated = [r for r in rows if "eval_loss" in r]
        if evaluated:
            axes.plot([r["tokens"] for r in evaluated], [r["eval_loss"] for r in evaluated], "o-",
                      label="held-out loss")
        axes.set_xlabel("tokens seen")
        axes.set_ylabel("next-token loss (nats)")
        axes.set_title(textwrap.fill(title or metrics_path, 90), fontsize=8)
        axes.legend()
