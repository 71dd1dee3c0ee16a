"""Stateless pieces the modules share: activations by their Hugging Face names, and RoPE."""

from __future__ import annotations

from typing import Callable, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from recursive_kernels.backends import accumulation_dtype

_ACTIVATIONS: Mapping[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation called ``name`` in Hugging Face configs: "silu", "gelu" or "gelu_pytorch_tanh"."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act: expected one of {tuple(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


def rotary_embedding(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """RoPE tables for ``position_ids`` (B, S): ``(cos, sin)``, each (B, S, head_dim) in ``dtype``.

    Hugging Face Llama's convention: frequencies ``theta ** (-2i / head_dim)``, the table repeated over
    both halves of the head (rotate-half), computed in float32 (float64 for float64).
    """
    compute = accumulation_dtype(dtype)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).to(compute) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs = position_ids.to(compute)[..., None] * inv_freq
    table = torch.cat((freqs, freqs), dim=-1)
    return table.cos().to(dtype), table.sin().to(dtype)


def rotary_rows(table: Tuple[Tensor, Tensor], positions: Tensor) -> Tuple[Tensor, Tensor]:
    """Rows of a RoPE ``table`` (:func:`rotary_embedding` of positions ``0 .. T - 1``, each (1, T, head_dim)) at
    ``positions`` (B,): ``(cos, sin)``, each (B, 1, head_dim), the values :func:`rotary_embedding` gives for
    ``positions[:, None]``. Decoding builds the table once instead of a dozen ops per step."""
    return tuple(t[0, positions, None] for t in table)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, S, heads, D) rotated by cos, sin (B, S, D) (rotate-half convention)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
