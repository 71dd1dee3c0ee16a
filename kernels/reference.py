"""Pure-PyTorch references: the spec of every op, the test oracle and the last-resort ``torch`` backend.

Written for clarity, differentiable by autograd, float64-capable. They take the normalised inputs that
the public ops hand to every backend (see ``kernels/lowrank_linear.py``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def lowrank_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    indices: Optional[Tensor],
    gates: Optional[Tensor],
    scaling: float,
    adapter: int,
) -> Tensor:
    """``y[t] = x[t] W^T + b + s * sum_j g[t, j] (x[t] A_e^T) B_e^T`` with ``e = indices[t, j]``.

    Shapes: x (M, K), weight (N, K), bias (N,), lora_a (E, r, K), lora_b (E, N, r), indices (M, k)
    int64 with -1 for an empty slot, gates (M, k) or None (= 1). With ``indices`` None every row uses
    adapter ``adapter``. Returns (M, N).

    Each adapter's update is computed for all rows and weighted by the rows' summed gates for it, so
    the reference needs no data-dependent shapes (and no host synchronisation).
    """
    y = F.linear(x, weight, bias)
    if lora_a is None:
        return y
    if indices is None:
        return y + scaling * F.linear(F.linear(x, lora_a[adapter]), lora_b[adapter])
    g = torch.ones(indices.shape, dtype=x.dtype, device=x.device) if gates is None else gates.to(x.dtype)
    for e in range(lora_a.shape[0]):
        row_weight = (g * (indices == e)).sum(-1, keepdim=True)  # (M, 1)
        y = y + scaling * row_weight * F.linear(F.linear(x, lora_a[e]), lora_b[e])
    return y


def circuit_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_c: Optional[Tensor],
    k_c: Optional[Tensor],
    v_c: Optional[Tensor],
    causal: bool,
    scale: float,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Attention with merged low-rank corrections at the logit and value sites (the QK/OV circuit).

    Shapes: q (B, H, Sq, D), k and v (B, Hkv, Sk, D) with H a multiple of Hkv, q_c (B, H, Sq, R) and
    k_c (B, Hkv, Sk, R) (both or neither), v_c (B, Hkv, Sk, Rv) or None. Returns out (B, H, Sq, D) and
    out_c (B, H, Sq, Rv) (None without v_c):

        S = scale * q @ k^T + q_c @ k_c^T,  P = softmax(S),  out = P @ v,  out_c = P @ v_c

    Causal masking is aligned bottom-right (query i sees keys j <= i + Sk - Sq); a query that sees no
    key gets zeros (and zero gradients), not NaN. Materialises the (Sq, Sk) scores: a reference.
    """
    group = q.shape[1] // k.shape[1]

    def per_query_head(t):
        return None if t is None else t.repeat_interleave(group, dim=1)

    k, v, k_c, v_c = (per_query_head(t) for t in (k, v, k_c, v_c))
    scores = scale * (q @ k.transpose(-1, -2))
    if q_c is not None:
        scores = scores + q_c @ k_c.transpose(-1, -2)
    Sq, Sk = q.shape[2], k.shape[2]
    if causal:
        visible = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
        scores = scores.masked_fill(~visible, float("-inf"))
        sees_a_key = visible.any(-1, keepdim=True)  # (Sq, 1)
        probs = torch.softmax(scores.masked_fill(~sees_a_key, 0.0), dim=-1) * sees_a_key
    else:
        probs = torch.softmax(scores, dim=-1)
    out = probs @ v
    return out, (None if v_c is None else probs @ v_c)


def circuit_attention_varlen_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    q_c: Optional[Tensor],
    k_c: Optional[Tensor],
    v_c: Optional[Tensor],
    causal: bool,
    scale: float,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Packed variable-length form: q (total_q, H, D), k and v (total_k, Hkv, D), corrections likewise;
    sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (and of k, v with cu_seqlens_k). Each
    sequence is :func:`circuit_attention_ref` on its own. Returns (total_q, H, D) and (total_q, H, Rv)."""
    outs, outs_c = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        rows_q, rows_k = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])

        def dense(t, rows):  # (S, heads, d) -> (1, heads, S, d)
            return None if t is None else t[rows].transpose(0, 1).unsqueeze(0)

        out, out_c = circuit_attention_ref(
            dense(q, rows_q), dense(k, rows_k), dense(v, rows_k),
            dense(q_c, rows_q), dense(k_c, rows_k), dense(v_c, rows_k), causal, scale,
        )
        outs.append(out[0].transpose(0, 1))
        if out_c is not None:
            outs_c.append(out_c[0].transpose(0, 1))
    out = torch.cat(outs) if outs else q.new_empty(0, q.shape[1], v.shape[2])
    if v_c is None:
        return out, None
    return out, (torch.cat(outs_c) if outs_c else q.new_empty(0, q.shape[1], v_c.shape[2]))
