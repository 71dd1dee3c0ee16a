"""Argument checks every layer of the package shares; each error is a ValueError that names the argument."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor


def check_int(name: str, value: Any, low: int) -> int:
    """``value``, an int (not a bool) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_token(name: str, token: Optional[int], vocab_size: int) -> None:
    """None or one token id in [0, vocab_size)."""
    if token is not None and (isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size):
        raise ValueError(f"{name}: expected None or a token id in [0, {vocab_size}), got {token!r}")


def check_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    """Integer token ids in [0, vocab_size) (one host read of their range)."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer token ids, got dtype {ids.dtype}")
    if ids.numel():
        check_id_range(name, *torch.stack(torch.aminmax(ids)).tolist(), vocab_size)


def check_id_range(name: str, low: int, high: int, vocab_size: int) -> None:
    """Token ids whose range, read on the host, is ``low..high`` lie in [0, vocab_size)."""
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name}: token ids must lie in [0, vocab_size={vocab_size}), got {low}..{high}")
