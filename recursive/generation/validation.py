"""Argument checks shared by decoding and the engine; each error names the argument."""

from __future__ import annotations

from typing import Optional

from ..checks import check_int
from ..config import RecursiveConfig


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not 0.0 < temperature < float("inf")):
        raise ValueError(f"temperature: expected a positive finite number, got {temperature!r}")
    if top_k is not None:
        check_int("top_k", top_k, 1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")


def check_exit_threshold(exit_threshold: Optional[float], config: RecursiveConfig) -> Optional[float]:
    """The threshold to apply, or None when early exit is off (None or 1.0)."""
    if exit_threshold is None:
        return None
    if (isinstance(exit_threshold, bool) or not isinstance(exit_threshold, (int, float))
            or not 0.0 < exit_threshold <= 1.0):
        raise ValueError(f"exit_threshold: expected None or a probability in (0, 1], got {exit_threshold!r}")
    if exit_threshold == 1.0:
        return None
    config.check_loop_boundaries("exit_threshold")
    return float(exit_threshold)

