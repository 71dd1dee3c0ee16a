"""Triton backend of ``lowrank_linear``: a shared-weight matmul fused with gathered low-rank updates.

    y[t] = x[t] @ W^T + b + s * sum_j g[t, j] * (x[t] @ A[e].T) @ B[e].T,    e = indices[t, j]

Shapes (the normalised backend interface of ``kernels/lowrank_linear.py``; every 2-D/3-D operand may have
arbitrary strides, nothing is copied to make it contiguous):

    x        (M, K)       float32 / float16 / bfloat16
    weight   (N, K)       W, shared by every row
    bias     (N,)         or None
    lora_a   (E, r, K)    A, one per adapter (PEFT's lora_A.weight, stacked), or None
    lora_b   (E, N, r)    B, one per adapter
    indices  (M, k)       int64, -1 = empty slot; or None (single-adapter mode: every row uses ``adapter``)
    gates    (M, k)       float32, or None (= 1)
    y        (M, N)       x's dtype, contiguous
    u        (M, k, r)    float32, u[t, j] = x[t] @ A[e[t, j]].T (unscaled, ungated; 0 for empty slots)

Precision: fp32 accumulation everywhere, and every dot on operands of the input dtype: 16-bit operands go
to the tensor cores, float32 operands use ``input_precision="ieee"`` (float32-exact, not TF32). The
low-rank vectors (u, v and the epilogue's Z, accumulated in fp32) are rounded to the input dtype once,
as operands of the expand u @ B^T and of the weight-gradient reductions v^T x and u^T grad_y. Chosen by
measurement against the error rule (at most twice the error of the same op run by PyTorch in that dtype):
at M = 256, K = N = 4096, r = 64, 8 adapters top-2, scaling 0.5 and 4, emulated in float64, y's error was
0.58-0.59x PyTorch's in bfloat16 and float16 with 16-bit operands against 0.43-0.54x with float32-accurate
ones (tf32x3, about 6x the cost of a 16-bit MMA), dA's 0.69-0.70x against 0.50x; the GPU sweep
(``benchmarks/gpu_sweep.py``) checks every configuration against the same rule.

Kernels:

``_linear_kernel``  grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), grouped ("super-grouped") tile order.
    One program computes y[m_tile, n_tile]. The K loop accumulates ``acc = x @ W^T`` (BLOCK_M, BLOCK_N).
    Its epilogue adds the low-rank term and the bias and writes y once, in x's dtype. ``LORA`` picks it:
      0  plain linear.
      1  single adapter: the shrink shares the K loop (second accumulator ``acc_u = x @ A^T``,
         (BLOCK_M, BLOCK_R), BLOCK_R = max(16, next_power_of_2(r)), masked to r), the expand
         ``(s * acc_u) @ B[n_tile]^T`` is one more ``tl.dot`` in the epilogue; the programs with
         pid_n == 0 also store ``acc_u`` as u. (Every N tile recomputes the shrink: BLOCK_R / BLOCK_N extra
         FLOPs, in exchange for a single launch and no round trip of u through memory.)
      2  gathered adapters (tensor indices): u is precomputed by ``_seg_shrink_kernel``. The E factors B
         are read as one (N, E*r) matrix through strides (B_all[n, e*r + i] = B[e, n, i], no copy). For
         each chunk of BLOCK_C = BLOCK_R columns of E*r that some row of the tile uses (chunks no row uses
         are skipped), the epilogue builds the block-sparse (BLOCK_M, BLOCK_C) matrix
             Z[t, e*r + i] = s * sum_j [e[t, j] == e] * g[t, j] * u[t, j, i]
         from masked, gathered loads of u, and adds ``Z @ B_all[n_tile, chunk]^T`` (one ``tl.dot``).
         Rows stay in natural order, so y is written once with plain (coalesced) stores.

``_seg_shrink_kernel``  grid (cdiv(M*k, BLOCK_M) + E,) (a static upper bound, no host synchronisation).
    The M*k (row, slot) assignments are sorted by adapter on the device (``torch.sort`` of the
    indices, empty slots last, plus ``torch.searchsorted`` for the E+1 segment offsets). In the style of
    MoE "align block size", each adapter's segment is cut into tiles of BLOCK_M assignments, so every
    tile belongs to exactly one adapter. The tile -> (adapter, start, end) map is computed *inside* the
    kernel from the segment offsets (a cumsum over E of cdiv(count_e, BLOCK_M)), so it does not depend on
    a host-side choice of BLOCK_M and the kernel can be autotuned; programs past the last tile exit.
    One program: u[slots of the tile] = x[rows of the tile] @ A[e]^T, the rows of x gathered by index
    inside the kernel (no gathered copy of x, no per-token copy of A).

``_seg_outer_kernel``  grid (cdiv(M*k, ROWS) + E, cdiv(Q, BLOCK_Q)): the weight gradients of the factors,
    a segmented reduction over the same sorted assignments:
        out[e, i, q] += s * sum_{slots (t, j) of adapter e} g[t, j] * vec[t, j, i] * mat[t, q]
    dA = out with (vec, mat) = (v, x), out (E, r, K);  dB = out with (vec, mat) = (u, grad_y), out
    viewed as (E, r, N) through the strides of the (E, N, r) buffer. One program reduces up to ROWS
    assignments of one adapter for one Q tile (BLOCK_M at a time, ``tl.dot`` of (BLOCK_R, BLOCK_M) by
    (BLOCK_M, BLOCK_Q)), then ``tl.atomic_add``s its fp32 partial into an fp32 buffer (an adapter with more
    than ROWS assignments is split across programs for parallelism), cast to the factor's dtype at the end.
    The order of those additions varies from run to run: dA and dB are reproducible to a few float32 ulps
    of each sum (far below a 16-bit result's rounding; ``tests/test_lowrank_linear.py`` bounds it where
    programs contend). Under ``torch.use_deterministic_algorithms(True)`` (SPLIT off) one program reduces
    all of an adapter's assignments for its Q tile, in a fixed order: bitwise reproducible, with fewer
    programs when few adapters are used (single-adapter mode: cdiv(Q, BLOCK_Q)).

Backward (dx is the forward with the roles transposed, so the same kernels serve it):
    v[t, j] = grad_y[t] @ B[e]            the shrink of grad_y by B^T (r, N) per adapter
    dx      = grad_y @ W + s * sum_j g v_j @ A[e]
            = forward with x := grad_y, weight := W^T (K, N) (a strided view), A := B^T (r, N),
              B := A^T (K, r); in single-adapter mode the fused kernel (LORA=1) also produces v,
              with tensor indices ``_seg_shrink_kernel`` produces v and ``_linear_kernel`` (LORA=2) dx.
    dW      = grad_y^T @ x, db = grad_y.sum(0): torch (cuBLAS is the right tool for the dense gradient).
    dA, dB  = ``_seg_outer_kernel`` (single-adapter mode: one segment of all M rows, written into the
              adapter's slice of a zero buffer).
    dgates  = s * <u[t, j], v[t, j]> (an elementwise torch reduction of the two (M, k, r) fp32 tensors).

Autotuning: a handful of configurations per kernel (for decode-sized M, narrow N tiles that spread a
4096-wide output over every SM), keyed on power-of-two buckets of the row count (so a varying number of
tokens does not retune), N, K, the layout (unit K stride or not) and the mode; the choices a GPU run stored
(``triton_tuning.py``) are loaded at the first launch; ``RECURSIVE_KERNELS_TRITON_AUTOTUNE=0`` keeps one
default configuration per kernel.
Under ``TRITON_INTERPRET=1`` (CPU tensors) each kernel has one fixed small configuration (nothing is
benchmarked), ``tl.dot`` runs in float64 and rounds once (``triton_common.mma``: the interpreter
multiplies the raw bits of bfloat16 operands, triton issue 11584) and the final float32 -> bfloat16 store is rounded to
nearest even by hand (the interpreter truncates that conversion; the GPU rounds it). No host synchronisation
anywhere (the grids are static upper bounds), nothing is launched when M = 0. Only long-standing
Triton APIs are used (tl.dot / load / store / atomic_add / cumsum, triton.autotune): Triton 3.6 and 3.9.

Limitations: the gathered epilogue loops over the cdiv(E*r, BLOCK_R) chunks of every (m, n) tile
(unused chunks cost only a few index loads, but very large E*r makes it linear in E); r is held in a
register tile of BLOCK_R >= r columns, so very large ranks (r > 128) spill. Float64 is not served.

One file, longer than the others: one op's kernels, their tuning spaces and launchers, read together (each
launcher's grid and constexprs follow its kernel's), as Liger-Kernel keeps an op.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import INTERPRET, block_width, bucket, cast, config, device_guard, dot_precision, mma, tuning_space

# ----------------------------------------------------------------------------------------------------
# autotuning spaces (a single small configuration under the interpreter, where every config would run)
# ----------------------------------------------------------------------------------------------------


if INTERPRET:
    _LINEAR_CONFIGS = [config(1, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)]
    _SHRINK_CONFIGS = [config(1, 1, BLOCK_M=16, BLOCK_K=32)]
    _OUTER_CONFIGS = [config(1, 1, BLOCK_M=16, BLOCK_Q=32, ROWS=32)]
else:
    _LINEAR_CONFIGS = [
        config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),  # decode-sized M
        # decode: narrower N tiles, so that N = 4096 makes 128 or 256 programs for an H100's 132 SMs (not 64), with
        # longer K steps and deeper pipelines to keep each one's weight stream in flight
        config(2, 5, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=8),
        config(2, 4, BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, GROUP_M=8),
        config(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        config(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),  # plain linear only (_prune_linear)
    ]
    _SHRINK_CONFIGS = [
        config(4, 4, BLOCK_M=16, BLOCK_K=128),
        config(4, 4, BLOCK_M=32, BLOCK_K=128),
        config(4, 3, BLOCK_M=64, BLOCK_K=64),
        config(8, 3, BLOCK_M=64, BLOCK_K=128),
    ]
    _OUTER_CONFIGS = [
        config(4, 3, BLOCK_M=32, BLOCK_Q=64, ROWS=256),
        config(4, 3, BLOCK_M=64, BLOCK_Q=64, ROWS=512),
        config(4, 3, BLOCK_M=64, BLOCK_Q=128, ROWS=512),
        config(8, 3, BLOCK_M=64, BLOCK_Q=128, ROWS=2048),
    ]
    _LINEAR_CONFIGS = tuning_space(_LINEAR_CONFIGS)
    _SHRINK_CONFIGS = tuning_space(_SHRINK_CONFIGS)
    _OUTER_CONFIGS = tuning_space(_OUTER_CONFIGS)


def _prune_by_rows(configs, named_args, **kwargs):
    """Drop configurations whose row tile is far larger than the rows there are (decode shapes)."""
    rows = named_args.get("ROWS_BUCKET", None)
    if rows is None:
        return configs
    cap = max(16, rows)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    return kept or configs[:1]


def _prune_linear(configs, named_args, **kwargs):
    """``_prune_by_rows``, and tiles over 128 x 128 only for the plain linear: beside the low-rank
    epilogue's registers they spill on sm_90 (tests/triton_compile_check.py --report)."""
    kept = _prune_by_rows(configs, named_args, **kwargs)
    if kwargs.get("LORA", 0):
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128] or kept[:1]
    return kept


# ----------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _segment_tile(pid, seg_ptr, E, TILE, BLOCK_E: tl.constexpr):
    """Map tile ``pid`` to (adapter e, start, end) over sorted assignments whose adapter e occupies
    positions [seg[e], seg[e+1]); each segment is cut into cdiv(count, TILE) tiles. e >= E: no tile."""
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    starts = tl.load(seg_ptr + offs_e, mask=e_mask, other=0)
    ends = tl.load(seg_ptr + offs_e + 1, mask=e_mask, other=0)
    ntiles = (ends - starts + TILE - 1) // TILE
    tile_end = tl.cumsum(ntiles, 0)
    e = tl.sum((tile_end <= pid).to(tl.int32), 0)
    sel = offs_e == e
    tile_begin = tl.sum(tl.where(sel, tile_end - ntiles, 0), 0)
    start = tl.sum(tl.where(sel, starts, 0), 0) + (pid - tile_begin) * TILE
    end = tl.sum(tl.where(sel, ends, 0), 0)
    return e, start, end


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_LINEAR_CONFIGS,
    key=["ROWS_BUCKET", "N", "K", "stride_xk", "stride_wk", "LORA", "SLOTS", "BLOCK_R", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_linear},
)
@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, u_ptr, idx_ptr, g_ptr, y_ptr,
    M, N, K, R, E, ROWS_BUCKET,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_be, stride_bn, stride_br,
    stride_us, stride_ur,
    stride_ym, stride_yn,
    scaling,
    LORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATES: tl.constexpr, STORE_U: tl.constexpr,
    SLOTS: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x @ W^T (+ low-rank term) (+ bias), one (BLOCK_M, BLOCK_N) tile per program.

    x (M, K), W (N, K), y (M, N). LORA=1: A (R, K) and B (N, R) of one adapter (stride_be unused), u
    (M, R) written (rows ``stride_us``) when STORE_U. LORA=2: B (E, N, R), u (M*SLOTS, R) read, indices
    and gates (M, SLOTS) contiguous."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < R
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk          # (BM, BK)
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk          # (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if LORA == 1:
        a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak    # (BK, BR)
        acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(xt, wt, acc, PREC, UPCAST)
        if LORA == 1:
            at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc_u = mma(xt, at, acc_u, PREC, UPCAST)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if LORA == 1:
        # expand: acc += s * u @ B[n_tile]^T ; B (N, R) read as (BR, BN)
        bt = tl.load(b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(cast(acc_u * scaling, bt.dtype, UPCAST), bt, acc, PREC, UPCAST)
        if STORE_U:
            if pid_n == 0:
                u_ptrs = u_ptr + rows[:, None] * stride_us + offs_r[None, :] * stride_ur
                tl.store(u_ptrs, acc_u, mask=m_mask[:, None] & r_mask[None, :])
    if LORA == 2:
        # B_all (N, E*R), B_all[n, c] = B[c // R, n, c % R]; chunks of BLOCK_R columns of E*R.
        ER = E * R
        offs_c = tl.arange(0, BLOCK_R)
        for c0 in range(0, ER, BLOCK_R):
            cc = c0 + offs_c
            c_mask = cc < ER
            ce = cc // R
            ci = cc % R
            e_lo = c0 // R
            e_hi = (tl.minimum(c0 + BLOCK_R, ER) - 1) // R
            hit = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for j in tl.static_range(SLOTS):
                ej = tl.load(idx_ptr + rows * SLOTS + j, mask=m_mask, other=-1)
                hit += ((ej >= e_lo) & (ej <= e_hi)).to(tl.int32)
            if tl.max(hit, 0) > 0:
                z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for j in tl.static_range(SLOTS):
                    ej = tl.load(idx_ptr + rows * SLOTS + j, mask=m_mask, other=-1)
                    sel = (ej[:, None] == ce[None, :]) & c_mask[None, :]
                    uj = tl.load(u_ptr + (rows * SLOTS + j)[:, None] * stride_us + ci[None, :] * stride_ur,
                                 mask=sel, other=0.0)
                    if HAS_GATES:
                        gj = tl.load(g_ptr + rows * SLOTS + j, mask=m_mask, other=0.0)
                        uj = uj * gj[:, None]
                    z += uj
                bt = tl.load(b_ptr + ce[:, None].to(tl.int64) * stride_be + cols[None, :] * stride_bn
                             + ci[:, None] * stride_br,
                             mask=c_mask[:, None] & n_mask[None, :], other=0.0)
                acc = mma(cast(z * scaling, bt.dtype, UPCAST), bt, acc, PREC, UPCAST)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, cast(acc, y_ptr.dtype.element_ty, UPCAST), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _assignment_tile(pid, seg_ptr, NA, E, TILE, BLOCK_E: tl.constexpr, SORTED: tl.constexpr):
    """(adapter e, start, end) of tile ``pid`` of up to TILE assignments: a tile of adapter e's segment of the
    sorted assignments (see ``_segment_tile``; e >= E: no tile), or, unsorted (single-adapter mode), the
    assignments from pid * TILE of adapter 0."""
    if SORTED:
        e, start, end = _segment_tile(pid, seg_ptr, E, TILE, BLOCK_E)
    else:
        e = 0
        start = pid * TILE
        end = NA
    return e, start, end


@triton.jit
def _slots(order_ptr, offs, mask, SORTED: tl.constexpr):
    """The assignment (slot) ids at positions ``offs`` of the assignment order: ``order`` sorted, else the
    positions themselves."""
    if SORTED:
        slot = tl.load(order_ptr + offs, mask=mask, other=0).to(tl.int64)
    else:
        slot = offs.to(tl.int64)
    return slot


@triton.autotune(
    configs=_SHRINK_CONFIGS,
    key=["ROWS_BUCKET", "K", "stride_xk", "BLOCK_R", "SORTED"],
    prune_configs_by={"early_config_prune": _prune_by_rows},
)
@triton.jit
def _seg_shrink_kernel(
    x_ptr, a_ptr, u_ptr, order_ptr, seg_ptr,
    NA, K, R, E, SLOTS, ROWS_BUCKET,
    stride_xm, stride_xk,
    stride_ae, stride_ar, stride_ak,
    stride_us, stride_ur,
    SORTED: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """u[a] = x[a // SLOTS] @ A[e]^T for the assignments a of one adapter tile.

    x (M, K), A (E, R, K), u (NA, R) with NA = M * SLOTS assignments. SORTED: ``order`` (NA,) lists the
    assignments by adapter and ``seg`` (E+1,) the segment offsets; otherwise assignment a is row a and
    uses A[0] (single-adapter mode, E = 1)."""
    e, start, end = _assignment_tile(tl.program_id(0), seg_ptr, NA, E, BLOCK_M, BLOCK_E, SORTED)
    if e >= E:
        return
    offs = start + tl.arange(0, BLOCK_M)
    m_mask = offs < end
    slot = _slots(order_ptr, offs, m_mask, SORTED)
    row = slot // SLOTS
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    x_ptrs = x_ptr + row[:, None] * stride_xm + offs_k[None, :] * stride_xk                       # (BM, BK)
    a_ptrs = a_ptr + e * stride_ae + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak    # (BK, BR)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = mma(xt, at, acc, PREC, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    tl.store(u_ptr + slot[:, None] * stride_us + offs_r[None, :] * stride_ur, acc,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.autotune(
    configs=_OUTER_CONFIGS,
    key=["ROWS_BUCKET", "Q", "stride_mq", "BLOCK_R", "SORTED", "HAS_GATES", "SPLIT"],
    reset_to_zero=["out_ptr"],
)
@triton.jit
def _seg_outer_kernel(
    vec_ptr, mat_ptr, g_ptr, out_ptr, order_ptr, seg_ptr,
    NA, Q, R, E, SLOTS, ROWS_BUCKET,
    stride_vs, stride_vr,
    stride_mm, stride_mq,
    stride_oe, stride_or, stride_oq,
    scaling,
    SORTED: tl.constexpr, HAS_GATES: tl.constexpr, SPLIT: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, ROWS: tl.constexpr,
):
    """out[e] += s * sum_a g[a] * outer(vec[a], mat[a // SLOTS]) over up to ROWS assignments a of adapter e
    (SPLIT off: all of them).

    vec (NA, R) float32, mat (M, Q), g (NA,) float32, out (E, R, Q) float32 (atomically accumulated)."""
    pid_q = tl.program_id(1)
    rows = ROWS if SPLIT else NA
    e, start, end = _assignment_tile(tl.program_id(0), seg_ptr, NA, E, rows, BLOCK_E, SORTED)
    if e >= E:
        return
    stop = tl.minimum(start + rows, end)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < Q
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_R, BLOCK_Q), dtype=tl.float32)
    for m0 in range(start, stop, BLOCK_M):
        offs = m0 + offs_m
        m_mask = offs < stop
        slot = _slots(order_ptr, offs, m_mask, SORTED)
        row = slot // SLOTS
        vt = tl.load(vec_ptr + slot[None, :] * stride_vs + offs_r[:, None] * stride_vr,
                     mask=r_mask[:, None] & m_mask[None, :], other=0.0)                          # (BR, BM)
        if HAS_GATES:
            g = tl.load(g_ptr + slot, mask=m_mask, other=0.0)
            vt = vt * g[None, :]
        mt = tl.load(mat_ptr + row[:, None] * stride_mm + offs_q[None, :] * stride_mq,
                     mask=m_mask[:, None] & q_mask[None, :], other=0.0)                          # (BM, BQ)
        acc = mma(cast(vt, mt.dtype, UPCAST), mt, acc, PREC, UPCAST)
    out_ptrs = out_ptr + e * stride_oe + offs_r[:, None] * stride_or + offs_q[None, :] * stride_oq
    tl.atomic_add(out_ptrs, acc * scaling, mask=r_mask[:, None] & q_mask[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------


def _launch_linear(x, w, bias, y, lora=0, a=None, b=None, u=None, idx=None, gates=None, scaling=1.0):
    """y = x @ w^T (+ low-rank) (+ bias). x (M, K), w (N, K), y (M, N): any strides.
    lora=1: a (R, K), b (N, R), u (M, 1, R) or None (not stored). lora=2: b (E, N, R), u (M, k, R) read,
    idx / gates (M, k) contiguous."""
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0:
        return
    dummy = x
    R = E = 0
    slots = 1
    sa = (0, 0)
    sb = (0, 0, 0)
    su = (0, 0)
    if lora == 1:
        R = a.shape[0]
        sa = a.stride()
        sb = (0,) + tuple(b.stride())
        if u is not None:
            su = (u.stride(0), u.stride(2))
    elif lora == 2:
        E, _, R = b.shape
        slots = idx.shape[1]
        sb = b.stride()
        su = (u.stride(1), u.stride(2))
        assert u.is_contiguous() and idx.is_contiguous() and (gates is None or gates.is_contiguous())

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _linear_kernel[grid](
        x, w, dummy if bias is None else bias, dummy if a is None else a, dummy if b is None else b,
        dummy if u is None else u, dummy if idx is None else idx, dummy if gates is None else gates, y,
        M, N, K, R, E, bucket(M),
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1),
        sa[0], sa[1],
        sb[0], sb[1], sb[2],
        su[0], su[1],
        y.stride(0), y.stride(1),
        float(scaling),
        LORA=lora, HAS_BIAS=bias is not None, HAS_GATES=gates is not None,
        STORE_U=lora == 1 and u is not None, SLOTS=slots, BLOCK_R=block_width(R) if lora else 16,
        PREC=dot_precision(x.dtype), UPCAST=INTERPRET,
    )


def _segments(indices: Tensor, E: int) -> Tuple[Tensor, Tensor]:
    """Sort the (row, slot) assignments by adapter on the device, no host synchronisation.

    Returns order (M*k,) int64: assignment ids t*k + j, adapter by adapter (empty slots last), and
    seg (E+1,) int32: adapter e owns order[seg[e]:seg[e+1]]."""
    flat = indices.reshape(-1)
    key = torch.where(flat < 0, torch.full_like(flat, E), flat)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(E + 1, device=flat.device, dtype=sorted_key.dtype)
    seg = torch.searchsorted(sorted_key, bounds, out_int32=True)
    return order, seg


def _launch_shrink(x, a, u, order, seg, slots):
    """u[t, j] = x[t] @ a[e[t, j]]^T. x (M, K), a (E, R, K), u (M, slots, R) float32 (contiguous).
    order None: single-adapter mode, a has E = 1 and every row uses it."""
    M, K = x.shape
    E, R, _ = a.shape
    NA = M * slots
    if NA == 0:
        return
    sorted_ = order is not None
    assert u.is_contiguous()
    if sorted_:
        def grid(meta):
            return (triton.cdiv(NA, meta["BLOCK_M"]) + E,)
    else:
        def grid(meta):
            return (triton.cdiv(NA, meta["BLOCK_M"]),)
    _seg_shrink_kernel[grid](
        x, a, u, order if sorted_ else u, seg if sorted_ else u,
        NA, K, R, E, slots, bucket(NA),
        x.stride(0), x.stride(1),
        a.stride(0), a.stride(1), a.stride(2),
        u.stride(1), u.stride(2),
        SORTED=sorted_, BLOCK_E=triton.next_power_of_2(max(E, 1)), BLOCK_R=block_width(R),
        PREC=dot_precision(x.dtype), UPCAST=INTERPRET,
    )


def outer_grid(NA: int, Q: int, E: int, split: bool):
    """The grid of ``_seg_outer_kernel`` over NA assignments sorted into E segments (E = 0: unsorted): a tile
    of up to ROWS assignments per program (split; E more for the segments' ragged ends), else one per
    segment; times the Q tiles."""
    def grid(meta):
        tiles = triton.cdiv(NA, meta["ROWS"]) + E if split else max(E, 1)
        return (tiles, triton.cdiv(Q, meta["BLOCK_Q"]))
    return grid


def _launch_outer(vec, mat, gates, out, order, seg, slots, scaling):
    """out[e] += s * sum over the assignments a of adapter e of g[a] * outer(vec[a], mat[a // slots]).
    vec (M, slots, R) float32 contiguous, mat (M, Q), out (E, R, Q) float32 (any strides)."""
    M, Q = mat.shape
    E, R, _ = out.shape
    NA = M * slots
    if NA == 0 or Q == 0:
        return
    sorted_ = order is not None
    split = not torch.are_deterministic_algorithms_enabled()
    assert vec.is_contiguous() and (gates is None or gates.is_contiguous())
    _seg_outer_kernel[outer_grid(NA, Q, E if sorted_ else 0, split)](
        vec, mat, vec if gates is None else gates, out, order if sorted_ else vec, seg if sorted_ else vec,
        NA, Q, R, E, slots, bucket(NA),
        vec.stride(1), vec.stride(2),
        mat.stride(0), mat.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        float(scaling),
        SORTED=sorted_, HAS_GATES=gates is not None, SPLIT=split, BLOCK_E=triton.next_power_of_2(max(E, 1)),
        BLOCK_R=block_width(R), PREC=dot_precision(mat.dtype), UPCAST=INTERPRET,
    )


# ----------------------------------------------------------------------------------------------------
# the backend interface
# ----------------------------------------------------------------------------------------------------


def _forward(x, weight, bias, lora_a, lora_b, indices, gates, scaling, adapter):
    assert x.dim() == 2 and weight.dim() == 2 and x.dtype != torch.float64
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if lora_a is None:
        _launch_linear(x, weight, bias, y)
        return y, torch.empty(0, dtype=torch.float32, device=x.device)
    E, r, _ = lora_a.shape
    if indices is None:
        u = torch.empty((M, 1, r), dtype=torch.float32, device=x.device)
        _launch_linear(x, weight, bias, y, lora=1, a=lora_a[adapter], b=lora_b[adapter], u=u, scaling=scaling)
        return y, u
    slots = indices.shape[1]
    u = torch.zeros((M, slots, r), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, u
    order, seg = _segments(indices, E)
    _launch_shrink(x, lora_a, u, order, seg, slots)
    _launch_linear(x, weight, bias, y, lora=2, b=lora_b, u=u, idx=indices, gates=gates, scaling=scaling)
    return y, u


def _backward(grad_y, x, weight, lora_a, lora_b, indices, gates, scaling, adapter, u, needs):
    need_dx, need_dw, need_db, need_da, need_dbB, need_dg = (bool(n) for n in needs)
    need_dg = need_dg and gates is not None  # no gates (all 1): no gradient, as the op's fake has it
    device = x.device
    M, K = x.shape
    N = weight.shape[0]
    # a distinct empty tensor per gradient that is not computed (outputs must not alias each other), in x's dtype as
    # the op's fake (meta) implementation gives it: torch.compile checks the two agree
    dx, dweight, dbias, dlora_a, dlora_b, dgates = (x.new_empty(0) for _ in range(6))

    if need_dw:  # the shared dense gradient: cuBLAS (fp32 accumulation), zeros when M = 0
        dweight = torch.matmul(grad_y.t(), x).to(weight.dtype).contiguous()
    if need_db:
        dbias = grad_y.sum(0, dtype=torch.float32).to(x.dtype)
    if need_dx:
        dx = torch.empty((M, K), dtype=x.dtype, device=device)

    if lora_a is None:
        if need_dx:
            _launch_linear(grad_y, weight.t(), None, dx)
        return dx, dweight, dbias, dlora_a, dlora_b, dgates

    E, r, _ = lora_a.shape
    f32 = dict(dtype=torch.float32, device=device)
    a_t = lora_a.transpose(1, 2)  # (E, K, r): the B role for dx
    b_t = lora_b.transpose(1, 2)  # (E, r, N): the A role for v (and dx)

    if indices is None:
        v = None
        if need_dx:
            v = torch.empty((M, 1, r), **f32) if need_da else None
            _launch_linear(grad_y, weight.t(), None, dx, lora=1, a=b_t[adapter], b=a_t[adapter], u=v,
                           scaling=scaling)
        elif need_da:
            v = torch.empty((M, 1, r), **f32)
            _launch_shrink(grad_y, b_t[adapter:adapter + 1], v, None, None, 1)
        if need_da:
            buf = torch.zeros((E, r, K), **f32)
            _launch_outer(v, x, None, buf[adapter:adapter + 1], None, None, 1, scaling)
            dlora_a = buf.to(lora_a.dtype)
        if need_dbB:
            buf = torch.zeros((E, N, r), **f32)
            _launch_outer(u, grad_y, None, buf[adapter:adapter + 1].transpose(1, 2), None, None, 1, scaling)
            dlora_b = buf.to(lora_b.dtype)
        return dx, dweight, dbias, dlora_a, dlora_b, dgates

    slots = indices.shape[1]
    if M == 0:
        if need_da:
            dlora_a = torch.zeros(lora_a.shape, dtype=lora_a.dtype, device=device)
        if need_dbB:
            dlora_b = torch.zeros(lora_b.shape, dtype=lora_b.dtype, device=device)
        if need_dg:
            dgates = torch.zeros((0, slots), dtype=gates.dtype, device=device)
        return dx, dweight, dbias, dlora_a, dlora_b, dgates

    order, seg = _segments(indices, E)
    v = None
    if need_dx or need_da or need_dg:
        v = torch.zeros((M, slots, r), **f32)
        _launch_shrink(grad_y, b_t, v, order, seg, slots)
    if need_dx:
        _launch_linear(grad_y, weight.t(), None, dx, lora=2, b=a_t, u=v, idx=indices, gates=gates,
                       scaling=scaling)
    if need_da:
        buf = torch.zeros((E, r, K), **f32)
        _launch_outer(v, x, gates, buf, order, seg, slots, scaling)
        dlora_a = buf.to(lora_a.dtype)
    if need_dbB:
        buf = torch.zeros((E, N, r), **f32)
        _launch_outer(u, grad_y, gates, buf.transpose(1, 2), order, seg, slots, scaling)
        dlora_b = buf.to(lora_b.dtype)
    if need_dg:
        dgates = ((u * v).sum(-1) * scaling).masked_fill(indices < 0, 0.0).to(gates.dtype).contiguous()
    return dx, dweight, dbias, dlora_a, dlora_b, dgates


def forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    indices: Optional[Tensor],
    gates: Optional[Tensor],
    scaling: float,
    adapter: int,
) -> Tuple[Tensor, Tensor]:
    """y (M, N) in x's dtype (contiguous) and u (M, k, r) float32 (``torch.empty(0)`` without factors).

    x (M, K), weight (N, K), bias (N,) or None, lora_a (E, r, K) or None, lora_b (E, N, r) or None,
    indices (M, k) int64 with -1 for an empty slot, or None (every row uses adapter ``adapter``, k = 1),
    gates (M, k) float32 or None (= 1). Any strides. u[t, j] = x[t] @ lora_a[e[t, j]].T (0 if empty)."""
    with device_guard(x):
        return _forward(x, weight, bias, lora_a, lora_b, indices, gates, scaling, adapter)


def backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    indices: Optional[Tensor],
    gates: Optional[Tensor],
    scaling: float,
    adapter: int,
    u: Tensor,
    needs: Sequence[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dlora_a, dlora_b, dgates), each contiguous in its input's dtype (dgates
    float32); ``torch.empty(0)`` where ``needs`` says no or the input is absent.

    grad_y (M, N) any strides; u (M, k, r) float32 from ``forward``; needs: 6 bools for
    (x, weight, bias, lora_a, lora_b, gates)."""
    with device_guard(x):
        return _backward(grad_y, x, weight, lora_a, lora_b, indices, gates, scaling, adapter, u, needs)
