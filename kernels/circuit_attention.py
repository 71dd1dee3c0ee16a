"""``circuit_attention``: attention whose logits and value contraction carry merged low-rank corrections.

    S = scale * q @ k^T + q_c @ k_c^T,   P = softmax(S),   out = P @ v,   out_c = P @ v_c

Depth-as-modulation models keep a shared attention block frozen and add, per depth and head, rank-R
factors at the logit site (q_c = X U_h, k_c = X V_h) and rank-Rv factors at the OV site (v_c = X C_h,
then out_c @ D_h^T outside the op). This file validates the inputs, dispatches, and wires the compiled
backends into autograd (eager: a ``torch.autograd.Function``; ``torch.compile``: ``torch.library``
custom ops with fake implementations). The references (``kernels/reference.py``) are the ``torch``
backend. The dense and the packed variable-length forms share one backend interface.

Backend interface. Every backend module provides, over normalised inputs (q_c/k_c None or of rank
R >= 1, v_c None or of rank Rv >= 1, head dim D >= 1; layouts below):

``forward(q, k, v, q_c, k_c, v_c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)``
    -> ``(out, out_c, lse)``. Dense (cu_seqlens None): q (B, H, Sq, D), k and v (B, Hkv, Sk, D),
    corrections likewise with widths R and Rv; out (B, H, Sq, D), out_c (B, H, Sq, Rv), lse (B, H, Sq).
    Packed: q (total_q, H, D), k and v (total_k, Hkv, D), cu_seqlens int32 (B + 1,) offsets, out
    (total_q, H, D), out_c (total_q, H, Rv), lse (H, total_q). out_c is empty without v_c. lse is the
    natural-log logsumexp of each row of S over the keys it sees, -inf for a row that sees none; its
    dtype is ``stats_dtype(q.dtype)``: float64 for float32 and float64 inputs (so that recomputing P in
    the backward costs nothing next to a float32 softmax), float32 for 16-bit inputs.

``backward(grad_out, grad_out_c, q, k, v, q_c, k_c, v_c, out, out_c, lse, cu_seqlens_q, cu_seqlens_k,
max_seqlen_q, max_seqlen_k, causal, scale)`` -> ``(dq, dk, dv, dq_c, dk_c, dv_c)``, FlashAttention-2's
    backward with the corrections: dP = dO v^T + dOc v_c^T, Delta = rowsum(dO * out) + rowsum(dOc *
    out_c), dS = P * (dP - Delta), dq = scale dS k, dq_c = dS k_c, dk = scale dS^T q, dk_c = dS^T q_c,
    dv = P^T dO, dv_c = P^T dOc, the key/value gradients summed over the query heads of their group; an
    empty tensor for an absent correction.

Layouts. Packed tensors are contiguous. A dense call has two sides, each in one layout: the query side (q,
q_c, and out, out_c, grad_out, grad_out_c, dq, dq_c) in q's, the key side (k, v, k_c, v_c and their
gradients) in k's. A side is head-major (its tensors contiguous) or token-major (each tensor a (B, heads, S,
width) view of a contiguous (B, S, heads, width) one, ``t.transpose(1, 2).is_contiguous()``: the layout
models and KV caches keep, which FlashAttention takes; see ``is_token_major``). The backends read both in
place, return out and out_c in q's layout and each gradient in its input's; lse is always contiguous.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .reference import circuit_attention_ref, circuit_attention_varlen_ref

OP = "circuit_attention"
OP_VARLEN = "circuit_attention_varlen"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256

# backend name -> (module, forward function, backward function), all with the interface above.
_IMPLS = {
    "triton": ("recursive_kernels.triton_circuit_attention", "forward", "backward"),
    "cuda": ("recursive_kernels._C_cuda", "circuit_attention_forward", "circuit_attention_backward"),
    "cpp": ("recursive_kernels._C", "circuit_attention_forward", "circuit_attention_backward"),
}


def _support(dtypes, backend: str, max_head_dim: Optional[int] = None) -> backends.SupportCheck:
    dtype_reasons = backends.dtype_check(dtypes, backend)

    def check(device, dtype, head_dim):
        found = dtype_reasons(device, dtype)
        if head_dim == 0:
            found.append(f"{backend} needs a head dim D >= 1 (the torch reference serves D = 0)")
        if max_head_dim is not None and head_dim > max_head_dim:
            found.append(f"{backend} serves head dims up to {max_head_dim}, got D = {head_dim}")
        return found

    return check


_SUPPORT = {
    "torch": lambda device, dtype, head_dim: [],
    "triton": _support(_GPU_DTYPES, "triton", _TRITON_MAX_HEAD_DIM),
    "cuda": _support(_GPU_DTYPES, "cuda", _TRITON_MAX_HEAD_DIM),
    "cpp": _support(_FLOAT_DTYPES, "cpp"),
}
backends.register_op(OP, _SUPPORT, _IMPLS)
backends.register_op(OP_VARLEN, _SUPPORT, _IMPLS)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the softmax statistics (lse) the backends keep for the backward."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def is_token_major(t: Tensor) -> bool:
    """Whether dense ``t`` (B, heads, S, width) is token-major: not contiguous itself, but a view of a contiguous
    (B, S, heads, width) tensor. One that is both (a single head or row) counts as contiguous."""
    return not t.is_contiguous() and t.transpose(1, 2).is_contiguous()


def in_layout(t: Tensor, token_major: bool) -> Tensor:
    """``t`` in its side's layout, token-major or contiguous; copied only when it is not in it already."""
    if not token_major:
        return t.contiguous()
    return t if t.transpose(1, 2).is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)


def empty_in_layout(like: Tensor, width: int, token_major: bool) -> Tensor:
    """An uninitialised tensor shaped like ``like`` but ``width`` wide, token-major or contiguous."""
    if token_major:
        B, heads, S = like.shape[:3]
        return like.new_empty(B, S, heads, width).transpose(1, 2)
    return like.new_empty(*like.shape[:-1], width)


@torch.library.custom_op("recursive_kernels::circuit_attention", mutates_args=())
def _circuit_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_c: Optional[Tensor],
    k_c: Optional[Tensor],
    v_c: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns out, out_c (empty without v_c) and the row logsumexp kept for backward."""
    impl = backends.implementation(_IMPLS[backend], 0)
    return tuple(impl(q, k, v, q_c, k_c, v_c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale))


@_circuit_attention_op.register_fake
def _(q, k, v, q_c, k_c, v_c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend):
    token_major = cu_seqlens_q is None and is_token_major(q)  # out and out_c come back in q's layout
    out_c = q.new_empty(0) if v_c is None else empty_in_layout(q, v_c.shape[-1], token_major)
    lse_shape = q.shape[:-1] if cu_seqlens_q is None else (q.shape[1], q.shape[0])
    return (empty_in_layout(q, v.shape[-1], token_major), out_c,
            q.new_empty(lse_shape, dtype=stats_dtype(q.dtype)))


def _backend_backward(grad_out, grad_out_c, q, k, v, q_c, k_c, v_c, out, out_c, lse,
                      cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend):
    impl = backends.implementation(_IMPLS[backend], 1)
    return tuple(impl(grad_out, grad_out_c, q, k, v, q_c, k_c, v_c, out, out_c, lse,
                      cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale))


@torch.library.custom_op("recursive_kernels::circuit_attention_backward", mutates_args=())
def _circuit_attention_backward_op(
    grad_out: Tensor,
    grad_out_c: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_c: Optional[Tensor],
    k_c: Optional[Tensor],
    v_c: Optional[Tensor],
    out: Tensor,
    out_c: Tensor,
    lse: Tensor,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    backend: str,
) -> List[Tensor]:
    """Gradients of (q, k, v, q_c, k_c, v_c); an empty tensor for an absent correction."""
    return list(_backend_backward(grad_out, grad_out_c, q, k, v, q_c, k_c, v_c, out, out_c, lse,
                                  cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend))


@_circuit_attention_backward_op.register_fake
def _(grad_out, grad_out_c, q, k, v, q_c, k_c, v_c, out, out_c, lse,
      cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend):
    return [torch.empty_like(t) if t is not None else q.new_empty(0) for t in (q, k, v, q_c, k_c, v_c)]


# of the op: q, k, v, q_c, k_c, v_c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q/k, causal, scale, backend
_NUM_INPUTS = 13


def _save(ctx, inputs, out, out_c, lse):
    q, k, v, q_c, k_c, v_c, cu_q, cu_k, max_q, max_k, causal, scale, backend = inputs
    ctx.save_for_backward(q, k, v, q_c, k_c, v_c, out, out_c, lse, cu_q, cu_k)
    ctx.max_seqlens, ctx.causal, ctx.scale, ctx.backend = (max_q, max_k), causal, scale, backend


def _grads(ctx, grad_out, grad_out_c, backward):
    q, k, v, q_c, k_c, v_c, out, out_c, lse, cu_q, cu_k = ctx.saved_tensors
    token_major = cu_q is None and is_token_major(q)  # the query side's layout, which grad_out takes
    grad_out = in_layout(grad_out, token_major)
    # Without v_c, grad_out_c is the empty out_c's (0,)-shaped gradient: no layout to take.
    grad_out_c = grad_out_c.contiguous() if v_c is None else in_layout(grad_out_c, token_major)
    grads = backward(grad_out, grad_out_c, q, k, v, q_c, k_c, v_c, out, out_c, lse,
                     cu_q, cu_k, *ctx.max_seqlens, ctx.causal, ctx.scale, ctx.backend)
    present = (True, True, True, q_c is not None, k_c is not None, v_c is not None)
    return (*(g if p else None for g, p in zip(grads, present)), *(None,) * (_NUM_INPUTS - 6))


def _op_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[2])  # lse is kept for backward, never a result for users
    _save(ctx, inputs, *output)


_circuit_attention_op.register_autograd(
    lambda ctx, grad_out, grad_out_c, grad_lse: _grads(ctx, grad_out, grad_out_c, _circuit_attention_backward_op),
    setup_context=_op_setup_context,
)


class _CircuitAttentionFunction(torch.autograd.Function):
    """The eager path: the custom ops' backend functions without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, *inputs):
        out, out_c, lse = backends.implementation(_IMPLS[inputs[-1]], 0)(*inputs[:-1])
        _save(ctx, inputs, out, out_c, lse)
        return out, out_c

    @staticmethod
    def backward(ctx, grad_out, grad_out_c):
        return _grads(ctx, grad_out, grad_out_c, _backend_backward)


def _run_fused(q, k, v, q_c, k_c, v_c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend):
    """Normalise for the backend interface (each side in its main tensor's layout, read in place when it is
    token-major or contiguous; rank-0 corrections dropped) and run ``backend``."""
    dense = cu_seqlens_q is None
    queries_token_major = dense and is_token_major(q)
    keys_token_major = dense and is_token_major(k)
    q = in_layout(q, queries_token_major)
    k, v = in_layout(k, keys_token_major), in_layout(v, keys_token_major)
    if q_c is not None and q_c.shape[-1] == 0:  # a rank-0 logit correction adds nothing
        q_c = k_c = None
    if q_c is not None:
        q_c, k_c = in_layout(q_c, queries_token_major), in_layout(k_c, keys_token_major)
    zero_rank_v = v_c is not None and v_c.shape[-1] == 0
    v_c_in = None if v_c is None or zero_rank_v else in_layout(v_c, keys_token_major)
    args = (q, k, v, q_c, k_c, v_c_in, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
            bool(causal), scale, backend)
    out, out_c = backends.dispatch(_circuit_attention_op, _CircuitAttentionFunction, _IMPLS, args,
                                   (q, k, v, q_c, k_c, v_c_in), outputs=2)
    if v_c is None:
        return out, None
    return out, (q.new_zeros(*q.shape[:-1], 0) if zero_rank_v else out_c)


def _check_like(name: str, t: Tensor, q: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype is q.dtype and t.device == q.device:  # the common case, before any message is built
        return
    if t.device != q.device:
        raise ValueError(f"{name}: expected a tensor on {q.device} (like q), got {t.device}")
    if t.dtype != q.dtype:
        raise ValueError(f"{name}: expected dtype {q.dtype} (like q), got {t.dtype}")


def _check_dims(name: str, t: Tensor, expected: Tuple, labels: str) -> None:
    """``expected`` holds sizes or None (any); ``labels`` names the dims for the message."""
    shape = t.shape
    if len(shape) == len(expected):
        for size, e in zip(shape, expected):  # a loop, not any(...): this runs on every call of the op
            if e is not None and size != e:
                break
        else:
            return
    want = ", ".join(f"{label}={e}" if e is not None else label for label, e in zip(labels.split(), expected))
    raise ValueError(f"{name}: expected shape ({want}), got {tuple(t.shape)}")


def _validate(q, k, v, q_c, k_c, v_c, scale, packed: bool):
    """Shared checks of the dense (B, heads, S, d) and packed (total, heads, d) layouts (q: a tensor, checked
    by the caller); returns scale."""
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q: expected a floating dtype, got {q.dtype}")
    rank = 3 if packed else 4
    if q.dim() != rank:
        raise ValueError(f"q: expected {rank} dims ({'total_q, H, D' if packed else 'B, H, Sq, D'}), "
                         f"got {tuple(q.shape)}")
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
        raise ValueError(f"{'k_c' if q_c is not None else 'q_c'}: q_c and k_c are the two factors of the logit "
                         "correction; give both or neither")
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
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite Python number or None, got {scale!r}")
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

    Layouts: a tensor is read in place when it is contiguous or token-major, ``t.transpose(1, 2)`` of a
    contiguous (B, S, heads, width) tensor (the layout models and KV caches keep, FlashAttention's). The query
    side (q, q_c) takes q's layout and the key side (k, v, k_c, v_c) k's; a tensor in another one is copied.

    Args:
        q: (B, H, Sq, D).
        k, v: (B, Hkv, Sk, D), H a multiple of Hkv (grouped-query attention).
        q_c, k_c: (B, H, Sq, R) and (B, Hkv, Sk, R), both or neither: ``S += q_c @ k_c^T`` (unscaled).
        v_c: (B, Hkv, Sk, Rv) or None: ``out_c = P @ v_c``.
        causal: mask aligned bottom-right (query i sees keys j <= i + Sk - Sq); a query that sees no key
            gets zeros.
        scale: the logit scale of ``q @ k^T``, default 1/sqrt(D).
        backend: as for every op (see ``recursive_kernels.backends``).

    Returns:
        ``(out, out_c)``: (B, H, Sq, D) and (B, H, Sq, Rv), ``out_c`` None when ``v_c`` is None; in q's layout
        on the fused backends (for a token-major q, ``out.transpose(1, 2)`` is contiguous), and each gradient
        in its side's. The ``torch`` reference's layouts are its matmuls'.

    Raises:
        ValueError: mismatched shapes, ranks, dtypes or devices (the message names the argument).
        recursive_kernels.BackendUnavailableError: the requested backend cannot serve this input.

    Under ``torch.autocast`` all six inputs run in the autocast dtype (attention is matmul-like).
    """
    if not isinstance(q, Tensor):
        raise ValueError(f"q: expected a tensor, got {type(q).__name__}")
    cast_to = backends.autocast_dtype(q)
    if cast_to is not None:
        with torch.autocast(q.device.type, enabled=False):  # the backends' own ATen calls stay as written
            return circuit_attention(
                *backends.autocast_inputs(cast_to, q, k, v, q_c, k_c, v_c), causal=causal, scale=scale, backend=backend
            )
    scale = _validate(q, k, v, q_c, k_c, v_c, scale, packed=False)
    chosen = backends.select(OP, q.device, backend, dtype=q.dtype, head_dim=q.shape[-1])
    if chosen == "torch":
        return circuit_attention_ref(q, k, v, q_c, k_c, v_c, bool(causal), scale)
    return _run_fused(q, k, v, q_c, k_c, v_c, None, None, q.shape[2], k.shape[2], causal, scale, chosen)


def _check_cu_seqlens(
    name: str, cu: Tensor, total: int, max_seqlen: int, max_name: str, q: Tensor, check_indices: bool
) -> None:
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name}: expected a 1-D integer tensor of batch + 1 offsets")
    if cu.dtype.is_floating_point or cu.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer dtype, got {cu.dtype}")
    if cu.device != q.device:
        raise ValueError(f"{name}: expected a tensor on {q.device} (like q), got {cu.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise ValueError(f"{max_name}: expected a Python int, got {type(max_seqlen).__name__}")
    if not check_indices or torch.compiler.is_compiling() or (cu.is_cuda and torch.cuda.is_current_stream_capturing()):
        return  # reading the offsets would need a host synchronisation
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"{name}: must start at 0 and end at {total} (the packed length), "
                         f"got {bounds[0]}..{bounds[-1]}")
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
    check_indices: bool = True,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Packed variable-length :func:`circuit_attention` (routed token subsets, mixed batches).

    q (total_q, H, D), k and v (total_k, Hkv, D), q_c (total_q, H, R), k_c (total_k, Hkv, R),
    v_c (total_k, Hkv, Rv); sequence b is rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and
    ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k, v (int32 or int64 offsets, B + 1 of them). Empty
    sequences are allowed. Returns (total_q, H, D) and (total_q, H, Rv) (None without v_c).

    ``check_indices=False`` skips reading the offsets (the indices of the sequences' rows) on the host to check
    their values (one host synchronisation per call on the GPU), the flag every op and module of the package
    takes; only for offsets that are right by construction, such as those of
    :class:`recursive.cache.VarlenPacking`. Their dtype, shape and device are always checked. Under
    ``torch.autocast`` the six inputs run in the autocast dtype, as in :func:`circuit_attention`.
    """
    if not isinstance(q, Tensor):
        raise ValueError(f"q: expected a tensor, got {type(q).__name__}")
    cast_to = backends.autocast_dtype(q)
    if cast_to is not None:
        q, k, v, q_c, k_c, v_c = backends.autocast_inputs(cast_to, q, k, v, q_c, k_c, v_c)
        with torch.autocast(q.device.type, enabled=False):  # the backends' own ATen calls stay as written
            return circuit_attention_varlen(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_c, k_c, v_c, causal=causal,
                scale=scale, backend=backend, check_indices=check_indices,
            )
    scale = _validate(q, k, v, q_c, k_c, v_c, scale, packed=True)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q, check_indices)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", q, check_indices)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_k: expected {cu_seqlens_q.numel()} offsets like cu_seqlens_q, got {cu_seqlens_k.numel()}"
        )
    chosen = backends.select(OP_VARLEN, q.device, backend, dtype=q.dtype, head_dim=q.shape[-1])
    if chosen == "torch":
        return circuit_attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, q_c, k_c, v_c, bool(causal), scale)
    cu_q, cu_k = (cu.to(torch.int32).contiguous() for cu in (cu_seqlens_q, cu_seqlens_k))
    return _run_fused(q, k, v, q_c, k_c, v_c, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, scale, chosen)
