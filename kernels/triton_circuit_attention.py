"""Triton backend of ``circuit_attention``: FlashAttention-2 with merged low-rank corrections.

    S = scale * q @ k^T + q_c @ k_c^T,   P = softmax(S),   out = P @ v,   out_c = P @ v_c

(per sequence b and query head h, whose kv head is h // (H // Hkv); the correction is not scaled). Causal
masking is bottom-right aligned per sequence: query i sees key j iff j <= i + (Sk - Sq). A row that sees
no key gets out = 0, out_c = 0, lse = -inf and zero gradients (never NaN).

Layouts (the backend interface of ``kernels/circuit_attention.py``; dense sides head-major or token-major):

    dense                                 packed (varlen, cu_seqlens int32 (B + 1,))
    q      (B, H, Sq, D)                  (total_q, H, D)
    k, v   (B, Hkv, Sk, D)                (total_k, Hkv, D)
    q_c    (B, H, Sq, R)   or None        (total_q, H, R)      R >= 1, k_c likewise, both or neither
    v_c    (B, Hkv, Sk, Rv) or None       (total_k, Hkv, Rv)   Rv >= 1, independent of R
    out, out_c like q, q_c with widths D, Rv (out_c ``torch.empty(0)`` without v_c)
    lse    (B, H, Sq)                     (H, total_q)

One set of kernels serves both: a row (b, head, i) of any tensor of a side (query side: q, q_c, out,
out_c and their gradients; key side: k, v, k_c, v_c and theirs) is row number
``b * row_b + head * row_h + (start_b + i) * row_s`` of that tensor seen as (rows, width), with
(row_b, row_h, row_s) = (heads * S, S, 1) for a head-major dense side, (S * heads, 1, heads) for a
token-major one (start_b = 0) and (0, 1, heads) packed, start_b = cu_seqlens[b]. Grids cover the longest
sequence; programs past their sequence's end exit.

Precision. Dots accumulate in fp32 (16-bit operands on tensor cores; float32 operands exact,
``input_precision="ieee"``, not TF32). P and dS are rounded to the input dtype before their dots, as in
FlashAttention-2. The softmax statistics depend on the input dtype:

* float16 / bfloat16: fp32 statistics, exp2 with log2(e) applied to S - m, lse float32.
* float32 (EXACT): the statistics (row max m, row sum l, exp, lse, Delta, P and dS before rounding)
  are float64 and Delta is rowsum(P * dP), so that recomputing P from lse in the backward loses nothing next to the
  float32 eager softmax (in float32, exp(S - lse) would cost eps * |lse| per element). The exp is a float64
  polynomial (``_exp_f64``) built from basic arithmetic, which every Triton version lowers; lse is
  float64.

Kernels: ``_fwd_kernel`` (programs: B*H x query blocks) keeps m, l, acc (BLOCK_M, BLOCK_D) and acc_c
(BLOCK_M, BLOCK_RV) in registers and loops over the key blocks the query block sees, in two phases:
blocks every row sees in full (no masks) and blocks crossing the causal diagonal or the sequence end
(masked). ``_bwd_dq_kernel`` (programs: B*H x query blocks) loops over the key blocks its queries see; for
float32 it first sweeps them to compute Delta = rowsum(P * dP) in float64 (see its docstring), for
16-bit inputs ``_bwd_preprocess_kernel`` computes FlashAttention's Delta = rowsum(dO * O) + rowsum(dOc *
Oc) beforehand. ``_bwd_dkdv_kernel`` (programs: B*Hkv x key blocks, launched after the dq kernel) holds one
key block and its four gradient accumulators and loops over the H // Hkv query heads of its group and
the query blocks that see it, so the group sum needs no atomics.

Absent corrections are constexpr flags (HAS_C, HAS_VC): their loads, dots and stores are compiled out.
Autotuning keys on power-of-two buckets of the sequence lengths, the padded widths and the flags
(``RECURSIVE_KERNELS_TRITON_AUTOTUNE=0``: one default configuration); under ``TRITON_INTERPRET=1``
(CPU tensors) one small configuration, dot operands upcast to float32 (the
interpreter multiplies the raw bits of bfloat16 operands) and float32 -> bfloat16 conversions rounded to
nearest even by hand (the interpreter truncates them). No host synchronisation.

Limitations: float64 is not served (cpp and torch are); D <= 256; R and Rv live in register tiles of
their padded sizes, so ranks above 64 work but spill. Grids are one axis of B * heads * blocks programs
(``_grid``, ``_program``): CUDA allows 2^31 - 1 there (65535 on the others, which B * H exceeds).

One file, longer than the others: the forward, dq and dk/dv kernels share the query- and key-block set-up
defined here, and their launchers follow them, as Liger-Kernel keeps an op.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .circuit_attention import empty_in_layout, in_layout, is_token_major
from .triton_common import INTERPRET, block_width, bucket, cast, config, device_guard, dot_precision, mma, tuning_space

MAX_HEAD_DIM = 256


if INTERPRET:  # the interpreter would run every configuration: one small one
    _FWD_CONFIGS = [config(1, 1, BLOCK_M=16, BLOCK_N=16)]
    _DQ_CONFIGS = _DKDV_CONFIGS = [config(1, 1, BLOCK_M=16, BLOCK_N=16)]
else:
    _FWD_CONFIGS = [
        config(4, 3, BLOCK_M=64, BLOCK_N=32),
        config(4, 3, BLOCK_M=64, BLOCK_N=64),
        config(8, 3, BLOCK_M=128, BLOCK_N=32),
        config(8, 3, BLOCK_M=128, BLOCK_N=64),
        config(4, 2, BLOCK_M=32, BLOCK_N=32),
    ]
    # dq holds (BLOCK_M, D) accumulators and walks key blocks, dk/dv hold four (BLOCK_N, .) ones and walk
    # query blocks: separate spaces. The 8-warp entries are the ones that compile without spills for
    # 16-bit inputs at D = 128 with corrections on sm_90 (tests/triton_compile_check.py --report).
    _DQ_CONFIGS = [
        config(4, 2, BLOCK_M=64, BLOCK_N=64),
        config(8, 2, BLOCK_M=64, BLOCK_N=64),
        config(8, 2, BLOCK_M=128, BLOCK_N=32),
        config(8, 2, BLOCK_M=128, BLOCK_N=64),
        config(4, 2, BLOCK_M=32, BLOCK_N=64),
        config(4, 1, BLOCK_M=32, BLOCK_N=32),
    ]
    _DKDV_CONFIGS = [
        config(4, 2, BLOCK_M=32, BLOCK_N=64),
        config(8, 2, BLOCK_M=32, BLOCK_N=64),
        config(8, 2, BLOCK_M=32, BLOCK_N=128),
        config(4, 2, BLOCK_M=64, BLOCK_N=64),
        config(8, 2, BLOCK_M=64, BLOCK_N=128),
        config(4, 1, BLOCK_M=32, BLOCK_N=32),
    ]
    _FWD_CONFIGS = tuning_space(_FWD_CONFIGS)
    _DQ_CONFIGS = tuning_space(_DQ_CONFIGS)
    _DKDV_CONFIGS = tuning_space(_DKDV_CONFIGS)
_KEY = ["SQ_BUCKET", "SK_BUCKET", "BLOCK_D", "BLOCK_R", "BLOCK_RV", "CAUSAL", "HAS_C", "HAS_VC", "VARLEN", "EXACT"]


def _prune_by_width(configs, named_args, **kwargs):
    """Wide rows (large D + Rv) or float64 statistics: keep the tiles that fit in registers."""
    meta = {**named_args, **kwargs}
    limit = 64 * 64 if meta.get("BLOCK_D", 0) + meta.get("BLOCK_RV", 0) > 160 or meta.get("EXACT") else None
    if limit is None:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit]
    return kept or configs[-1:]


# ----------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _exp_f64(x):
    """exp of float64 x <= 0 (0 below -708, also for -inf) to ~1e-14 relative: Cody-Waite reduction
    x = n ln2 + r, |r| <= ln2 / 2, and a degree-11 Taylor polynomial; 2^n from the exponent bits."""
    xc = tl.maximum(x, -708.0)
    n = (xc * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0  # round to nearest
    r = (xc - n * 0.6931471803691238) - n * 1.9082149292705877e-10
    p = 2.505210838544172e-08
    p = p * r + 2.755731922398589e-07
    p = p * r + 2.7557319223985893e-06
    p = p * r + 2.48015873015873e-05
    p = p * r + 0.0001984126984126984
    p = p * r + 0.001388888888888889
    p = p * r + 0.008333333333333333
    p = p * r + 0.041666666666666664
    p = p * r + 0.16666666666666666
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    two_n = ((n.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
    return tl.where(x < -708.0, 0.0, p * two_n)


@triton.jit
def _softmax_exp(x, EXACT: tl.constexpr):
    """exp(x) for x <= 0: float64 polynomial (EXACT) or fp32 exp2 (16-bit inputs)."""
    if EXACT:
        y = _exp_f64(x)
    else:
        y = tl.exp2(x * 1.4426950408889634)
    return y


@triton.jit
def _log_f64(x):
    """log of float64 x >= 1: float32 log refined by one Newton step on exp(y) = x (error ~1e-14)."""
    y = tl.log(x.to(tl.float32)).to(tl.float64)
    return y + x * _exp_f64(-y) - 1.0


@triton.jit
def _scores(q, k_tile, qc, kc_tile, scale, HAS_C: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr):
    """S (BM, BN) = scale * q @ k^T + q_c @ k_c^T in fp32; k_tile / kc_tile are (width, BN)."""
    s = mma(q, k_tile, tl.zeros((BM, BN), dtype=tl.float32), PREC, UPCAST) * scale
    if HAS_C:
        s = mma(qc, kc_tile, s, PREC, UPCAST)
    return s


@triton.jit
def _seq(cu_ptr, b, SEQ, VARLEN: tl.constexpr):
    """(start, length) of sequence b: from cu_seqlens (packed) or (0, SEQ) (dense)."""
    if VARLEN:
        start = tl.load(cu_ptr + b).to(tl.int64)
        length = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
    else:
        start = b * 0
        length = SEQ
    return start, length


@triton.jit
def _program(SEQ, BLOCK: tl.constexpr):
    """(batch x head, block of BLOCK rows) of this program in a grid of ``_grid``: a head's blocks are adjacent,
    so the programs that read its keys and values run together."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(SEQ, BLOCK)
    return pid // blocks, pid % blocks


@triton.jit
def _query_block(cu_q_ptr, cu_k_ptr, H, GROUP, SEQ_Q, SEQ_K, D, R, RV, q_rb, q_rh, q_rs, k_rb, k_rh, k_rs,
                 VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RV: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """The query block of a forward or dq program (``_program``: batch x head, block of BLOCK_M query rows):
    its batch b and head h, the sequence's query start and lengths, the block's first row m0 (the
    program has nothing to do when m0 >= Sq), the row and width offsets with their masks, the rows of the
    block's queries and the first key row of its kv head."""
    pid_bh, pid_m = _program(SEQ_Q, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q_start, Sq = _seq(cu_q_ptr, b, SEQ_Q, VARLEN)
    k_start, Sk = _seq(cu_k_ptr, b, SEQ_K, VARLEN)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_rv = tl.arange(0, BLOCK_RV)
    m_mask = offs_m < Sq
    d_mask = offs_d < D
    r_mask = offs_r < R
    rv_mask = offs_rv < RV
    q_rows = b * q_rb + h * q_rh + (q_start + offs_m) * q_rs
    k_rows0 = b * k_rb + hk * k_rh + k_start * k_rs
    return (b, h, q_start, Sq, Sk, m0, offs_m, offs_d, offs_r, offs_rv, m_mask, d_mask, r_mask, rv_mask,
            q_rows, k_rows0)


@triton.jit
def _fwd_inner(
    acc, acc_c, m_i, l_i, q, qc, k_base, v_base, kc_base, vc_base, k_rows0, offs_m, offs_n, offs_d, offs_r,
    offs_rv, d_mask, r_mask, rv_mask, lo, hi, Sq, Sk, k_rs, D, R, RV, scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_C: tl.constexpr, HAS_VC: tl.constexpr, EXACT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax accumulation over the key blocks [lo, hi) (MASK: sequence-end and causal masks)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        rows = k_rows0 + cols * k_rs
        n_mask = cols < Sk
        if MASK:
            nd = n_mask[:, None] & d_mask[None, :]
        else:
            nd = d_mask[None, :]
        k = tl.load(k_base + rows[:, None] * D + offs_d[None, :], mask=nd, other=0.0)             # (BN, BD)
        v = tl.load(v_base + rows[:, None] * D + offs_d[None, :], mask=nd, other=0.0)
        kc = k
        if HAS_C:
            kc = tl.load(kc_base + rows[:, None] * R + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                         other=0.0)
        s = _scores(q, tl.trans(k), qc, tl.trans(kc), scale, HAS_C, PREC, UPCAST, BLOCK_M, BLOCK_N)
        if MASK:
            visible = n_mask[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + (Sk - Sq))
            s = tl.where(visible, s, float("-inf"))
        if EXACT:
            s = s.to(tl.float64)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = _softmax_exp(s - m_safe[:, None], EXACT)
        alpha = _softmax_exp(m_i - m_safe, EXACT)
        l_i = l_i * alpha + tl.sum(p, 1)
        p_lo = cast(p, v.dtype, UPCAST)
        alpha32 = alpha.to(tl.float32)
        acc = mma(p_lo, v, acc * alpha32[:, None], PREC, UPCAST)
        if HAS_VC:
            vc = tl.load(vc_base + rows[:, None] * RV + offs_rv[None, :], mask=n_mask[:, None] & rv_mask[None, :],
                         other=0.0)                                                                  # (BN, BRV)
            acc_c = mma(p_lo, vc, acc_c * alpha32[:, None], PREC, UPCAST)
        m_i = m_new
    return acc, acc_c, m_i, l_i


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_by_width})
@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, qc_ptr, kc_ptr, vc_ptr, o_ptr, oc_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
    H, GROUP, SEQ_Q, SEQ_K, D, R, RV,
    q_rb, q_rh, q_rs, k_rb, k_rh, k_rs, lse_b, lse_h,
    scale, SQ_BUCKET, SK_BUCKET,
    CAUSAL: tl.constexpr, HAS_C: tl.constexpr, HAS_VC: tl.constexpr, VARLEN: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    (b, h, q_start, Sq, Sk, m0, offs_m, offs_d, offs_r, offs_rv, m_mask, d_mask, r_mask, rv_mask, q_rows,
     k_rows0) = _query_block(cu_q_ptr, cu_k_ptr, H, GROUP, SEQ_Q, SEQ_K, D, R, RV, q_rb, q_rh, q_rs, k_rb, k_rh, k_rs,
                             VARLEN, BLOCK_D, BLOCK_R, BLOCK_RV, BLOCK_M)
    if m0 >= Sq:
        return
    offs_n = tl.arange(0, BLOCK_N)

    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    qc = q
    if HAS_C:
        qc = tl.load(qc_ptr + q_rows[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                     other=0.0)
    if EXACT:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float64)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float64)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_M, BLOCK_RV), dtype=tl.float32)

    # key blocks [0, full_hi): seen in full by every row of the block; [full_hi, hi): masked
    if CAUSAL:
        full_hi = tl.maximum(tl.minimum(Sk, m0 + 1 + Sk - Sq), 0)
        hi = tl.maximum(tl.minimum(Sk, m0 + BLOCK_M + Sk - Sq), 0)
    else:
        full_hi = Sk
        hi = Sk
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    acc, acc_c, m_i, l_i = _fwd_inner(
        acc, acc_c, m_i, l_i, q, qc, k_ptr, v_ptr, kc_ptr, vc_ptr, k_rows0, offs_m, offs_n, offs_d, offs_r,
        offs_rv, d_mask, r_mask, rv_mask, 0, full_hi, Sq, Sk, k_rs, D, R, RV, scale,
        False, CAUSAL, HAS_C, HAS_VC, EXACT, PREC, UPCAST, BLOCK_M, BLOCK_N)
    acc, acc_c, m_i, l_i = _fwd_inner(
        acc, acc_c, m_i, l_i, q, qc, k_ptr, v_ptr, kc_ptr, vc_ptr, k_rows0, offs_m, offs_n, offs_d, offs_r,
        offs_rv, d_mask, r_mask, rv_mask, full_hi, hi, Sq, Sk, k_rs, D, R, RV, scale,
        True, CAUSAL, HAS_C, HAS_VC, EXACT, PREC, UPCAST, BLOCK_M, BLOCK_N)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    if EXACT:
        log_l = _log_f64(l_safe)
    else:
        log_l = tl.log(l_safe)
    lse = tl.where(seen, m_i + log_l, float("-inf"))
    tl.store(lse_ptr + b * lse_b + h * lse_h + q_start + offs_m, lse, mask=m_mask)
    out_ty = o_ptr.dtype.element_ty  # a row that saw no key has acc = 0 and l_safe = 1: zeros
    tl.store(o_ptr + q_rows[:, None] * D + offs_d[None, :], cast(acc / l_safe[:, None], out_ty, UPCAST),
             mask=m_mask[:, None] & d_mask[None, :])
    if HAS_VC:
        tl.store(oc_ptr + q_rows[:, None] * RV + offs_rv[None, :], cast(acc_c / l_safe[:, None], out_ty, UPCAST),
                 mask=m_mask[:, None] & rv_mask[None, :])


@triton.jit
def _bwd_preprocess_kernel(
    o_ptr, do_ptr, oc_ptr, doc_ptr, delta_ptr, cu_q_ptr,
    H, SEQ_Q, D, RV, q_rb, q_rh, q_rs, lse_b, lse_h,
    HAS_VC: tl.constexpr, VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_RV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """16-bit inputs: Delta = rowsum(dO * O) + rowsum(dOc * Oc) in fp32, laid out like lse."""
    pid_bh, pid_m = _program(SEQ_Q, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_start, Sq = _seq(cu_q_ptr, b, SEQ_Q, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Sq
    rows = b * q_rb + h * q_rh + (q_start + offs_m) * q_rs
    offs_d = tl.arange(0, BLOCK_D)
    mask = m_mask[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_VC:
        offs_rv = tl.arange(0, BLOCK_RV)
        mask_c = m_mask[:, None] & (offs_rv < RV)[None, :]
        oc = tl.load(oc_ptr + rows[:, None] * RV + offs_rv[None, :], mask=mask_c, other=0.0).to(tl.float32)
        doc = tl.load(doc_ptr + rows[:, None] * RV + offs_rv[None, :], mask=mask_c, other=0.0).to(tl.float32)
        delta += tl.sum(oc * doc, 1)
    tl.store(delta_ptr + b * lse_b + h * lse_h + q_start + offs_m, delta, mask=m_mask)


@triton.jit
def _probs_and_dscores(s, dp, lse, delta, visible, EXACT: tl.constexpr):
    """P = exp(S - lse) and dS = P * (dP - Delta) on the visible entries (0 elsewhere), in the statistics
    dtype; lse is +inf for a row that sees no key (so its P is 0)."""
    if EXACT:
        s = s.to(tl.float64)
        dp = dp.to(tl.float64)
    p = tl.where(visible, _softmax_exp(s - lse, EXACT), 0.0)
    return p, p * (dp - delta)


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_by_width})
@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, qc_ptr, kc_ptr, vc_ptr, do_ptr, doc_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dkc_ptr, dvc_ptr, cu_q_ptr, cu_k_ptr,
    H, HKV, GROUP, SEQ_Q, SEQ_K, D, R, RV,
    q_rb, q_rh, q_rs, k_rb, k_rh, k_rs, lse_b, lse_h,
    scale, SQ_BUCKET, SK_BUCKET,
    CAUSAL: tl.constexpr, HAS_C: tl.constexpr, HAS_VC: tl.constexpr, VARLEN: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv, dk_c, dv_c of one key block of one kv head, summed over the query heads of its group."""
    pid_bhk, pid_n = _program(SEQ_K, BLOCK_N)
    b = (pid_bhk // HKV).to(tl.int64)
    hk = (pid_bhk % HKV).to(tl.int64)
    q_start, Sq = _seq(cu_q_ptr, b, SEQ_Q, VARLEN)
    k_start, Sk = _seq(cu_k_ptr, b, SEQ_K, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= Sk:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_rv = tl.arange(0, BLOCK_RV)
    n_mask = offs_n < Sk
    d_mask = offs_d < D
    r_mask = offs_r < R
    rv_mask = offs_rv < RV
    k_rows = b * k_rb + hk * k_rh + (k_start + offs_n) * k_rs
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + k_rows[:, None] * D + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(v_ptr + k_rows[:, None] * D + offs_d[None, :], mask=nd_mask, other=0.0)
    kc = k
    vc = v
    if HAS_C:
        kc = tl.load(kc_ptr + k_rows[:, None] * R + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
    if HAS_VC:
        vc = tl.load(vc_ptr + k_rows[:, None] * RV + offs_rv[None, :], mask=n_mask[:, None] & rv_mask[None, :],
                     other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dkc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    dvc = tl.zeros((BLOCK_N, BLOCK_RV), dtype=tl.float32)
    in_ty = k.dtype

    lo = 0
    if CAUSAL:  # the first query row that sees key n0
        lo = tl.maximum(n0 + Sq - Sk, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        for m0 in range(lo, Sq, BLOCK_M):
            offs_m = m0 + offs_mb
            m_mask = offs_m < Sq
            q_rows = b * q_rb + h * q_rh + (q_start + offs_m) * q_rs
            md_mask = m_mask[:, None] & d_mask[None, :]
            q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=md_mask, other=0.0)
            do = tl.load(do_ptr + q_rows[:, None] * D + offs_d[None, :], mask=md_mask, other=0.0)
            stat = b * lse_b + h * lse_h + q_start + offs_m
            lse = tl.load(lse_ptr + stat, mask=m_mask, other=0.0)
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(delta_ptr + stat, mask=m_mask, other=0.0)
            qc = q
            if HAS_C:
                qc = tl.load(qc_ptr + q_rows[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                             other=0.0)
            st = _scores(k, tl.trans(q), kc, tl.trans(qc), scale, HAS_C, PREC, UPCAST, BLOCK_N, BLOCK_M)  # S^T
            dpt = mma(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), PREC, UPCAST)
            doc = do
            if HAS_VC:
                doc = tl.load(doc_ptr + q_rows[:, None] * RV + offs_rv[None, :],
                              mask=m_mask[:, None] & rv_mask[None, :], other=0.0)
                dpt = mma(vc, tl.trans(doc), dpt, PREC, UPCAST)
            visible = n_mask[:, None] & m_mask[None, :]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + (Sk - Sq))
            pt, dst = _probs_and_dscores(st, dpt, lse[None, :], delta[None, :], visible, EXACT)
            pt_lo = cast(pt, in_ty, UPCAST)
            dst_lo = cast(dst, in_ty, UPCAST)
            dv = mma(pt_lo, do, dv, PREC, UPCAST)
            dk = mma(dst_lo, q, dk, PREC, UPCAST)
            if HAS_VC:
                dvc = mma(pt_lo, doc, dvc, PREC, UPCAST)
            if HAS_C:
                dkc = mma(dst_lo, qc, dkc, PREC, UPCAST)

    out_ty = dk_ptr.dtype.element_ty
    tl.store(dk_ptr + k_rows[:, None] * D + offs_d[None, :], cast(dk * scale, out_ty, UPCAST), mask=nd_mask)
    tl.store(dv_ptr + k_rows[:, None] * D + offs_d[None, :], cast(dv, out_ty, UPCAST), mask=nd_mask)
    if HAS_C:
        tl.store(dkc_ptr + k_rows[:, None] * R + offs_r[None, :], cast(dkc, out_ty, UPCAST),
                 mask=n_mask[:, None] & r_mask[None, :])
    if HAS_VC:
        tl.store(dvc_ptr + k_rows[:, None] * RV + offs_rv[None, :], cast(dvc, out_ty, UPCAST),
                 mask=n_mask[:, None] & rv_mask[None, :])


@triton.jit
def _dq_tile(q, qc, do, doc, k_ptr, v_ptr, kc_ptr, vc_ptr, k_rows0, n0, offs_nb, offs_m, offs_d, offs_r, offs_rv,
             m_mask, d_mask, r_mask, rv_mask, Sq, Sk, k_rs, D, R, RV, scale,
             CAUSAL: tl.constexpr, HAS_C: tl.constexpr, HAS_VC: tl.constexpr, PREC: tl.constexpr,
             UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block seen from a query block: S and dP (BM, BN) in fp32, the visibility mask, k and k_c."""
    offs_n = n0 + offs_nb
    n_mask = offs_n < Sk
    k_rows = k_rows0 + offs_n * k_rs
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + k_rows[:, None] * D + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(v_ptr + k_rows[:, None] * D + offs_d[None, :], mask=nd_mask, other=0.0)
    kc = k
    if HAS_C:
        kc = tl.load(kc_ptr + k_rows[:, None] * R + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
    s = _scores(q, tl.trans(k), qc, tl.trans(kc), scale, HAS_C, PREC, UPCAST, BLOCK_M, BLOCK_N)
    dp = mma(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC, UPCAST)
    if HAS_VC:
        vc = tl.load(vc_ptr + k_rows[:, None] * RV + offs_rv[None, :], mask=n_mask[:, None] & rv_mask[None, :],
                     other=0.0)
        dp = mma(doc, tl.trans(vc), dp, PREC, UPCAST)
    visible = m_mask[:, None] & n_mask[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + (Sk - Sq))
    return s, dp, visible, k, kc


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_by_width})
@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, qc_ptr, kc_ptr, vc_ptr, do_ptr, doc_ptr, lse_ptr, delta_ptr,
    dq_ptr, dqc_ptr, cu_q_ptr, cu_k_ptr,
    H, GROUP, SEQ_Q, SEQ_K, D, R, RV,
    q_rb, q_rh, q_rs, k_rb, k_rh, k_rs, lse_b, lse_h,
    scale, SQ_BUCKET, SK_BUCKET,
    CAUSAL: tl.constexpr, HAS_C: tl.constexpr, HAS_VC: tl.constexpr, VARLEN: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq, dq_c of one query block of one head, looping over the key blocks it sees. EXACT: a first sweep
    computes Delta = rowsum(P * dP) in float64 from the same fp32 dP as the second (their rounding errors
    cancel in dP - Delta, which Delta = rowsum(dO * O) would not give) and stores it for the dk/dv kernel."""
    (b, h, q_start, Sq, Sk, m0, offs_m, offs_d, offs_r, offs_rv, m_mask, d_mask, r_mask, rv_mask, q_rows,
     k_rows0) = _query_block(cu_q_ptr, cu_k_ptr, H, GROUP, SEQ_Q, SEQ_K, D, R, RV, q_rb, q_rh, q_rs, k_rb, k_rh, k_rs,
                             VARLEN, BLOCK_D, BLOCK_R, BLOCK_RV, BLOCK_M)
    if m0 >= Sq:
        return
    offs_nb = tl.arange(0, BLOCK_N)
    md_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(do_ptr + q_rows[:, None] * D + offs_d[None, :], mask=md_mask, other=0.0)
    qc = q
    doc = do
    if HAS_C:
        qc = tl.load(qc_ptr + q_rows[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    if HAS_VC:
        doc = tl.load(doc_ptr + q_rows[:, None] * RV + offs_rv[None, :], mask=m_mask[:, None] & rv_mask[None, :],
                      other=0.0)
    stat = b * lse_b + h * lse_h + q_start + offs_m
    lse = tl.load(lse_ptr + stat, mask=m_mask, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    hi = Sk
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Sk, m0 + BLOCK_M + Sk - Sq), 0)

    if EXACT:
        delta = tl.zeros((BLOCK_M,), dtype=tl.float64)
        for n0 in range(0, hi, BLOCK_N):
            s, dp, visible, k, kc = _dq_tile(
                q, qc, do, doc, k_ptr, v_ptr, kc_ptr, vc_ptr, k_rows0, n0, offs_nb, offs_m, offs_d, offs_r, offs_rv,
                m_mask, d_mask, r_mask, rv_mask, Sq, Sk, k_rs, D, R, RV, scale,
                CAUSAL, HAS_C, HAS_VC, PREC, UPCAST, BLOCK_M, BLOCK_N)
            p = tl.where(visible, _exp_f64(s.to(tl.float64) - lse[:, None]), 0.0)
            delta += tl.sum(p * dp.to(tl.float64), 1)
        tl.store(delta_ptr + stat, delta, mask=m_mask)
    else:
        delta = tl.load(delta_ptr + stat, mask=m_mask, other=0.0)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dqc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        s, dp, visible, k, kc = _dq_tile(
            q, qc, do, doc, k_ptr, v_ptr, kc_ptr, vc_ptr, k_rows0, n0, offs_nb, offs_m, offs_d, offs_r, offs_rv,
            m_mask, d_mask, r_mask, rv_mask, Sq, Sk, k_rs, D, R, RV, scale,
            CAUSAL, HAS_C, HAS_VC, PREC, UPCAST, BLOCK_M, BLOCK_N)
        _, ds = _probs_and_dscores(s, dp, lse[:, None], delta[:, None], visible, EXACT)
        ds_lo = cast(ds, q.dtype, UPCAST)
        dq = mma(ds_lo, k, dq, PREC, UPCAST)
        if HAS_C:
            dqc = mma(ds_lo, kc, dqc, PREC, UPCAST)

    out_ty = dq_ptr.dtype.element_ty
    tl.store(dq_ptr + q_rows[:, None] * D + offs_d[None, :], cast(dq * scale, out_ty, UPCAST), mask=md_mask)
    if HAS_C:
        tl.store(dqc_ptr + q_rows[:, None] * R + offs_r[None, :], cast(dqc, out_ty, UPCAST),
                 mask=m_mask[:, None] & r_mask[None, :])


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------


class _Geometry:
    """Sizes, row-unit strides and constexpr flags of one call (see the module docstring)."""

    def __init__(self, q, k, q_c, v_c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        self.varlen = cu_seqlens_q is not None
        self.queries_token_major = not self.varlen and is_token_major(q)
        self.keys_token_major = not self.varlen and is_token_major(k)
        if self.varlen:
            total_q, self.H, self.D = q.shape
            self.Hkv = k.shape[1]
            self.B = cu_seqlens_q.numel() - 1
            self.Sq, self.Sk = int(max_seqlen_q), int(max_seqlen_k)
            self.q_rows = (0, 1, self.H)
            self.k_rows = (0, 1, self.Hkv)
            self.lse_shape, self.lse_strides = (self.H, total_q), (0, total_q)
            self.cu_q, self.cu_k = cu_seqlens_q, cu_seqlens_k
        else:
            self.B, self.H, self.Sq, self.D = q.shape
            self.Hkv, self.Sk = k.shape[1], k.shape[2]
            self.q_rows = _dense_rows(self.H, self.Sq, self.queries_token_major)
            self.k_rows = _dense_rows(self.Hkv, self.Sk, self.keys_token_major)
            self.lse_shape, self.lse_strides = (self.B, self.H, self.Sq), (self.H * self.Sq, self.Sq)
            self.cu_q = self.cu_k = q  # never read
        self.has_c, self.has_vc = q_c is not None, v_c is not None
        self.R = q_c.shape[-1] if self.has_c else 0
        self.RV = v_c.shape[-1] if self.has_vc else 0
        self.exact = q.dtype == torch.float32
        self.stat_dtype = torch.float64 if self.exact else torch.float32
        self.flags = dict(
            CAUSAL=bool(causal), HAS_C=self.has_c, HAS_VC=self.has_vc, VARLEN=self.varlen, EXACT=self.exact,
            BLOCK_D=block_width(self.D), BLOCK_R=block_width(self.R), BLOCK_RV=block_width(self.RV),
            PREC=dot_precision(q.dtype), UPCAST=INTERPRET,
        )

    def sizes(self):
        return (self.Sq, self.Sk, self.D, self.R, self.RV)

    def strides(self):
        return (*self.q_rows, *self.k_rows, *self.lse_strides)


def _dense_rows(heads, S, token_major):
    """(row_b, row_h, row_s) of a dense side (see the module docstring)."""
    return (S * heads, 1, heads) if token_major else (heads * S, S, 1)


def _grid(heads, rows, block):
    """The launch grid of ``heads`` (batch x heads) sequences of ``rows`` rows in blocks of ``block``: one axis,
    read by ``_program``."""
    return (heads * triton.cdiv(rows, block),)


def _check(g, q, k, v, q_c, k_c, v_c):
    """The inputs are of one supported dtype and each side in its layout (contiguous, or token-major)."""
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), "triton: float32 / float16 / bfloat16"
    for side, token_major in (((q, q_c), g.queries_token_major), ((k, v, k_c, v_c), g.keys_token_major)):
        for t in side:
            assert t is None or (t.dtype == q.dtype and in_layout(t, token_major) is t), (
                "triton: inputs of one dtype, each side contiguous or token-major")
    assert (q_c is None) == (k_c is None) and 1 <= q.shape[-1] <= MAX_HEAD_DIM


def _forward(q, k, v, q_c, k_c, v_c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    g = _Geometry(q, k, q_c, v_c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    _check(g, q, k, v, q_c, k_c, v_c)
    out = empty_in_layout(q, g.D, g.queries_token_major)
    out_c = empty_in_layout(q, g.RV, g.queries_token_major) if g.has_vc else q.new_empty(0)
    lse = torch.empty(g.lse_shape, dtype=g.stat_dtype, device=q.device)
    if out.numel() == 0 or g.Sq == 0:
        lse.fill_(float("-inf"))
        return out, out_c, lse
    none = q  # stands for an absent tensor; never read

    _fwd_kernel[lambda meta: _grid(g.B * g.H, g.Sq, meta["BLOCK_M"])](
        q, k, v, q_c if g.has_c else none, k_c if g.has_c else none, v_c if g.has_vc else none,
        out, out_c if g.has_vc else none, lse, g.cu_q, g.cu_k,
        g.H, g.H // g.Hkv, *g.sizes(), *g.strides(), float(scale), bucket(g.Sq), bucket(g.Sk), **g.flags,
    )
    return out, out_c, lse


def _backward(grad_out, grad_out_c, q, k, v, q_c, k_c, v_c, out, out_c, lse,
              cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    g = _Geometry(q, k, q_c, v_c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    _check(g, q, k, v, q_c, k_c, v_c)
    grad_out = in_layout(grad_out, g.queries_token_major)  # addressed by q's rows
    grad_out_c = in_layout(grad_out_c, g.queries_token_major) if g.has_vc else None
    # Every row of every gradient is written by some program, but with no query or no key nothing runs.
    degenerate = q.numel() == 0 or k.numel() == 0 or g.Sq == 0 or g.Sk == 0
    new = torch.zeros_like if degenerate else torch.empty_like
    dq, dk, dv = new(q), new(k), new(v)
    dq_c = new(q_c) if g.has_c else q.new_empty(0)
    dk_c = new(k_c) if g.has_c else q.new_empty(0)
    dv_c = new(v_c) if g.has_vc else q.new_empty(0)
    if degenerate:
        return dq, dk, dv, dq_c, dk_c, dv_c

    none = q
    delta = torch.empty(g.lse_shape, dtype=g.stat_dtype, device=q.device)
    if not g.exact:  # 16-bit: FlashAttention's Delta = rowsum(dO * O); float32: the dq kernel computes it
        pre_m = 16 if INTERPRET else 64
        _bwd_preprocess_kernel[_grid(g.B * g.H, g.Sq, pre_m)](
            out, grad_out, out_c if g.has_vc else none, grad_out_c if g.has_vc else none, delta, g.cu_q,
            g.H, g.Sq, g.D, g.RV, *g.q_rows, *g.lse_strides,
            HAS_VC=g.has_vc, VARLEN=g.varlen, BLOCK_D=g.flags["BLOCK_D"], BLOCK_RV=g.flags["BLOCK_RV"], BLOCK_M=pre_m,
        )
    inputs = (q, k, v, q_c if g.has_c else none, k_c if g.has_c else none, v_c if g.has_vc else none,
              grad_out, grad_out_c if g.has_vc else none, lse, delta)
    tail = (*g.sizes(), *g.strides(), float(scale), bucket(g.Sq), bucket(g.Sk))
    _bwd_dq_kernel[lambda meta: _grid(g.B * g.H, g.Sq, meta["BLOCK_M"])](
        *inputs, dq, dq_c if g.has_c else none, g.cu_q, g.cu_k,
        g.H, g.H // g.Hkv, *tail, **g.flags,
    )
    _bwd_dkdv_kernel[lambda meta: _grid(g.B * g.Hkv, g.Sk, meta["BLOCK_N"])](
        *inputs, dk, dv, dk_c if g.has_c else none, dv_c if g.has_vc else none, g.cu_q, g.cu_k,
        g.H, g.Hkv, g.H // g.Hkv, *tail, **g.flags,
    )
    return dq, dk, dv, dq_c, dk_c, dv_c


# ----------------------------------------------------------------------------------------------------
# the backend interface
# ----------------------------------------------------------------------------------------------------


def forward(
    q: Tensor, k: Tensor, v: Tensor, q_c: Optional[Tensor], k_c: Optional[Tensor], v_c: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
    causal: bool, scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, out_c, lse) in the layouts of the module docstring (cu_seqlens None: dense)."""
    with device_guard(q):
        return _forward(q, k, v, q_c, k_c, v_c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)


def backward(
    grad_out: Tensor, grad_out_c: Tensor, q: Tensor, k: Tensor, v: Tensor,
    q_c: Optional[Tensor], k_c: Optional[Tensor], v_c: Optional[Tensor], out: Tensor, out_c: Tensor, lse: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
    causal: bool, scale: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dq_c, dk_c, dv_c), each in its input's dtype and layout (``empty(0)`` for an absent
    correction); key-side gradients summed over the query heads of each group."""
    with device_guard(q):
        return _backward(grad_out, grad_out_c, q, k, v, q_c, k_c, v_c, out, out_c, lse,
                         cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
