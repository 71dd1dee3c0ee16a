"""A dependency-free one-line progress bar on stderr, used by the command line, conversion, training,
generation and the benchmarks."""

from __future__ import annotations

import sys
import time
from typing import Optional


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``42`` -> ``42s``."""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """``[done/total] label  elapsed, time left, rate`` redrawn in place on stderr; a newline when ``total`` is
    reached or on ``close()``.

    Steps may be weighted (``step(count=w)``, with ``total`` the sum of the weights, for example each step's
    expected seconds): the bar then shows the percentage done, and the time left is the elapsed time scaled by
    the weight still to come.

    Args:
        total: number of steps (or total weight) expected.
        enabled: False makes every method a no-op (``--no-progress``, tests, non-interactive runs).
        unit: what a step is ("step", "layer", "tok", ...): the bar counts steps and shows their rate. None:
            weighted steps, shown as a percentage.
    """

    def __init__(self, total: float, enabled: bool = True, unit: Optional[str] = None) -> None:
        self.total, self.done, self.unit = total, 0.0, unit
        self.enabled = enabled and total > 0
        self._start = time.perf_counter()
        self._line = ""
        self._closed = False

    def step(self, label: str = "", count: float = 1) -> None:
        """Advance by ``count`` (steps, or weight) and redraw with ``label`` (for example the current loss)."""
        self.done += count
        if not self.enabled or self._closed:
            return
        elapsed = time.perf_counter() - self._start
        done = min(self.done, self.total)
        where = f"{int(done)}/{int(self.total)}" if self.unit else f"{100 * done / self.total:3.0f}%"
        timing = f"{format_duration(elapsed)} elapsed"
        if 0 < done < self.total:
            timing += f", about {format_duration(elapsed * (self.total - done) / done)} left"
        if self.unit and elapsed > 0:
            timing += f", {done / elapsed:.1f} {self.unit}/s"
        line = f"[{where}] {label[:56]:<56} {timing}"
        sys.stderr.write("\r" + line.ljust(len(self._line)))  # spaces over a longer previous line
        self._line = line
        sys.stderr.flush()
        if self.done >= self.total:
            self.close()

    def write(self, text: str) -> None:
        """Print ``text`` on stdout above the bar (which is redrawn after it)."""
        if self.enabled and not self._closed and self._line:
            sys.stderr.write("\r" + " " * len(self._line) + "\r")
            sys.stderr.flush()
        print(text, flush=True)
        if self.enabled and not self._closed and self._line:
            sys.stderr.write(self._line)
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and not self._closed:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Optional[object]) -> None:
        self.close()
