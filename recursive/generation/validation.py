"""Argument checks shared by decoding and the engine; each error names the argument."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..config import RecursiveConfig


def check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not 0.0 < temperature < float("inf")):
        raise ValueError(f"temperature: expected a positive finite number, got {temperature!r}")
    if top_k is not None:
        check_int("top_k", top_k, 1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")


def check_token(name: str, token: Optional[int], vocab_size: int) -> None:
    if token is not None and (isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size):
        raise ValueError(f"{name}: expected None or a token id in [0, {vocab_size}), got {token!r}")


def check_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name}: token ids must lie in [0, vocab_size={vocab_size}), "
                         f"got {int(ids.min())}..{int(ids.max())}")


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
