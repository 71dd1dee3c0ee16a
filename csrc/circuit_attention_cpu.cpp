// circuit_attention, CPU backend (ATen + OpenMP through at::parallel_for).
//
//   S = scale * q @ k^T + q_c @ k_c^T,   P = softmax(S) (bottom-right causal mask),   out = P v,   out_c = P v_c
//
// Design (FlashAttention-2 on the CPU; memory linear in the sequence lengths, never an Sq x Sk matrix).
// * Layouts: dense (B, heads, S, width) and packed (total, heads, width) with cu_seqlens are one case: row
//   (b, head, i) of any tensor of a side is row b * rb + head * rh + (start[b] + i) * rs of that tensor seen
//   as (rows, width) (struct Rows). Grouped-query heads index their kv head (no repeat).
// * Forward: one work item per (sequence, head, kFwdGroup blocks of kBlk query rows); per item a loop over the
//   key blocks its rows see, each key block serving the item's query blocks in turn, with an online
//   softmax. Every key block (and its k_c rows) is transposed once per call into a width x kBlk tile
//   (BlockTiles) so that score tiles are built by register-blocked rank-1 updates (vectorised); q_c . k_c^T
//   is added in the same pass and out / out_c accumulate side by side. A row that sees no key gets zeros
//   and lse = -inf. The backward transposes v, v_c, q, q_c, dO, dO_c likewise.
// * Precision: dots in the accumulator dtype (float; double for double inputs). The softmax arguments are
//   formed exactly (a score minus the running max, itself a score) or in double (a score minus lse) and
//   exponentiated in the accumulator dtype to about an ulp; the running max, sum and lse, Delta and
//   dP - Delta are double. Delta = rowsum(P * dP) is computed from the same rounded dP as dS: their rounding
//   errors cancel in dP - Delta (Delta = rowsum(dO * out) would not give that).
// * Backward: per step of kBwdRows query rows, sweep 1 forms the P and dP tiles of every key block the rows
//   see (kept: memory O(kBwdRows * Sk) per thread) and sums Delta; sweep 2 forms dS and dq / dq_c. The fused
//   backward runs one item per (sequence, kv head) over the group's query heads and also adds dv += P^T dO,
//   dk += dS^T q (and the corrections') into the key rows the item owns: five tile products per tile. With
//   fewer (sequence, kv head) pairs than threads the split backward runs instead: the dq items per
//   (sequence, head, query block), then a dk / dv / dk_c / dv_c pass per (sequence, kv head, key block) that
//   forms S^T and dP^T again (seven products, but B * H * Sq / kBlk items). Each gradient row is written by
//   one thread either way: no atomics, no races.
// * exp: a vectorisable polynomial (Cody-Waite reduction; degree 11 for double, 7 for float); log once per
//   row. The softmax loops carry `omp simd` so that their max / sum reductions vectorise (GCC keeps FP
//   reductions scalar otherwise: it may not reorder them).
// * x86: the item loops are compiled for AVX-512, AVX2+FMA and the baseline ISA, picked at run time
//   (cpu_dispatch.h).
// * bfloat16 / float16: inputs upcast to float once (linear memory), results rounded once.
#include "ops_cpu.h"
#include "cpu_dispatch.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace recursive_kernels {
namespace cpu {
namespace {

using at::Tensor;

// Tile width (query rows per block and keys per block); score tiles are kBlk x kBlk.
constexpr int64_t kBlk = 64;
// Register-blocked micro-kernels: 4 rows x kW columns of accumulators (8 AVX-512 or 16 AVX2 registers).
constexpr int64_t kW = 32;
// Query blocks per forward work item: each key block's tiles are read once for all of them (halves the
// k / v traffic from beyond L2 at long sequences).
constexpr int64_t kFwdGroup = 2;
// Query rows per step of the backward: it keeps the P and dP tiles of a step's whole key range (2 * kBwdRows * Sk
// values), which 32 rows keep in a 1 MiB L2 up to Sk = 2048 (64 rows ran 10% slower there).
constexpr int64_t kBwdRows = 32;
constexpr double kInf = std::numeric_limits<double>::infinity();

// exp(x) for x <= 0 (a tiny positive x from rounding is fine) to about an ulp of T; 0 below the smallest
// normal result and for -inf; NaN stays NaN. Cody-Waite reduction to |r| <= ln2 / 2, then a Taylor polynomial
// (degree 11 for double, 7 for float: the float exp costs about a third of the double one per element).
// Branch-free (the clamp and the zero are bit masks) so that the loops calling it vectorise: GCC leaves a
// select on doubles as control flow for AVX2 and then gives up on the loop.
template <typename T>
RK_INLINE T exp_nonpositive(T x) {
  constexpr bool is_double = std::is_same_v<T, double>;
  using Bits = std::conditional_t<is_double, int64_t, int32_t>;
  constexpr T kMin = is_double ? T(-708.0) : T(-87.0);
  constexpr T kShifter = is_double ? T(6755399441055744.0) : T(12582912.0);  // 1.5 * 2^mantissa bits
  constexpr T kLn2Hi = is_double ? T(0.6931471803691238) : T(0.693359375);
  constexpr T kLn2Lo = is_double ? T(1.9082149292705877e-10) : T(-2.12194440e-4);
  constexpr int kMantissa = is_double ? 52 : 23;
  constexpr Bits kBias = is_double ? 1023 : 127;
  const Bits keep = -static_cast<Bits>(!(x < kMin));  // all ones, or zero below kMin
  x = __builtin_bit_cast(T, (__builtin_bit_cast(Bits, x) & keep) | (__builtin_bit_cast(Bits, kMin) & ~keep));
  const T t = x * T(1.4426950408889634) + kShifter;  // adding the shifter rounds to an integer
  const T n = t - kShifter;
  const T r = (x - n * kLn2Hi) - n * kLn2Lo;
  T p;
  if constexpr (is_double) {
    p = 2.505210838544172e-08;
    p = p * r + 2.755731922398589e-07;
    p = p * r + 2.7557319223985893e-06;
    p = p * r + 2.48015873015873e-05;
    p = p * r + 0.0001984126984126984;
  } else {
    p = T(0.0001984126984126984);
  }
  p = p * r + T(0.001388888888888889);
  p = p * r + T(0.008333333333333333);
  p = p * r + T(0.041666666666666664);
  p = p * r + T(0.16666666666666666);
  p = p * r + T(0.5);
  p = p * r + T(1.0);
  p = p * r + T(1.0);
  // Bit casts as builtins (not memcpy through locals) so that the loops calling this still vectorise.
  const Bits exponent_bits =  // the low bits of t hold n
      (__builtin_bit_cast(Bits, t) - __builtin_bit_cast(Bits, kShifter) + kBias) << kMantissa;
  return p * __builtin_bit_cast(T, exponent_bits & keep);  // 2^n, or 0 below kMin
}

// dst (K x kBlk) = rows [0, rows) of src (row j at src + j * ld, K long) transposed; columns >= rows zeroed.
template <typename T>
RK_INLINE void transpose_rows(T* __restrict dst, const T* __restrict src, int64_t rows, int64_t ld, int64_t K) {
  for (int64_t d = 0; d < K; ++d) {
    T* out = dst + d * kBlk;
    for (int64_t j = 0; j < rows; ++j) out[j] = src[j * ld + d];
    for (int64_t j = rows; j < kBlk; ++j) out[j] = T(0);
  }
}

// The register-blocked micro-kernel of every tile product: for r < rows,
//   out[r * ldo + 0:W] = (accumulate ? out[r * ldo + 0:W] : 0) + alpha * sum_{d < K} a[r][d * AStep] * b[d * ldb + 0:W]
// (AStep = kBlk reads the rows of A from the columns of a kBlk-wide tile: products with a transposed tile need
// no transpose). Four rows of W accumulators; `omp simd` keeps GCC vectorising along the W columns (it
// otherwise picks the d loop for some W and spills). alpha multiplies the finished dot (one rounding, as the
// eager scale * (q @ k^T)).
template <int64_t W, int64_t AStep, typename T>
RK_INLINE void microkernel(T* __restrict out, int64_t ldo, int rows, const T* const* a, int64_t K,
                           const T* __restrict b, int64_t ldb, T alpha, bool accumulate) {
  T acc[4][W] = {};
  for (int64_t d = 0; d < K; ++d) {
    const T* bd = b + d * ldb;
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const T x = a[r][d * AStep];
#pragma omp simd
      for (int64_t jj = 0; jj < W; ++jj) acc[r][jj] += x * bd[jj];
    }
  }
  for (int r = 0; r < rows; ++r) {
    T* o = out + r * ldo;
    for (int64_t jj = 0; jj < W; ++jj) o[jj] = (accumulate ? o[jj] : T(0)) + alpha * acc[r][jj];
  }
}

// Columns [n0, N) of four rows by micro-kernels of widths W, W / 2, ..., 1 (all but the widest run at most once).
template <int64_t W, int64_t AStep, typename T>
RK_INLINE void microkernel_columns(T* __restrict out, int64_t ldo, int rows, const T* const* a, int64_t K,
                                   const T* __restrict b, int64_t ldb, T alpha, bool accumulate, int64_t n0,
                                   int64_t N) {
  for (; n0 + W <= N; n0 += W) microkernel<W, AStep>(out + n0, ldo, rows, a, K, b + n0, ldb, alpha, accumulate);
  if constexpr (W > 1) microkernel_columns<W / 2, AStep>(out, ldo, rows, a, K, b, ldb, alpha, accumulate, n0, N);
}

// C[i, 0:N] (+)= alpha * sum_{d < K} A[i, d] B[d, 0:N] for i < M: C row i at C + i * ldc, A[i, d] at
// A + i * lda + d * AStep, B row d at B + d * ldb. Rows past M are computed on a clamped row and not stored.
template <int64_t AStep = 1, typename T>
RK_INLINE void tile_mm(T* __restrict C, int64_t ldc, int64_t M, int64_t N, const T* __restrict A, int64_t lda,
                       int64_t K, const T* __restrict B, int64_t ldb, T alpha, bool accumulate) {
  for (int64_t i = 0; i < M; i += 4) {
    const T* a[4];
    for (int r = 0; r < 4; ++r) a[r] = A + std::min<int64_t>(i + r, M - 1) * lda;
    const int rows = static_cast<int>(std::min<int64_t>(4, M - i));
    microkernel_columns<kW, AStep>(C + i * ldc, ldc, rows, a, K, B, ldb, alpha, accumulate, 0, N);
  }
}

// S[i, 0:kBlk] (+)= alpha * (A[i, :] . Bt[:, 0:kBlk]) for i < M; row i of A at A + i * lda, K long; Bt
// (K x kBlk), the other operand transposed.
template <typename T>
RK_INLINE void tile_nt(T* __restrict S, int64_t M, const T* __restrict A, int64_t lda, int64_t K,
                       const T* __restrict Bt, T alpha, bool accumulate) {
  tile_mm(S, kBlk, M, kBlk, A, lda, K, Bt, kBlk, alpha, accumulate);
}

// C[i, :] += alpha * sum_{j < ncols} P[i, j] X[j, :] for i < M; C (M x N) contiguous, P (M x kBlk),
// row j of X at X + j * ldx, N long.
template <typename T>
RK_INLINE void tile_acc(T* __restrict C, int64_t M, int64_t N, const T* __restrict P, int64_t ncols,
                        const T* __restrict X, int64_t ldx, T alpha) {
  tile_mm(C, N, M, N, P, kBlk, ncols, X, ldx, alpha, true);
}

// C[j, :] += alpha * sum_{i < nrows} P[i, j] X[i, :] for j < N: the transposed tile P (nrows x kBlk) times X;
// row j of C at C + j * ldc, row i of X at X + i * ldx, width columns.
template <typename T>
RK_INLINE void tile_acc_transposed(T* __restrict C, int64_t ldc, int64_t N, int64_t width, const T* __restrict P,
                                   int64_t nrows, const T* __restrict X, int64_t ldx, T alpha) {
  tile_mm<kBlk>(C, ldc, N, width, P, 1, nrows, X, ldx, alpha, true);
}

// The rows of one side of the problem (query side: q, q_c, out, out_c and their gradients; key side: k, v,
// k_c, v_c and theirs; statistics: lse and Delta): row(b, head, i) of a (rows, width) tensor.
struct Rows {
  int64_t rb, rh, rs;
  const int64_t* start;  // per sequence
  const int64_t* len;    // per sequence
  RK_INLINE int64_t row(int64_t b, int64_t head, int64_t i) const { return b * rb + head * rh + (start[b] + i) * rs; }
};

// The rows of one side transposed per block of kBlk rows: the tile of (sequence b, head, block t) is
// width x kBlk, zero-padded past the sequence: the right operand of tile_nt. Built once per call so that the
// (query block, key block) loops do no strided transposes (memory: about the size of the side).
template <typename T>
struct BlockTiles {
  const T* data;
  const int64_t* first_block;  // per sequence: the blocks of the sequences before it
  int64_t heads, width;
  RK_INLINE const T* tile(int64_t b, int64_t head, int64_t t) const {
    return data + ((first_block[b] + t) * heads + head) * width * kBlk;
  }
};

template <typename T>
struct Problem {
  int64_t B, H, Hkv, group, D, R, Rv, nqb, nkb;  // nqb / nkb: blocks of the longest sequences
  bool causal;
  T scale;
  Rows qs, ks, stats;
  const T *q, *k, *v, *qc, *kc, *vc;
  BlockTiles<T> kT, kcT;  // kcT.data null without corrections
};

// Keys [0, end) of a sequence that its query row i sees.
RK_INLINE int64_t visible_end(bool causal, int64_t Sq, int64_t Sk, int64_t i) {
  if (!causal) return Sk;
  return std::max<int64_t>(0, std::min<int64_t>(Sk, i + Sk - Sq + 1));
}

// Work item `item` of the query-block passes: (sequence b, head h, query rows [i0, i0 + M)) with the
// sequence's lengths and the first rows of the block and of its kv head's keys; M <= 0 past the sequence.
struct QueryBlock {
  int64_t b, h, Sq, Sk, i0, M, qrow, krow;
};

template <typename T>
RK_INLINE QueryBlock query_block(const Problem<T>& g, int64_t item) {
  const int64_t bh = item / g.nqb, b = bh / g.H, h = bh % g.H;
  const int64_t Sq = g.qs.len[b], i0 = (item % g.nqb) * kBlk;
  return {b, h, Sq, g.ks.len[b], i0, std::min(kBlk, Sq - i0), g.qs.row(b, h, i0), g.ks.row(b, h / g.group, 0)};
}

// ---------------------------------------------------------------------------------------------------
// Forward.

template <typename T>
struct FwdOut {
  T* out;       // like q, width D
  T* outc;      // like q, width Rv, or null
  double* lse;  // statistics rows
};

template <typename T>
RK_INLINE void fwd_items(const Problem<T>& g, const FwdOut<T>& o, int64_t begin, int64_t end) {
  const int64_t D = g.D, R = g.R, Rv = g.Rv, Rv1 = std::max<int64_t>(Rv, 1);
  std::vector<T> s(kBlk * kBlk), acc(kFwdGroup * kBlk * D), accc(kFwdGroup * kBlk * Rv1);
  double m[kFwdGroup][kBlk], l[kFwdGroup][kBlk];
  const int64_t groups = (g.nqb + kFwdGroup - 1) / kFwdGroup;  // items per (sequence, head)
  for (int64_t item = begin; item < end; ++item) {
    // The item's query blocks: their 64-row work items in the query_block() numbering, and what they see.
    QueryBlock blk[kFwdGroup];
    int64_t kend[kFwdGroup], item_kend = 0;
    for (int64_t sub = 0; sub < kFwdGroup; ++sub) {
      const int64_t t = (item % groups) * kFwdGroup + sub;
      blk[sub] = query_block(g, (item / groups) * g.nqb + std::min(t, g.nqb - 1));
      if (t >= g.nqb) blk[sub].M = 0;
      kend[sub] = blk[sub].M > 0 ? visible_end(g.causal, blk[sub].Sq, blk[sub].Sk, blk[sub].i0 + blk[sub].M - 1) : 0;
      item_kend = std::max(item_kend, kend[sub]);
      std::fill(acc.begin() + sub * kBlk * D, acc.begin() + (sub + 1) * kBlk * D, T(0));
      std::fill(accc.begin() + sub * kBlk * Rv1, accc.begin() + (sub + 1) * kBlk * Rv1, T(0));
      for (int64_t i = 0; i < kBlk; ++i) m[sub][i] = -kInf, l[sub][i] = 0.0;
    }
    const int64_t b = blk[0].b, h = blk[0].h, Sq = blk[0].Sq, Sk = blk[0].Sk, krow = blk[0].krow;
    const int64_t lq = g.qs.rs, lk = g.ks.rs, kv_head = h / g.group;
    // Key blocks outside, query blocks inside: a key block's tiles are read once per item, not per block.
    for (int64_t j0 = 0; j0 < item_kend; j0 += kBlk) {
      const int64_t t = j0 / kBlk, row0 = krow + j0 * lk;
      for (int64_t sub = 0; sub < kFwdGroup; ++sub) {
        if (j0 >= kend[sub]) continue;
        const int64_t M = blk[sub].M, i0 = blk[sub].i0, qrow = blk[sub].qrow, N = std::min(kBlk, kend[sub] - j0);
        T* acc_sub = acc.data() + sub * kBlk * D;
        T* accc_sub = accc.data() + sub * kBlk * Rv1;
        tile_nt(s.data(), M, g.q + qrow * D, lq * D, D, g.kT.tile(b, kv_head, t), g.scale, false);
        if (R) tile_nt(s.data(), M, g.qc + qrow * R, lq * R, R, g.kcT.tile(b, kv_head, t), T(1), true);
        for (int64_t i = 0; i < M; ++i) {
          T* srow = s.data() + i * kBlk;
          const int64_t vis = std::min<int64_t>(N, visible_end(g.causal, Sq, Sk, i0 + i) - j0);
          if (vis <= 0) {
            std::fill(srow, srow + kBlk, T(0));
            continue;
          }
          T row_max = srow[0];
#pragma omp simd reduction(max : row_max)
          for (int64_t j = 1; j < vis; ++j) row_max = srow[j] > row_max ? srow[j] : row_max;
          const double mx = std::max(m[sub][i], static_cast<double>(row_max));
          const double alpha = exp_nonpositive(m[sub][i] - mx);  // m = -inf: 0
          const T shift = static_cast<T>(mx);  // exact: mx is one of the scores
          T sum = 0;  // of at most kBlk terms; l accumulates in double
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < vis; ++j) {
            const T p = exp_nonpositive(srow[j] - shift);
            srow[j] = p;
            sum += p;
          }
          std::fill(srow + vis, srow + kBlk, T(0));
          l[sub][i] = l[sub][i] * alpha + sum;
          m[sub][i] = mx;
          if (alpha != 1.0) {
            const T a = static_cast<T>(alpha);
            for (int64_t d = 0; d < D; ++d) acc_sub[i * D + d] *= a;
            for (int64_t d = 0; d < Rv; ++d) accc_sub[i * Rv + d] *= a;
          }
        }
        tile_acc(acc_sub, M, D, s.data(), N, g.v + row0 * D, lk * D, T(1));
        if (Rv) tile_acc(accc_sub, M, Rv, s.data(), N, g.vc + row0 * Rv, lk * Rv, T(1));
      }
    }
    for (int64_t sub = 0; sub < kFwdGroup; ++sub) {
      const T* acc_sub = acc.data() + sub * kBlk * D;
      const T* accc_sub = accc.data() + sub * kBlk * Rv1;
      for (int64_t i = 0; i < blk[sub].M; ++i) {
        const bool none = !(l[sub][i] > 0.0);
        const double inv = none ? 0.0 : 1.0 / l[sub][i];
        const int64_t row = blk[sub].qrow + i * lq;
        o.lse[g.stats.row(b, h, blk[sub].i0 + i)] = none ? -kInf : m[sub][i] + std::log(l[sub][i]);
        for (int64_t d = 0; d < D; ++d) o.out[row * D + d] = static_cast<T>(acc_sub[i * D + d] * inv);
        for (int64_t d = 0; d < Rv; ++d) o.outc[row * Rv + d] = static_cast<T>(accc_sub[i * Rv + d] * inv);
      }
    }
  }
}

struct ForwardPass {
  template <typename T>
  RK_INLINE static void run(const Problem<T>& g, const FwdOut<T>& o, int64_t b, int64_t e) { fwd_items<T>(g, o, b, e); }
};

// ---------------------------------------------------------------------------------------------------
// Backward.

template <typename T>
struct BwdData {
  const T *dout, *doutc;   // like q, widths D and Rv (doutc null without v_c)
  const double* lse;       // statistics rows
  double* delta;           // statistics rows, written by the dq pass, read by the dk / dv pass
  T *dq, *dqc, *dk, *dv, *dkc, *dvc;
  BlockTiles<T> vT, vcT, qT, qcT, doT, docT;  // the corrections' tiles have null data without them
};

// Per-thread scratch of the query-block backward: the P and dP tiles of every key block of one step of
// kBwdRows query rows (O(kBwdRows * Sk)) and the step's dq / dq_c rows.
template <typename T>
struct QueryScratch {
  std::vector<T> p_all, dp_all, dq, dqc;
  QueryScratch(int64_t D, int64_t R) : dq(kBwdRows * D), dqc(kBwdRows * std::max<int64_t>(R, 1)) {}
};

// The gradients of rows [sub, sub + kBwdRows) of the query block of work item `item` (sequence, head, query
// block): Delta, dq and dq_c, and with kWithKeys their terms of dk, dv, dk_c and dv_c, added to w's (the
// caller owns those rows and zeroed them).
template <bool kWithKeys, typename T>
RK_INLINE void bwd_query_block(const Problem<T>& g, const BwdData<T>& w, int64_t item, int64_t sub,
                               QueryScratch<T>& sc) {
  const int64_t D = g.D, R = g.R, Rv = g.Rv;
  double lse[kBwdRows], delta[kBwdRows];
  const QueryBlock blk = query_block(g, item);
  const int64_t lq = g.qs.rs, lk = g.ks.rs;
  const int64_t b = blk.b, h = blk.h, Sq = blk.Sq, Sk = blk.Sk, krow = blk.krow, i0 = blk.i0 + sub;
  const int64_t M = std::min(kBwdRows, blk.M - sub), qrow = blk.qrow + sub * lq, kv_head = h / g.group;
  if (M <= 0) return;
  const T* q = g.q + qrow * D;
  const T* qc = R ? g.qc + qrow * R : nullptr;
  const T* dout = w.dout + qrow * D;
  const T* doutc = Rv ? w.doutc + qrow * Rv : nullptr;
  for (int64_t i = 0; i < M; ++i) lse[i] = w.lse[g.stats.row(b, h, i0 + i)], delta[i] = 0.0;
  const int64_t kend = visible_end(g.causal, Sq, Sk, i0 + M - 1);
  const int64_t blocks = (kend + kBlk - 1) / kBlk;
  sc.p_all.resize(std::max<int64_t>(blocks, 1) * kBlk * kBlk);
  sc.dp_all.resize(sc.p_all.size());
  // Sweep 1: P and dP tiles of every key block the query block sees, and Delta = rowsum(P * dP).
  for (int64_t t = 0; t < blocks; ++t) {
    const int64_t j0 = t * kBlk, N = std::min(kBlk, kend - j0);
    T* p = sc.p_all.data() + t * kBlk * kBlk;
    T* dp = sc.dp_all.data() + t * kBlk * kBlk;
    tile_nt(p, M, q, lq * D, D, g.kT.tile(b, kv_head, t), g.scale, false);
    tile_nt(dp, M, dout, lq * D, D, w.vT.tile(b, kv_head, t), T(1), false);
    if (R) tile_nt(p, M, qc, lq * R, R, g.kcT.tile(b, kv_head, t), T(1), true);
    if (Rv) tile_nt(dp, M, doutc, lq * Rv, Rv, w.vcT.tile(b, kv_head, t), T(1), true);
    for (int64_t i = 0; i < M; ++i) {
      const int64_t vis = std::max<int64_t>(0, std::min<int64_t>(N, visible_end(g.causal, Sq, Sk, i0 + i) - j0));
      T* prow = p + i * kBlk;
      const T* dprow = dp + i * kBlk;
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < vis; ++j) {
        const T pe = exp_nonpositive(static_cast<T>(static_cast<double>(prow[j]) - lse[i]));
        prow[j] = pe;
        sum += static_cast<double>(pe) * static_cast<double>(dprow[j]);
      }
      std::fill(prow + vis, prow + kBlk, T(0));
      delta[i] += sum;
    }
  }
  for (int64_t i = 0; i < M; ++i) w.delta[g.stats.row(b, h, i0 + i)] = delta[i];
  // Sweep 2: dS = P * (dP - Delta) (into the dP tile); dq += scale dS k, dq_c += dS k_c; with the keys also
  // dv += P^T dO, dv_c += P^T dO_c, dk += scale dS^T q, dk_c += dS^T q_c.
  std::fill(sc.dq.begin(), sc.dq.begin() + M * D, T(0));
  if (R) std::fill(sc.dqc.begin(), sc.dqc.begin() + M * R, T(0));
  for (int64_t t = 0; t < blocks; ++t) {
    const int64_t j0 = t * kBlk, N = std::min(kBlk, kend - j0), row0 = krow + j0 * lk;
    const T* p = sc.p_all.data() + t * kBlk * kBlk;
    T* ds = sc.dp_all.data() + t * kBlk * kBlk;
    for (int64_t i = 0; i < M; ++i) {
      const T* prow = p + i * kBlk;
      T* dsrow = ds + i * kBlk;
#pragma omp simd
      for (int64_t j = 0; j < kBlk; ++j)  // P is 0 past the visible keys, so dS is too
        dsrow[j] = static_cast<T>(static_cast<double>(prow[j]) * (static_cast<double>(dsrow[j]) - delta[i]));
    }
    tile_acc(sc.dq.data(), M, D, ds, N, g.k + row0 * D, lk * D, g.scale);
    if (R) tile_acc(sc.dqc.data(), M, R, ds, N, g.kc + row0 * R, lk * R, T(1));
    if constexpr (kWithKeys) {
      tile_acc_transposed(w.dv + row0 * D, lk * D, N, D, p, M, dout, lq * D, T(1));
      if (Rv) tile_acc_transposed(w.dvc + row0 * Rv, lk * Rv, N, Rv, p, M, doutc, lq * Rv, T(1));
      tile_acc_transposed(w.dk + row0 * D, lk * D, N, D, ds, M, q, lq * D, g.scale);
      if (R) tile_acc_transposed(w.dkc + row0 * R, lk * R, N, R, ds, M, qc, lq * R, T(1));
    }
  }
  for (int64_t i = 0; i < M; ++i) {
    const int64_t row = qrow + i * lq;
    std::copy(sc.dq.begin() + i * D, sc.dq.begin() + (i + 1) * D, w.dq + row * D);
    if (R) std::copy(sc.dqc.begin() + i * R, sc.dqc.begin() + (i + 1) * R, w.dqc + row * R);
  }
}

// Split backward, first pass: dq / dq_c and Delta per (sequence, head, query block).
template <typename T>
RK_INLINE void bwd_dq_items(const Problem<T>& g, const BwdData<T>& w, int64_t begin, int64_t end) {
  QueryScratch<T> sc(g.D, g.R);
  for (int64_t item = begin; item < end; ++item)
    for (int64_t sub = 0; sub < kBlk; sub += kBwdRows) bwd_query_block<false>(g, w, item, sub, sc);
}

// Fused backward: every gradient per (sequence, kv head), over the group's query heads and query blocks: the
// item owns the rows of dk / dv it adds to, so S and dP are formed once (five tile products per tile, not
// the split backward's seven), at the price of B * Hkv work items.
template <typename T>
RK_INLINE void bwd_fused_items(const Problem<T>& g, const BwdData<T>& w, int64_t begin, int64_t end) {
  QueryScratch<T> sc(g.D, g.R);
  for (int64_t bhk = begin; bhk < end; ++bhk) {
    const int64_t b = bhk / g.Hkv, hk = bhk % g.Hkv;
    for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h)
      for (int64_t t = 0; t < g.nqb; ++t)
        for (int64_t sub = 0; sub < kBlk; sub += kBwdRows) bwd_query_block<true>(g, w, (b * g.H + h) * g.nqb + t, sub, sc);
  }
}

// Split backward, second pass: dk / dv / dk_c / dv_c per (sequence, kv head, key block), over the group's query heads and query blocks.
template <typename T>
RK_INLINE void bwd_dkv_items(const Problem<T>& g, const BwdData<T>& w, int64_t begin, int64_t end) {
  const int64_t D = g.D, R = g.R, Rv = g.Rv;
  std::vector<T> p(kBlk * kBlk), ds(kBlk * kBlk), dk(kBlk * D), dv(kBlk * D),
      dkc(kBlk * std::max<int64_t>(R, 1)), dvc(kBlk * std::max<int64_t>(Rv, 1));
  double lse[kBlk], delta[kBlk];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bhk = item / g.nkb, b = bhk / g.Hkv, hk = bhk % g.Hkv;
    const int64_t Sq = g.qs.len[b], Sk = g.ks.len[b], j0 = (item % g.nkb) * kBlk;
    if (j0 >= Sk) continue;
    const int64_t N = std::min(kBlk, Sk - j0), off = Sk - Sq;
    const int64_t krow = g.ks.row(b, hk, j0), lq = g.qs.rs, lk = g.ks.rs;
    const T* k = g.k + krow * D;
    const T* v = g.v + krow * D;
    const T* kc = R ? g.kc + krow * R : nullptr;
    const T* vc = Rv ? g.vc + krow * Rv : nullptr;
    std::fill(dk.begin(), dk.begin() + N * D, T(0));
    std::fill(dv.begin(), dv.begin() + N * D, T(0));
    if (R) std::fill(dkc.begin(), dkc.begin() + N * R, T(0));
    if (Rv) std::fill(dvc.begin(), dvc.begin() + N * Rv, T(0));
    const int64_t istart = g.causal ? std::max<int64_t>(0, j0 - off) : 0;  // first query row that sees key j0
    for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
      for (int64_t i0 = (istart / kBlk) * kBlk; i0 < Sq; i0 += kBlk) {
        const int64_t M = std::min(kBlk, Sq - i0);  // query columns of the transposed tiles
        const int64_t qrow = g.qs.row(b, h, i0);
        const T* q = g.q + qrow * D;
        const T* qc = R ? g.qc + qrow * R : nullptr;
        const T* dout = w.dout + qrow * D;
        const T* doutc = Rv ? w.doutc + qrow * Rv : nullptr;
        const int64_t t = i0 / kBlk;
        tile_nt(p.data(), N, k, lk * D, D, w.qT.tile(b, h, t), g.scale, false);  // S^T (keys x queries)
        tile_nt(ds.data(), N, v, lk * D, D, w.doT.tile(b, h, t), T(1), false);  // dP^T
        if (R) tile_nt(p.data(), N, kc, lk * R, R, w.qcT.tile(b, h, t), T(1), true);
        if (Rv) tile_nt(ds.data(), N, vc, lk * Rv, Rv, w.docT.tile(b, h, t), T(1), true);
        for (int64_t i = 0; i < M; ++i) {
          const int64_t stat = g.stats.row(b, h, i0 + i);
          lse[i] = w.lse[stat], delta[i] = w.delta[stat];
        }
        for (int64_t i = M; i < kBlk; ++i) lse[i] = kInf, delta[i] = 0.0;  // padding columns: P = 0
        for (int64_t j = 0; j < N; ++j) {
          T* prow = p.data() + j * kBlk;
          T* dsrow = ds.data() + j * kBlk;
          // Query column i sees key j0 + j iff i0 + i + off >= j0 + j.
          const int64_t ifirst = g.causal ? std::min<int64_t>(kBlk, std::max<int64_t>(0, j0 + j - off - i0)) : 0;
          std::fill(prow, prow + ifirst, T(0));
          std::fill(dsrow, dsrow + ifirst, T(0));
#pragma omp simd
          for (int64_t i = ifirst; i < kBlk; ++i) {
            const double pe = exp_nonpositive(static_cast<T>(static_cast<double>(prow[i]) - lse[i]));
            prow[i] = static_cast<T>(pe);
            dsrow[i] = static_cast<T>(pe * (static_cast<double>(dsrow[i]) - delta[i]));
          }
        }
        tile_acc(dv.data(), N, D, p.data(), M, dout, lq * D, T(1));
        if (Rv) tile_acc(dvc.data(), N, Rv, p.data(), M, doutc, lq * Rv, T(1));
        tile_acc(dk.data(), N, D, ds.data(), M, q, lq * D, g.scale);
        if (R) tile_acc(dkc.data(), N, R, ds.data(), M, qc, lq * R, T(1));
      }
    }
    for (int64_t j = 0; j < N; ++j) {
      const int64_t row = krow + j * lk;
      std::copy(dk.begin() + j * D, dk.begin() + (j + 1) * D, w.dk + row * D);
      std::copy(dv.begin() + j * D, dv.begin() + (j + 1) * D, w.dv + row * D);
      if (R) std::copy(dkc.begin() + j * R, dkc.begin() + (j + 1) * R, w.dkc + row * R);
      if (Rv) std::copy(dvc.begin() + j * Rv, dvc.begin() + (j + 1) * Rv, w.dvc + row * Rv);
    }
  }
}

struct BackwardQueryPass {
  template <typename T>
  RK_INLINE static void run(const Problem<T>& g, const BwdData<T>& w, int64_t b, int64_t e) { bwd_dq_items<T>(g, w, b, e); }
};
struct BackwardFusedPass {
  template <typename T>
  RK_INLINE static void run(const Problem<T>& g, const BwdData<T>& w, int64_t b, int64_t e) { bwd_fused_items<T>(g, w, b, e); }
};
struct BackwardKeyPass {
  template <typename T>
  RK_INLINE static void run(const Problem<T>& g, const BwdData<T>& w, int64_t b, int64_t e) { bwd_dkv_items<T>(g, w, b, e); }
};

// ---------------------------------------------------------------------------------------------------
// Host side.

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Contiguous, in the accumulator dtype (a no-op for contiguous float / double).
inline Tensor to_acc(const Tensor& t) { return t.to(acc_dtype(t.scalar_type())).contiguous(); }

// Validated geometry of one call, with the per-sequence starts and lengths the Rows point into.
struct Layout {
  int64_t B = 0, H = 0, Hkv = 0, D = 0, R = 0, Rv = 0, max_q = 0, max_k = 0, total_q = 0;
  bool packed = false;
  std::vector<int64_t> start_q, len_q, start_k, len_k;
  Rows qs{}, ks{}, stats{};
  std::vector<int64_t> lse_shape;
};

void check_like_q(const Tensor& t, const Tensor& q, const char* name) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "circuit_attention (cpu): ", name, ": expected dtype ",
              q.scalar_type(), " like q, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "circuit_attention (cpu): ", name, ": expected a CPU tensor");
}

// Per-sequence starts and lengths from cu_seqlens (int32 or int64, B + 1 non-decreasing offsets ending at total).
void read_offsets(const Tensor& cu, int64_t total, const char* name, std::vector<int64_t>& start,
                  std::vector<int64_t>& len) {
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1 && cu.device().is_cpu() &&
                  (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong),
              "circuit_attention (cpu): ", name, ": expected a 1-D int32/int64 CPU tensor of B + 1 offsets");
  const Tensor c = cu.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  const int64_t B = c.numel() - 1;
  TORCH_CHECK(p[0] == 0 && p[B] == total, "circuit_attention (cpu): ", name, ": must run from 0 to ", total);
  start.assign(p, p + B);
  len.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    len[b] = p[b + 1] - p[b];
    TORCH_CHECK(len[b] >= 0, "circuit_attention (cpu): ", name, ": offsets must be non-decreasing");
  }
}

Layout check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& q_c,
                    const std::optional<Tensor>& k_c, const std::optional<Tensor>& v_c,
                    const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k, int64_t max_q,
                    int64_t max_k) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "circuit_attention (cpu): q: expected float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(q.device().is_cpu(), "circuit_attention (cpu): q: expected a CPU tensor");
  check_like_q(k, q, "k");
  check_like_q(v, q, "v");
  Layout L;
  L.packed = cu_q.has_value();
  TORCH_CHECK(cu_k.has_value() == L.packed, "circuit_attention (cpu): cu_seqlens_q and cu_seqlens_k go together");
  const int64_t rank = L.packed ? 3 : 4;
  TORCH_CHECK(q.dim() == rank && k.dim() == rank && v.sizes() == k.sizes(),
              "circuit_attention (cpu): q, k, v: expected ", rank, "-D tensors with v shaped like k, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  L.D = q.size(-1);
  L.H = q.size(1);
  L.Hkv = k.size(1);
  TORCH_CHECK(k.size(-1) == L.D && L.D >= 1, "circuit_attention (cpu): k: expected head dim ", L.D, ", got ",
              k.size(-1));
  TORCH_CHECK(L.Hkv >= 1 && L.H % L.Hkv == 0, "circuit_attention (cpu): k: ", L.Hkv,
              " kv heads must divide the ", L.H, " query heads");
  if (L.packed) {
    read_offsets(*cu_q, q.size(0), "cu_seqlens_q", L.start_q, L.len_q);
    read_offsets(*cu_k, k.size(0), "cu_seqlens_k", L.start_k, L.len_k);
    L.B = static_cast<int64_t>(L.len_q.size());
    TORCH_CHECK(static_cast<int64_t>(L.len_k.size()) == L.B,
                "circuit_attention (cpu): cu_seqlens_k: expected as many offsets as cu_seqlens_q");
    L.max_q = 0, L.max_k = 0;
    for (int64_t b = 0; b < L.B; ++b) L.max_q = std::max(L.max_q, L.len_q[b]), L.max_k = std::max(L.max_k, L.len_k[b]);
    TORCH_CHECK(L.max_q <= max_q && L.max_k <= max_k,
                "circuit_attention (cpu): max_seqlen_q / max_seqlen_k: below the longest sequence");
    L.total_q = q.size(0);
    L.qs = Rows{0, 1, L.H, L.start_q.data(), L.len_q.data()};
    L.ks = Rows{0, 1, L.Hkv, L.start_k.data(), L.len_k.data()};
    L.stats = Rows{0, L.total_q, 1, L.start_q.data(), L.len_q.data()};
    L.lse_shape = {L.H, L.total_q};
  } else {
    L.B = q.size(0);
    TORCH_CHECK(k.size(0) == L.B, "circuit_attention (cpu): k: expected batch ", L.B, ", got ", k.size(0));
    L.max_q = q.size(2), L.max_k = k.size(2);
    L.start_q.assign(L.B, 0), L.start_k.assign(L.B, 0);
    L.len_q.assign(L.B, L.max_q), L.len_k.assign(L.B, L.max_k);
    L.qs = Rows{L.H * L.max_q, L.max_q, 1, L.start_q.data(), L.len_q.data()};
    L.ks = Rows{L.Hkv * L.max_k, L.max_k, 1, L.start_k.data(), L.len_k.data()};
    L.stats = L.qs;
    L.lse_shape = {L.B, L.H, L.max_q};
  }
  TORCH_CHECK(q_c.has_value() == k_c.has_value(), "circuit_attention (cpu): q_c and k_c: give both or neither");
  auto q_rows = q.sizes().vec(), k_rows = k.sizes().vec();
  q_rows.pop_back(), k_rows.pop_back();
  if (q_c.has_value()) {
    check_like_q(*q_c, q, "q_c");
    check_like_q(*k_c, q, "k_c");
    L.R = q_c->size(-1);
    auto qc_rows = q_c->sizes().vec(), kc_rows = k_c->sizes().vec();
    qc_rows.pop_back(), kc_rows.pop_back();
    TORCH_CHECK(qc_rows == q_rows && kc_rows == k_rows && k_c->size(-1) == L.R && L.R >= 1,
                "circuit_attention (cpu): q_c / k_c: expected q's and k's shapes with a common width R >= 1, got ",
                q_c->sizes(), ", ", k_c->sizes());
  }
  if (v_c.has_value()) {
    check_like_q(*v_c, q, "v_c");
    L.Rv = v_c->size(-1);
    auto vc_rows = v_c->sizes().vec();
    vc_rows.pop_back();
    TORCH_CHECK(vc_rows == k_rows && L.Rv >= 1,
                "circuit_attention (cpu): v_c: expected k's shape with a width Rv >= 1, got ", v_c->sizes());
  }
  return L;
}

// first_block[b]: the kBlk-row blocks of the sequences before b (B + 1 entries).
std::vector<int64_t> block_offsets(const std::vector<int64_t>& len) {
  std::vector<int64_t> first(len.size() + 1, 0);
  for (size_t b = 0; b < len.size(); ++b) first[b + 1] = first[b] + (len[b] + kBlk - 1) / kBlk;
  return first;
}

// The BlockTiles of x (contiguous, accumulator dtype; its rows addressed by `rows`), with their storage
// appended to `storage`; null tiles for an undefined x.
template <typename T>
BlockTiles<T> block_tiles(const Tensor& x, const Rows& rows, int64_t B, int64_t heads,
                          const std::vector<int64_t>& first_block, std::vector<Tensor>& storage) {
  if (!x.defined()) return {nullptr, first_block.data(), heads, 0};
  const int64_t width = x.size(-1);
  Tensor tiles = at::empty({first_block[B] * heads * width * kBlk}, x.options());
  T* out = tiles.data_ptr<T>();
  const T* src = x.data_ptr<T>();
  at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, head = bh % heads;
      for (int64_t t = 0; t < first_block[b + 1] - first_block[b]; ++t) {
        const int64_t n = std::min(kBlk, rows.len[b] - t * kBlk);
        transpose_rows(out + ((first_block[b] + t) * heads + head) * width * kBlk,
                       src + rows.row(b, head, t * kBlk) * width, n, rows.rs * width, width);
      }
    }
  });
  storage.push_back(tiles);
  return {out, first_block.data(), heads, width};
}

template <typename T>
Problem<T> make_problem(const Layout& L, bool causal, double scale, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& qc, const Tensor& kc, const Tensor& vc,
                        const std::vector<int64_t>& key_blocks, std::vector<Tensor>& storage) {
  Problem<T> g{};
  g.B = L.B, g.H = L.H, g.Hkv = L.Hkv, g.group = L.H / L.Hkv, g.D = L.D, g.R = L.R, g.Rv = L.Rv;
  g.nqb = (L.max_q + kBlk - 1) / kBlk;
  g.nkb = (L.max_k + kBlk - 1) / kBlk;
  g.causal = causal;
  g.scale = static_cast<T>(scale);
  g.qs = L.qs, g.ks = L.ks, g.stats = L.stats;
  g.q = q.data_ptr<T>(), g.k = k.data_ptr<T>(), g.v = v.data_ptr<T>();
  g.qc = L.R ? qc.data_ptr<T>() : nullptr;
  g.kc = L.R ? kc.data_ptr<T>() : nullptr;
  g.vc = L.Rv ? vc.data_ptr<T>() : nullptr;
  g.kT = block_tiles<T>(k, L.ks, L.B, L.Hkv, key_blocks, storage);
  g.kcT = block_tiles<T>(kc, L.ks, L.B, L.Hkv, key_blocks, storage);
  return g;
}

// The fused backward when its B * Hkv work items keep every thread busy; the split one otherwise.
// RECURSIVE_KERNELS_CPU_ATTENTION_BACKWARD=fused|split forces one (for tests and benchmarks).
bool use_fused_backward(int64_t items) {
  const char* env = std::getenv("RECURSIVE_KERNELS_CPU_ATTENTION_BACKWARD");
  const std::string forced = env == nullptr ? "" : env;
  if (forced == "fused" || forced == "split") return forced == "fused";
  return items >= at::get_num_threads();
}

// Work items per grain of at::parallel_for: about 2^16 multiply-adds each.
inline int64_t grain_items(int64_t per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, per_item));
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> circuit_attention_forward(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& q_c,
    const std::optional<Tensor>& k_c, const std::optional<Tensor>& v_c, const std::optional<Tensor>& cu_seqlens_q,
    const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale) {
  const Layout L = check_inputs(q, k, v, q_c, k_c, v_c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const auto dt = q.scalar_type();
  const auto adt = acc_dtype(dt);
  const Tensor qa = to_acc(q), ka = to_acc(k), va = to_acc(v);
  const Tensor qca = L.R ? to_acc(*q_c) : Tensor(), kca = L.R ? to_acc(*k_c) : Tensor();
  const Tensor vca = L.Rv ? to_acc(*v_c) : Tensor();
  auto out_shape = q.sizes().vec();
  Tensor out = at::empty(out_shape, q.options().dtype(adt));
  out_shape.back() = L.Rv;
  Tensor outc = L.Rv ? at::empty(out_shape, q.options().dtype(adt)) : Tensor();
  Tensor lse = at::empty(L.lse_shape, q.options().dtype(at::kDouble));
  const Isa isa = cpu_isa();
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const std::vector<int64_t> key_blocks = block_offsets(L.len_k);
    std::vector<Tensor> storage;
    const Problem<T> g = make_problem<T>(L, causal, scale, qa, ka, va, qca, kca, vca, key_blocks, storage);
    const FwdOut<T> o{out.data_ptr<T>(), L.Rv ? outc.data_ptr<T>() : nullptr, lse.data_ptr<double>()};
    const int64_t per_item = kBlk * std::max<int64_t>(1, L.max_k) * (2 * L.D + L.R + L.Rv);
    const int64_t groups = (g.nqb + kFwdGroup - 1) / kFwdGroup;
    at::parallel_for(0, L.B * L.H * groups, grain_items(kFwdGroup * per_item),
                     [&](int64_t b, int64_t e) { run_on_isa<ForwardPass>(isa, g, o, b, e); });
  };
  if (adt == at::kDouble) run(double{}); else run(float{});
  if (dt != adt) {
    out = out.to(dt);
    if (L.Rv) outc = outc.to(dt);
    lse = lse.to(at::kFloat);  // 16-bit inputs: float32 statistics, as on every backend
  }
  if (!L.Rv) outc = at::empty({0}, q.options());
  return {out, outc, lse};
}

std::vector<Tensor> circuit_attention_backward(
    const Tensor& grad_out, const Tensor& grad_out_c, const Tensor& q, const Tensor& k, const Tensor& v,
    const std::optional<Tensor>& q_c, const std::optional<Tensor>& k_c, const std::optional<Tensor>& v_c,
    const Tensor& out, const Tensor& out_c, const Tensor& lse, const std::optional<Tensor>& cu_seqlens_q,
    const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale) {
  const Layout L = check_inputs(q, k, v, q_c, k_c, v_c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const auto dt = q.scalar_type();
  const auto adt = acc_dtype(dt);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "circuit_attention (cpu): grad_out: expected q's shape ", q.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(lse.sizes().vec() == L.lse_shape, "circuit_attention (cpu): lse: expected shape ", L.lse_shape,
              ", got ", lse.sizes());
  if (L.Rv) {
    auto shape = q.sizes().vec();
    shape.back() = L.Rv;
    TORCH_CHECK(grad_out_c.sizes().vec() == shape, "circuit_attention (cpu): grad_out_c: expected shape ", shape,
                ", got ", grad_out_c.sizes());
  }
  (void)out, (void)out_c;  // Delta is rowsum(P * dP), recomputed (see the design notes)
  const Tensor qa = to_acc(q), ka = to_acc(k), va = to_acc(v);
  const Tensor qca = L.R ? to_acc(*q_c) : Tensor(), kca = L.R ? to_acc(*k_c) : Tensor();
  const Tensor vca = L.Rv ? to_acc(*v_c) : Tensor();
  const Tensor goa = grad_out.to(adt).contiguous();
  const Tensor goca = L.Rv ? grad_out_c.to(adt).contiguous() : Tensor();
  const Tensor lse_d = lse.to(at::kDouble).contiguous();
  Tensor delta = at::empty(L.lse_shape, q.options().dtype(at::kDouble));
  const bool fused = use_fused_backward(L.B * L.Hkv);
  // Every dq row is written by one item. The split backward writes every dk / dv row once (a key no query
  // sees gets zeros); the fused one adds to them.
  const auto key_grad = [&](const Tensor& like) { return fused ? at::zeros_like(like) : at::empty_like(like); };
  Tensor dq = at::empty_like(qa), dk = key_grad(ka), dv = key_grad(va);
  Tensor dqc = L.R ? at::empty_like(qca) : Tensor(), dkc = L.R ? key_grad(kca) : Tensor();
  Tensor dvc = L.Rv ? key_grad(vca) : Tensor();
  const Isa isa = cpu_isa();
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const std::vector<int64_t> key_blocks = block_offsets(L.len_k), query_blocks = block_offsets(L.len_q);
    std::vector<Tensor> storage;
    const Problem<T> g = make_problem<T>(L, causal, scale, qa, ka, va, qca, kca, vca, key_blocks, storage);
    BwdData<T> w{};
    w.vT = block_tiles<T>(va, L.ks, L.B, L.Hkv, key_blocks, storage);
    w.vcT = block_tiles<T>(vca, L.ks, L.B, L.Hkv, key_blocks, storage);
    if (!fused) {
      w.qT = block_tiles<T>(qa, L.qs, L.B, L.H, query_blocks, storage);
      w.qcT = block_tiles<T>(qca, L.qs, L.B, L.H, query_blocks, storage);
      w.doT = block_tiles<T>(goa, L.qs, L.B, L.H, query_blocks, storage);
      w.docT = block_tiles<T>(goca, L.qs, L.B, L.H, query_blocks, storage);
    }
    w.dout = goa.data_ptr<T>();
    w.doutc = L.Rv ? goca.data_ptr<T>() : nullptr;
    w.lse = lse_d.data_ptr<double>();
    w.delta = delta.data_ptr<double>();
    w.dq = dq.data_ptr<T>(), w.dk = dk.data_ptr<T>(), w.dv = dv.data_ptr<T>();
    w.dqc = L.R ? dqc.data_ptr<T>() : nullptr;
    w.dkc = L.R ? dkc.data_ptr<T>() : nullptr;
    w.dvc = L.Rv ? dvc.data_ptr<T>() : nullptr;
    const int64_t width = 2 * L.D + L.R + L.Rv;
    if (fused) {
      at::parallel_for(0, L.B * L.Hkv, 1,
                       [&](int64_t b, int64_t e) { run_on_isa<BackwardFusedPass>(isa, g, w, b, e); });
      return;
    }
    at::parallel_for(0, L.B * L.H * g.nqb, grain_items(kBlk * std::max<int64_t>(1, L.max_k) * width),
                     [&](int64_t b, int64_t e) { run_on_isa<BackwardQueryPass>(isa, g, w, b, e); });
    at::parallel_for(0, L.B * L.Hkv * g.nkb,
                     grain_items(kBlk * std::max<int64_t>(1, L.max_q) * (L.H / L.Hkv) * width),
                     [&](int64_t b, int64_t e) { run_on_isa<BackwardKeyPass>(isa, g, w, b, e); });
  };
  if (adt == at::kDouble) run(double{}); else run(float{});
  const auto fin = [&](const Tensor& t) { return dt == adt ? t : t.to(dt); };
  return {fin(dq), fin(dk), fin(dv), L.R ? fin(dqc) : at::empty({0}, q.options()),
          L.R ? fin(dkc) : at::empty({0}, q.options()), L.Rv ? fin(dvc) : at::empty({0}, q.options())};
}

}  // namespace cpu
}  // namespace recursive_kernels
