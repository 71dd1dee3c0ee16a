"""Argument checks shared by decoding and the engine; each error names the argument."""

from __future__ import annotations

from typing import Optional

from ..checks import check_int


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not 0.0 < temperature < float("inf")):
        raise ValueError(f"temperature: expected a positive finite number, got {temperature!r}")
    if top_k is not None:
        check_int("top_k", top_k, 1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
