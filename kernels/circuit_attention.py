"""``circuit_attention``: attention whose logits and value contraction carry merged low-rank corrections.

    S = scale * q @ k^T + q_c @ k_c^T,   P = softmax(S),   out = P @ v,   out_c = P @ v_c

Depth-as-modulation models keep a shared attention block frozen and add, per depth and head, rank-R
factors at the logit site (q_c = X U_h, k_c = X V_h) and rank-Rv factors at the OV site (v_c = X C_h,
then out_c @ D_h^T outside the op). This file validates the inputs and dispatches; the reference
(``kernels/reference.py``) is the ``torch`` backend. The fused backends are not written yet: every
input is served by the reference for now (see NOTES.md).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .reference import circuit_attention_ref, circuit_attention_varlen_ref

OP = "circuit_attention"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

backends.register_op(OP, {"torch": lambda device, dtype: []})


def _check_like(name: str, t: Tensor, q: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected a tensor on {q.device} (like q), got {t.device}")
    if t.dtype != q.dtype:
        raise ValueError(f"{name}: expected dtype {q.dtype} (like q), got {t.dtype}")


def _check_dims(name: str, t: Tensor, expected: Tuple, labels: str) -> None:
    """``expected`` holds sizes or None (any); ``labels`` names the dims for the message."""
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        want = ", ".join(f"{label}={e}" if e is not None else label for label, e in zip(labels.split(), expected))
        raise ValueError(f"{name}: expected shape ({want}), got {tuple(t.shape)}")


def _validate(q, k, v, q_c, k_c, v_c, scale, packed: bool):
    """Shared checks of the dense (B, heads, S, d) and packed (total, heads, d) layouts; returns scale."""
    if not isinstance(q, Tensor):
        raise ValueError(f"q: expected a tensor, got {type(q).__name__}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q: expected a floating dtype, got {q.dtype}")
    rank = 3 if packed else 4
    if q.dim() != rank:
        raise ValueError(f"q: expected {rank} dims ({'total_q, H, D' if packed else 'B, H, Sq, D'}), got {tuple(q.shape)}")
    _check_like("k", k, q)
    _check_like("v", v, q)
    D, H = q.shape[-1], q.shape[1]  # the heads are dim 1 in both layouts
    kv_shape = (None, None, D) if packed else (q.shape[0], None, None, D)
    labels = "total_k Hkv D" if packed else "B Hkv Sk D"
    _check_dims("k", k, kv_shape, labels)
    _check_dims("v", v, tuple(k.shape), labels)
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"k: its {Hkv} key/value heads must divide the {H} query heads of q (grouped-query attention)")
    if (q_c is None) != (k_c is None):
        raise ValueError(f"{'k_c' if q_c is not None else 'q_c'}: q_c and k_c are the two factors of the logit correction; give both or neither")
    if q_c is not None:
        _check_like("q_c", q_c, q)
        _check_like("k_c", k_c, q)
        _check_dims("q_c", q_c, (*q.shape[:-1], None), ("total_q H R" if packed else "B H Sq R"))
        _check_dims("k_c", k_c, (*k.shape[:-1], q_c.shape[-1]), ("total_k Hkv R" if packed else "B Hkv Sk R"))
    if v_c is not None:
        _check_like("v_c", v_c, q)
        _check_dims("v_c", v_c, (*k.shape[:-1], None), ("total_k Hkv Rv" if packed else "B Hkv Sk Rv"))
    if scale is None:
        return 1.0 / math.sqrt(D) if D else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale: expected a Python number or None, got {type(scale).__name__}")
    return float(scale)


def circuit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_c: Optional[Tensor] = None,
    k_c: Optional[Tensor] = None,
    v_c: Optional[Tensor] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Attention with merged QK (logit) and OV (value) low-rank corrections.

    Args:
        q: (B, H, Sq, D).
        k, v: (B, Hkv, Sk, D), H a multiple of Hkv (grouped-query attention).
        q_c, k_c: (B, H, Sq, R) and (B, Hkv, Sk, R), both or neither: ``S += q_c @ k_c^T`` (unscaled).
        v_c: (B, Hkv, Sk, Rv) or None: ``out_c = P @ v_c``.
        causal: mask aligned bottom-right (query i sees keys j <= i + Sk - Sq); a query that sees no key
            gets zeros.
        scale: the logit scale of ``q @ k^T``, default 1/sqrt(D).
        backend: as for every op (see ``kernels.backends``).

    Returns:
        ``(out, out_c)``: (B, H, Sq, D) and (B, H, Sq, Rv), ``out_c`` None when ``v_c`` is None.

    Raises:
        ValueError: mismatched shapes, ranks, dtypes or devices (the message names the argument).
    """
    scale = _validate(q, k, v, q_c, k_c, v_c, scale, packed=False)
    backends.select(OP, q.device, backend, dtype=q.dtype)
    return circuit_attention_ref(q, k, v, q_c, k_c, v_c, bool(causal), scale)


def _check_cu_seqlens(name: str, cu: Tensor, total: int, max_seqlen: int, max_name: str, q: Tensor) -> None:
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name}: expected a 1-D integer tensor of batch + 1 offsets")
    if cu.dtype.is_floating_point or cu.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer dtype, got {cu.dtype}")
    if cu.device != q.device:
        raise ValueError(f"{name}: expected a tensor on {q.device} (like q), got {cu.device}")
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"{name}: must start at 0 and end at {total} (the packed length), got {bounds[0]}..{bounds[-1]}")
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name}: offsets must be non-decreasing")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name}: {max_seqlen} is below the longest sequence ({max(lengths)})")


def circuit_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    q_c: Optional[Tensor] = None,
    k_c: Optional[Tensor] = None,
    v_c: Optional[Tensor] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Packed variable-length :func:`circuit_attention` (routed token subsets, mixed batches).

    q (total_q, H, D), k and v (total_k, Hkv, D), q_c (total_q, H, R), k_c (total_k, Hkv, R),
    v_c (total_k, Hkv, Rv); sequence b is rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and
    ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k, v (int32 or int64 offsets, B + 1 of them). Empty
    sequences are allowed. Returns (total_q, H, D) and (total_q, H, Rv) (None without v_c).
    """
    scale = _validate(q, k, v, q_c, k_c, v_c, scale, packed=True)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", q)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_k: expected {cu_seqlens_q.numel()} offsets like cu_seqlens_q, got {cu_seqlens_k.numel()}"
        )
    backends.select(OP, q.device, backend, dtype=q.dtype)
    return circuit_attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, q_c, k_c, v_c, bool(causal), scale)
