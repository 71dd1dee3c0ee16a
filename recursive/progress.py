"""A dependency-free one-line progress bar on stderr, used by the command line, conversion, training,
generation and the benchmarks."""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """``[done/total] label  elapsed, rate`` redrawn in place on stderr; a newline when ``total`` is
    reached or on ``close()``.

    Args:
        total: number of steps expected.
        enabled: False makes every method a no-op (``--no-progress``, tests, non-interactive runs).
        unit: what a step is, for the rate ("it", "layer", "tok", ...).
    """

    def __init__(self, total: int, enabled: bool = True, unit: str = "it") -> None:
        self.total, self.done, self.unit = total, 0, unit
        self.enabled = enabled and total > 0
        self._start = time.perf_counter()
        self._closed = False

    def step(self, label: str = "", count: int = 1) -> None:
        """Advance by ``count`` steps and redraw with ``label`` (for example the current loss)."""
        self.done += count
        if not self.enabled or self._closed:
            return
        elapsed = time.perf_counter() - self._start
        rate = f"{self.done / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        sys.stderr.write(f"\r[{self.done}/{self.total}] {label[:60]:<60} {elapsed:6.1f}s {rate}")
        sys.stderr.flush()
        if self.done >= self.total:
            self.close()

    def close(self) -> None:
        if self.enabled and not self._closed:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Optional[object]) -> None:
        self.close()
