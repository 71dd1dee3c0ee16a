// circuit_attention, CPU backend (ATen + OpenMP through at::parallel_for).
//
//   S = scale * q @ k^T + q_c @ k_c^T,   P = softmax(S) (bottom-right causal mask),   out = P v,   out_c = P v_c
//
// Design (FlashAttention-2 on the CPU; memory linear in the sequence lengths, never an Sq x Sk matrix).
// * Operands in two parts: the passes take q already scaled (S = (scale q) k^T + q_c k_c^T, so the
//   correction's dot keeps its own magnitude; dividing q_c by scale instead doubled dk_c's rounding error in
//   a test), and each side as a main part and a correction part (struct Parts: S sums a D-wide and an R-wide
//   product, out and out_c are two products with P). From kJoinRows query rows the host joins each side's
//   parts into one tensor ([scale q, q_c], [k, k_c], [v, v_c]; linear memory) and the passes see a single
//   part of width D + R: one product instead of two (the R-wide one runs at a fraction of the speed).
//   Decoding, where the copy would cost as much as the attention, reads the parts where they lie.
// * Layouts: dense (B, heads, S, width) and packed (total, heads, width) with cu_seqlens are one case: row
//   (b, head, i) of any tensor of a side is row b * rb + head * rh + (start[b] + i) * rs of that tensor seen
//   as (rows, width) (struct Rows). A token-major dense side (the model's layout: each tensor a transpose(1, 2)
//   view of a contiguous (B, S, heads, width) one) is read and written as that (B, S, heads, width) tensor, in
//   place; its results go back as views of it. Grouped-query heads index their kv head (no repeat).
// * Products: every matrix product is a call of gemm(), which goes to the BLAS that torch links (the one eager
//   attention's products use) where torch exports it, else to a register-blocked micro-kernel. The blocks are
//   sized for BLAS calls (hundreds of rows) so that a call's fixed cost is small.
// * Forward: one work item per (sequence, head, block of query rows); per item a loop over blocks of kFwdKeys
//   keys with an online softmax: S = q k^T into a tile, exponentiated in place, then acc += P v. A row
//   that sees no key gets zeros and lse = -inf.
// * Precision: dots and elementwise work in the accumulator dtype T (float; double for double inputs); the
//   running max, sum and lse, and the sums of Delta, in double. The backward's softmax argument is
//   (s - lse_hi) - lse_lo with lse split into two T values. Delta = rowsum(P * dP) is summed from the same
//   rounded P and dP as dS = P (dP - Delta) uses, so that their rounding errors cancel (a row that sees one
//   key gets dS = 0 exactly); Delta = rowsum(dO * out), as FlashAttention-2 has it, would need no stored P
//   and dP, but was tried and left rounding noise there (and 1.3-1.5x the error of dq and dk).
// * Backward: per step of kBwdRows query rows, P and dP over the step's whole key range (kept: memory
//   O(kBwdRows * Sk) per thread), Delta, dS = P (dP - Delta), then dq = dS k. The fused backward runs
//   one item per (sequence, kv head) over the group's query heads and also adds dv += P^T dO and
//   dk += dS^T q into the key rows the item owns: five products. With fewer (sequence, kv head) pairs
//   than threads the split backward runs instead: the dq items per (sequence, head, query block), then a
//   dk / dv pass per (sequence, kv head, key block) that forms S^T and dP^T again (seven products, but
//   B * H * Sq / kBwdRows items). Each gradient row is written by one thread either way: no atomics, no races.
// * exp: a vectorisable polynomial (Cody-Waite reduction; degree 11 for double, 7 for float); log once per
//   row. The softmax loops carry `omp simd` so that their max / sum reductions vectorise (GCC keeps FP
//   reductions scalar otherwise: it may not reorder them).
// * x86: the item loops are compiled for AVX-512, AVX2+FMA and the baseline ISA, picked at run time
//   (cpu_dispatch.h).
// * bfloat16 / float16: inputs upcast to float once (linear memory), results rounded once.
// One file, longer than the others: the passes and the host code share the types defined here (Rows, Parts,
// Problem) within one translation unit. Moving the passes out would give those types external linkage in a
// header, and when lowrank_linear's loop types moved so, GCC vectorised one of its loops differently (other
// rounding) until an omp simd pinned it: here that would mean re-checking every pass's code.
#include "ops_cpu.h"
#include "checks.h"
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

constexpr const char* kWhere = "circuit_attention (cpu): ";  // opens every message (see checks.h)

// Blocks of the forward: query rows per work item, and keys per step of its online softmax (score tiles of
// kFwdRows x kFwdKeys: the products are BLAS calls of that size, where a call's overhead is small).
constexpr int64_t kFwdRows = 256;
constexpr int64_t kFwdKeys = 512;
// The fewest query rows per forward work item (see forward_rows).
constexpr int64_t kFwdRowsMin = 64;
// Query rows from which each side's two parts are joined (see Operand).
constexpr int64_t kJoinRows = 64;
// Query rows per step of the backward: a step keeps the P and dP rows of its whole key range (2 * kBwdRows * Sk
// values, O(Sk) per thread) and is one BLAS call per product. Each step streams k, v, dk and dv of that range,
// so more rows per step means less traffic per row (128 rows: about 3% less backward CPU time than 64 at
// S = 2048 on two threads).
constexpr int64_t kBwdRows = 128;
// The split backward's key pass: keys per work item and query rows per chunk of its S^T / dP^T tiles.
constexpr int64_t kKeyRows = 64;
constexpr int64_t kQueryChunk = 256;
// Register-blocked micro-kernel (no BLAS): 4 rows x kW columns of accumulators (8 AVX-512 or 16 AVX2 registers).
constexpr int64_t kW = 32;
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

// The register-blocked micro-kernel of the products when torch exports no BLAS: for r < rows,
//   out[r * ldo + 0:W] = (accumulate ? out[r * ldo + 0:W] : 0) + sum_{d < K} a[r][d * astep] * b[d * ldb + 0:W]
// Four rows of W accumulators; `omp simd` keeps GCC vectorising along the W columns (it otherwise picks the d
// loop for some W and spills).
template <int64_t W, typename T>
RK_INLINE void microkernel(T* __restrict out, int64_t ldo, int rows, const T* const* a, int64_t astep, int64_t K,
                           const T* __restrict b, int64_t ldb, bool accumulate) {
  T acc[4][W] = {};
  for (int64_t d = 0; d < K; ++d) {
    const T* bd = b + d * ldb;
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const T x = a[r][d * astep];
#pragma omp simd
      for (int64_t jj = 0; jj < W; ++jj) acc[r][jj] += x * bd[jj];
    }
  }
  for (int r = 0; r < rows; ++r) {
    T* o = out + r * ldo;
    for (int64_t jj = 0; jj < W; ++jj) o[jj] = (accumulate ? o[jj] : T(0)) + acc[r][jj];
  }
}

// Columns [n0, N) of four rows by micro-kernels of widths W, W / 2, ..., 1 (all but the widest run at most once).
template <int64_t W, typename T>
RK_INLINE void microkernel_columns(T* __restrict out, int64_t ldo, int rows, const T* const* a, int64_t astep,
                                   int64_t K, const T* __restrict b, int64_t ldb, bool accumulate,
                                   int64_t n0, int64_t N) {
  for (; n0 + W <= N; n0 += W) microkernel<W>(out + n0, ldo, rows, a, astep, K, b + n0, ldb, accumulate);
  if constexpr (W > 1) microkernel_columns<W / 2>(out, ldo, rows, a, astep, K, b, ldb, accumulate, n0, N);
}

#if defined(__GNUC__) && defined(__ELF__)
// The Fortran BLAS that torch links (MKL's, exported by libtorch_cpu; OpenBLAS's, from its library). Weak, so
// that the extension still loads beside a torch that exports none; gemm() then uses the micro-kernel.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}
#define RK_WEAK_BLAS 1
#else
#define RK_WEAK_BLAS 0
#endif

template <typename T>
using BlasGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                          const int*, const T*, const int*, const T*, T*, const int*);

// torch's BLAS gemm for T; null where torch exports none, or where RECURSIVE_KERNELS_CPU_BLAS=0 asks for the
// micro-kernel (tests cover both).
template <typename T>
BlasGemm<T> blas_gemm() {
  const char* env = std::getenv("RECURSIVE_KERNELS_CPU_BLAS");
  if (env != nullptr && std::string(env) == "0") return nullptr;
#if RK_WEAK_BLAS
  if constexpr (std::is_same_v<T, double>) return dgemm_; else return sgemm_;
#else
  return nullptr;
#endif
}

// Every product of the op: row-major C (M x N, row i at C + i * ldc) = op(A) op(B) + beta * C, beta 0
// or 1. op(A) is M x K: A itself (row i at A + i * lda) or, with trans_a, the transpose of A stored K x M;
// op(B) is K x N: B (row d at B + d * ldb) or, with trans_b, the transpose of B stored N x K. Through torch's
// BLAS where it exports one (the same BLAS as eager attention's products), else the micro-kernel (which
// needs op(B) row-major: a transposed B is copied once per call, K * N against the M * N * K of the product).
template <typename T>
RK_INLINE void gemm(BlasGemm<T> blas, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                    int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (beta == T(0))
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    return;
  }
  if (blas != nullptr) {
    // Column-major BLAS sees each row-major matrix transposed: C^T = op(B)^T op(A)^T.
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const T one = T(1);
    blas(&tb, &ta, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  thread_local std::vector<T> b_rows;
  if (trans_b) {
    b_rows.resize(K * N);
    for (int64_t j = 0; j < N; ++j)
      for (int64_t d = 0; d < K; ++d) b_rows[d * N + j] = B[j * ldb + d];
    B = b_rows.data(), ldb = N;
  }
  // op(A)[i, d] at A + i * lda + d, or at A + d * lda + i transposed: rows past M use a clamped row, not stored.
  const int64_t row_step = trans_a ? 1 : lda, astep = trans_a ? lda : 1;
  for (int64_t i = 0; i < M; i += 4) {
    const T* a[4];
    for (int r = 0; r < 4; ++r) a[r] = A + std::min<int64_t>(i + r, M - 1) * row_step;
    const int rows = static_cast<int>(std::min<int64_t>(4, M - i));
    microkernel_columns<kW>(C + i * ldc, ldc, rows, a, astep, K, B, ldb, beta != T(0), 0, N);
  }
}

// The rows of one side of the problem (query side: q, q_c, out, out_c and their gradients; key side: k, v,
// k_c, v_c and theirs; statistics: lse and Delta): row(b, head, i) of a (rows, width) tensor.
struct Rows {
  int64_t rb, rh, rs;
  const int64_t* start;  // per sequence
  const int64_t* len;    // per sequence
  RK_INLINE int64_t row(int64_t b, int64_t head, int64_t i) const { return b * rb + head * rh + (start[b] + i) * rs; }
};

// One side's operand in two parts: the main rows (width D) and the correction's (width R; none when R == 0),
// both addressed by the side's row index (struct Rows).
template <typename P>
struct Parts {
  P* main;
  P* corr;
  int64_t D, R;
  RK_INLINE P* m(int64_t row) const { return main + row * D; }
  RK_INLINE P* c(int64_t row) const { return corr + row * R; }
};

// C (M x N) = beta C + A B^T summed over both parts: A's rows a + i * sa, B's rows b + j * sb.
template <typename T, typename PA, typename PB>
RK_INLINE void product_nt(BlasGemm<T> blas, int64_t M, int64_t N, const Parts<PA>& A, int64_t a, int64_t sa,
                          const Parts<PB>& B, int64_t b, int64_t sb, T beta, T* C, int64_t ldc) {
  gemm(blas, false, true, M, N, A.D, A.m(a), sa * A.D, B.m(b), sb * B.D, beta, C, ldc);
  if (A.R) gemm(blas, false, true, M, N, A.R, A.c(a), sa * A.R, B.c(b), sb * B.R, T(1), C, ldc);
}

// Each part of C (rows c + i * sc) = beta C + op(P) B: P (M x K at ld ldp, or stored K x M with trans_p) times
// the same part of B (rows b + j * sb).
template <typename T, typename PB>
RK_INLINE void product_parts(BlasGemm<T> blas, bool trans_p, int64_t M, int64_t K, const T* P, int64_t ldp,
                             const Parts<PB>& B, int64_t b, int64_t sb, T beta, const Parts<T>& C, int64_t c,
                             int64_t sc) {
  gemm(blas, trans_p, false, M, C.D, K, P, ldp, B.m(b), sb * B.D, beta, C.m(c), sc * C.D);
  if (C.R) gemm(blas, trans_p, false, M, C.R, K, P, ldp, B.c(b), sb * B.R, beta, C.c(c), sc * C.R);
}

// The attention the passes compute: S = q k^T over both parts (q already scaled, see the design notes),
// out = P v over both parts.
template <typename T>
struct Problem {
  int64_t B, H, Hkv, group, max_q, max_k;
  bool causal;
  Rows qs, ks, stats;
  Parts<const T> q, k, v;
  BlasGemm<T> blas;  // null: the micro-kernel
};

RK_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Keys [0, end) of a sequence that its query row i sees.
RK_INLINE int64_t visible_end(bool causal, int64_t Sq, int64_t Sk, int64_t i) {
  if (!causal) return Sk;
  return std::max<int64_t>(0, std::min<int64_t>(Sk, i + Sk - Sq + 1));
}

// Work item `item` of a pass over blocks of `rows` query rows: (sequence b, head h, query rows [i0, i0 + M))
// with the sequence's lengths and the first rows of the block and of its kv head's keys; M <= 0 past the
// sequence (packed sequences shorter than the longest).
struct QueryBlock {
  int64_t b, h, Sq, Sk, i0, M, qrow, krow;
};

template <typename T>
RK_INLINE QueryBlock query_block(const Problem<T>& g, int64_t item, int64_t rows) {
  const int64_t blocks = ceil_div(g.max_q, rows), bh = item / blocks, b = bh / g.H, h = bh % g.H;
  const int64_t Sq = g.qs.len[b], i0 = (item % blocks) * rows;
  return {b, h, Sq, g.ks.len[b], i0, std::min(rows, Sq - i0), g.qs.row(b, h, i0), g.ks.row(b, h / g.group, 0)};
}

// ---------------------------------------------------------------------------------------------------
// Forward.

template <typename T>
struct FwdOut {
  Parts<T> out;  // like v's parts
  double* lse;   // statistics rows
  int64_t rows;  // query rows per work item
};

template <typename T>
RK_INLINE void fwd_items(const Problem<T>& g, const FwdOut<T>& o, int64_t begin, int64_t end) {
  const int64_t Dv = g.v.D, Rv = g.v.R, lq = g.qs.rs, lk = g.ks.rs;
  // Score tiles of at most kFwdKeys keys (a short sequence's are narrower: decoding allocates little).
  const int64_t keys = std::min(kFwdKeys, ceil_div(std::max<int64_t>(g.max_k, 1), 16) * 16);
  const int64_t rows = std::min(o.rows, std::max<int64_t>(g.max_q, 1));
  std::vector<T> s(rows * keys), acc(rows * Dv), accc(rows * std::max<int64_t>(Rv, 1));
  const Parts<T> accs{acc.data(), accc.data(), Dv, Rv};
  double m[kFwdRows], l[kFwdRows];
  for (int64_t item = begin; item < end; ++item) {
    const QueryBlock blk = query_block(g, item, o.rows);
    if (blk.M <= 0) continue;
    const int64_t M = blk.M, Sq = blk.Sq, Sk = blk.Sk, i0 = blk.i0;
    const int64_t kend = visible_end(g.causal, Sq, Sk, i0 + M - 1);  // the block's last row sees the most
    std::fill(acc.begin(), acc.begin() + M * Dv, T(0));
    std::fill(accc.begin(), accc.begin() + M * Rv, T(0));
    for (int64_t i = 0; i < M; ++i) m[i] = -kInf, l[i] = 0.0;
    for (int64_t j0 = 0; j0 < kend; j0 += keys) {
      const int64_t N = std::min(keys, kend - j0), row0 = blk.krow + j0 * lk;
      product_nt(g.blas, M, N, g.q, blk.qrow, lq, g.k, row0, lk, T(0), s.data(), keys);
      for (int64_t i = 0; i < M; ++i) {
        T* srow = s.data() + i * keys;
        const int64_t vis = std::min<int64_t>(N, visible_end(g.causal, Sq, Sk, i0 + i) - j0);
        if (vis <= 0) {
          std::fill(srow, srow + N, T(0));
          continue;
        }
        T row_max = srow[0];
#pragma omp simd reduction(max : row_max)
        for (int64_t j = 1; j < vis; ++j) row_max = srow[j] > row_max ? srow[j] : row_max;
        const double mx = std::max(m[i], static_cast<double>(row_max));
        const double alpha = exp_nonpositive(m[i] - mx);  // m = -inf: 0
        const T shift = static_cast<T>(mx);  // exact: mx is one of the scores
        T sum = 0;  // of at most kFwdKeys terms; l accumulates in double
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < vis; ++j) {
          const T p = exp_nonpositive(srow[j] - shift);
          srow[j] = p;
          sum += p;
        }
        std::fill(srow + vis, srow + N, T(0));
        l[i] = l[i] * alpha + sum;
        m[i] = mx;
        if (alpha != 1.0) {
          const T a = static_cast<T>(alpha);
          for (int64_t d = 0; d < Dv; ++d) acc[i * Dv + d] *= a;
          for (int64_t d = 0; d < Rv; ++d) accc[i * Rv + d] *= a;
        }
      }
      product_parts(g.blas, false, M, N, s.data(), keys, g.v, row0, lk, T(1), accs, 0, 1);
    }
    for (int64_t i = 0; i < M; ++i) {
      const bool none = !(l[i] > 0.0);
      const double inv = none ? 0.0 : 1.0 / l[i];
      const int64_t row = blk.qrow + i * lq;
      o.lse[g.stats.row(blk.b, blk.h, i0 + i)] = none ? -kInf : m[i] + std::log(l[i]);
      for (int64_t d = 0; d < Dv; ++d) o.out.m(row)[d] = static_cast<T>(acc[i * Dv + d] * inv);
      for (int64_t d = 0; d < Rv; ++d) o.out.c(row)[d] = static_cast<T>(accc[i * Rv + d] * inv);
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
  Parts<const T> dout;     // like v's parts
  const double* lse;       // statistics rows
  double* delta;           // statistics rows, written by the query rows' pass, read by the split key pass
  Parts<T> dq, dk, dv;     // dk, dv zeroed: both backwards add into them
};

// Per-thread scratch of the query rows' backward: the P and dP rows of a step's whole key range.
template <typename T>
struct QueryScratch {
  std::vector<T> p, dp;
};

// The gradients of the query rows of work item `item` (sequence, head, block of kBwdRows rows): Delta and dq,
// and with kWithKeys their terms of dk and dv, added into w's (the caller owns those rows).
template <bool kWithKeys, typename T>
RK_INLINE void bwd_query_rows(const Problem<T>& g, const BwdData<T>& w, int64_t item, QueryScratch<T>& sc) {
  const QueryBlock blk = query_block(g, item, kBwdRows);
  if (blk.M <= 0) return;
  const int64_t lq = g.qs.rs, lk = g.ks.rs;
  const int64_t b = blk.b, h = blk.h, Sq = blk.Sq, Sk = blk.Sk, i0 = blk.i0, M = blk.M, qrow = blk.qrow, krow = blk.krow;
  const int64_t kend = visible_end(g.causal, Sq, Sk, i0 + M - 1);
  const int64_t ld = ceil_div(std::max<int64_t>(kend, 1), 16) * 16;  // rows of P and dP, 64-byte aligned
  sc.p.resize(M * ld);
  sc.dp.resize(M * ld);
  T* p = sc.p.data();
  T* dp = sc.dp.data();
  product_nt(g.blas, M, kend, g.q, qrow, lq, g.k, krow, lk, T(0), p, ld);
  product_nt(g.blas, M, kend, w.dout, qrow, lq, g.v, krow, lk, T(0), dp, ld);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t vis = visible_end(g.causal, Sq, Sk, i0 + i);
    const int64_t stat = g.stats.row(b, h, i0 + i);
    const double lse = w.lse[stat];
    const T lse_hi = static_cast<T>(lse), lse_lo = static_cast<T>(lse - static_cast<double>(lse_hi));
    T* prow = p + i * ld;
    T* dsrow = dp + i * ld;
    double delta = 0.0;  // rowsum(P * dP)
#pragma omp simd reduction(+ : delta)
    for (int64_t j = 0; j < vis; ++j) {
      const T pe = exp_nonpositive((prow[j] - lse_hi) - lse_lo);
      prow[j] = pe;
      delta += static_cast<double>(pe * dsrow[j]);
    }
    std::fill(prow + vis, prow + kend, T(0));
    w.delta[stat] = delta;
    // dS = P * (dP - Delta), into the dP row (0 past the visible keys, as P is).
    const T delta_t = static_cast<T>(delta);
#pragma omp simd
    for (int64_t j = 0; j < kend; ++j) dsrow[j] = prow[j] * (dsrow[j] - delta_t);
  }
  const T* ds = dp;
  // dq = dS k, written into its rows (zeros where the rows see no key); dv += P^T dO, dk += dS^T q.
  product_parts(g.blas, false, M, kend, ds, ld, g.k, krow, lk, T(0), w.dq, qrow, lq);
  if constexpr (kWithKeys) {
    product_parts(g.blas, true, kend, M, p, ld, w.dout, qrow, lq, T(1), w.dv, krow, lk);
    product_parts(g.blas, true, kend, M, ds, ld, g.q, qrow, lq, T(1), w.dk, krow, lk);
  }
}

// Split backward, first pass: dq and Delta per (sequence, head, block of kBwdRows query rows).
template <typename T>
RK_INLINE void bwd_dq_items(const Problem<T>& g, const BwdData<T>& w, int64_t begin, int64_t end) {
  QueryScratch<T> sc;
  for (int64_t item = begin; item < end; ++item) bwd_query_rows<false>(g, w, item, sc);
}

// Fused backward: every gradient per (sequence, kv head), over the group's query heads and query blocks: the
// item owns the rows of dk / dv it adds to, so S and dP are formed once (five products, not the split
// backward's seven), at the price of B * Hkv work items.
template <typename T>
RK_INLINE void bwd_fused_items(const Problem<T>& g, const BwdData<T>& w, int64_t begin, int64_t end) {
  QueryScratch<T> sc;
  const int64_t blocks = ceil_div(g.max_q, kBwdRows);
  for (int64_t bhk = begin; bhk < end; ++bhk) {
    const int64_t b = bhk / g.Hkv, hk = bhk % g.Hkv;
    for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h)
      for (int64_t t = 0; t < blocks; ++t) bwd_query_rows<true>(g, w, (b * g.H + h) * blocks + t, sc);
  }
}

// Split backward, second pass: dk and dv per (sequence, kv head, block of kKeyRows keys), over the group's
// query heads and the query rows that see the block, in chunks of kQueryChunk: S^T and dP^T (keys x queries)
// are formed again.
template <typename T>
RK_INLINE void bwd_dkv_items(const Problem<T>& g, const BwdData<T>& w, int64_t begin, int64_t end) {
  const int64_t lq = g.qs.rs, lk = g.ks.rs;
  const int64_t blocks = ceil_div(g.max_k, kKeyRows);
  std::vector<T> p(kKeyRows * kQueryChunk), ds(kKeyRows * kQueryChunk);
  T lse_hi[kQueryChunk], lse_lo[kQueryChunk], delta[kQueryChunk];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bhk = item / blocks, b = bhk / g.Hkv, hk = bhk % g.Hkv;
    const int64_t Sq = g.qs.len[b], Sk = g.ks.len[b], j0 = (item % blocks) * kKeyRows;
    if (j0 >= Sk) continue;
    const int64_t N = std::min(kKeyRows, Sk - j0), off = Sk - Sq, krow = g.ks.row(b, hk, j0);
    const int64_t istart = g.causal ? std::max<int64_t>(0, j0 - off) : 0;  // the first query row that sees key j0
    for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
      for (int64_t c0 = istart; c0 < Sq; c0 += kQueryChunk) {
        const int64_t M = std::min(kQueryChunk, Sq - c0), qrow = g.qs.row(b, h, c0);
        product_nt(g.blas, N, M, g.k, krow, lk, g.q, qrow, lq, T(0), p.data(), kQueryChunk);       // S^T
        product_nt(g.blas, N, M, g.v, krow, lk, w.dout, qrow, lq, T(0), ds.data(), kQueryChunk);   // dP^T
        for (int64_t i = 0; i < M; ++i) {
          const int64_t stat = g.stats.row(b, h, c0 + i);
          lse_hi[i] = static_cast<T>(w.lse[stat]);
          lse_lo[i] = static_cast<T>(w.lse[stat] - static_cast<double>(lse_hi[i]));
          delta[i] = static_cast<T>(w.delta[stat]);
        }
        for (int64_t j = 0; j < N; ++j) {
          T* prow = p.data() + j * kQueryChunk;
          T* dsrow = ds.data() + j * kQueryChunk;
          // Query column i sees key j0 + j iff c0 + i + off >= j0 + j.
          const int64_t ifirst = g.causal ? std::min<int64_t>(M, std::max<int64_t>(0, j0 + j - off - c0)) : 0;
          std::fill(prow, prow + ifirst, T(0));
          std::fill(dsrow, dsrow + ifirst, T(0));
#pragma omp simd
          for (int64_t i = ifirst; i < M; ++i) {
            const T pe = exp_nonpositive((prow[i] - lse_hi[i]) - lse_lo[i]);
            prow[i] = pe;
            dsrow[i] = pe * (dsrow[i] - delta[i]);
          }
        }
        product_parts(g.blas, false, N, M, p.data(), kQueryChunk, w.dout, qrow, lq, T(1), w.dv, krow, lk);
        product_parts(g.blas, false, N, M, ds.data(), kQueryChunk, g.q, qrow, lq, T(1), w.dk, krow, lk);
      }
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

// A tensor of a dense side as the passes address it: a token-major side's as (B, S, heads, width), any other as
// it is. Its own inverse: it turns the passes' results back into (B, heads, S, width) views.
inline Tensor side_view(const Tensor& t, bool token_major) { return token_major ? t.transpose(1, 2) : t; }

// Validated geometry of one call, with the per-sequence starts and lengths the Rows point into.
struct Layout {
  int64_t B = 0, H = 0, Hkv = 0, D = 0, R = 0, Rv = 0, max_q = 0, max_k = 0, total_q = 0;
  bool packed = false;
  bool q_token_major = false, k_token_major = false;  // dense sides only
  std::vector<int64_t> start_q, len_q, start_k, len_k;
  Rows qs{}, ks{}, stats{};
  std::vector<int64_t> lse_shape;
};

// Per-sequence starts and lengths from cu_seqlens (int32 or int64, B + 1 non-decreasing offsets ending at total).
void read_offsets(const Tensor& cu, int64_t total, const char* name, std::vector<int64_t>& start,
                  std::vector<int64_t>& len) {
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1 && cu.device().is_cpu() &&
                  (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong),
              kWhere, name, ": expected a 1-D int32/int64 CPU tensor of B + 1 offsets");
  // Read as they are (int32 from the Python layer): a conversion per call would cost more than the reading.
  const Tensor c = cu.contiguous();
  const int64_t B = c.numel() - 1;
  const auto read = [&](const auto* p) {
    TORCH_CHECK(p[0] == 0 && p[B] == total, kWhere, name, ": must run from 0 to ", total);
    start.assign(p, p + B);
    len.resize(B);
    for (int64_t b = 0; b < B; ++b) {
      len[b] = static_cast<int64_t>(p[b + 1]) - p[b];
      TORCH_CHECK(len[b] >= 0, kWhere, name, ": offsets must be non-decreasing");
    }
  };
  if (c.scalar_type() == at::kInt) {
    read(c.data_ptr<int32_t>());
  } else {
    read(c.data_ptr<int64_t>());
  }
}

// q: a CPU tensor of a supported dtype; then the checks of checks.h, widths D, R, Rv >= 1 (the interface's), and
// the offsets of the packed layout, read here.
Layout check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& q_c,
                    const std::optional<Tensor>& k_c, const std::optional<Tensor>& v_c,
                    const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k, int64_t max_q,
                    int64_t max_k) {
  check_defined(q, kWhere, "q");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, kWhere,
              "q: expected float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(q.device().is_cpu(), kWhere, "q: expected a CPU tensor, got one on ", q.device());
  Layout L;
  L.packed = check_packed(kWhere, cu_q, cu_k);
  const CircuitAttentionSizes sizes = check_circuit_attention_args(kWhere, L.packed, q, k, v, q_c, k_c, v_c);
  L.D = sizes.D, L.H = sizes.H, L.Hkv = sizes.Hkv, L.R = sizes.R, L.Rv = sizes.Rv;
  TORCH_CHECK(L.D >= 1, kWhere, "q: expected a head dim D >= 1, got shape ", q.sizes());
  TORCH_CHECK(!q_c.has_value() || L.R >= 1, kWhere, "q_c: expected a width R >= 1, got shape ", q_c->sizes());
  TORCH_CHECK(!v_c.has_value() || L.Rv >= 1, kWhere, "v_c: expected a width Rv >= 1, got shape ", v_c->sizes());
  if (L.packed) {
    read_offsets(*cu_q, q.size(0), "cu_seqlens_q", L.start_q, L.len_q);
    read_offsets(*cu_k, k.size(0), "cu_seqlens_k", L.start_k, L.len_k);
    L.B = static_cast<int64_t>(L.len_q.size());
    TORCH_CHECK(static_cast<int64_t>(L.len_k.size()) == L.B, kWhere,
                "cu_seqlens_k: expected as many offsets as cu_seqlens_q");
    L.max_q = 0, L.max_k = 0;
    for (int64_t b = 0; b < L.B; ++b) L.max_q = std::max(L.max_q, L.len_q[b]), L.max_k = std::max(L.max_k, L.len_k[b]);
    TORCH_CHECK(L.max_q <= max_q && L.max_k <= max_k, kWhere,
                "max_seqlen_q / max_seqlen_k: below the longest sequence");
    L.total_q = q.size(0);
    L.qs = Rows{0, 1, L.H, L.start_q.data(), L.len_q.data()};
    L.ks = Rows{0, 1, L.Hkv, L.start_k.data(), L.len_k.data()};
    L.stats = Rows{0, L.total_q, 1, L.start_q.data(), L.len_q.data()};
    L.lse_shape = {L.H, L.total_q};
  } else {
    L.B = sizes.B;
    L.max_q = sizes.rows_q, L.max_k = sizes.rows_k;
    L.start_q.assign(L.B, 0), L.start_k.assign(L.B, 0);
    L.len_q.assign(L.B, L.max_q), L.len_k.assign(L.B, L.max_k);
    L.q_token_major = is_token_major(q), L.k_token_major = is_token_major(k);
    L.qs = L.q_token_major ? Rows{L.max_q * L.H, 1, L.H, L.start_q.data(), L.len_q.data()}
                           : Rows{L.H * L.max_q, L.max_q, 1, L.start_q.data(), L.len_q.data()};
    L.ks = L.k_token_major ? Rows{L.max_k * L.Hkv, 1, L.Hkv, L.start_k.data(), L.len_k.data()}
                           : Rows{L.Hkv * L.max_k, L.max_k, 1, L.start_k.data(), L.len_k.data()};
    L.stats = Rows{L.H * L.max_q, L.max_q, 1, L.start_q.data(), L.len_q.data()};  // lse (B, H, Sq) either way
    L.lse_shape = {L.B, L.H, L.max_q};
  }
  return L;
}

// The operands as the passes take them. q is scaled once (S = (scale q) k^T + q_c k_c^T: the correction's dot
// keeps its own magnitude), and each side's two parts are joined into one tensor ([scale q, q_c], [k, k_c],
// [v, v_c], [dO, dO_c]) when the query rows are many enough (kJoinRows) to repay the copy: one product of
// width D + R then replaces a D-wide and an R-wide one (which runs at a fraction of the speed). Decoding (few
// query rows against a long cache) reads the parts where they lie.
struct Operand {
  Tensor main, corr;     // contiguous side views (side_view), in the accumulator dtype; corr undefined when
                         // joined or absent
  int64_t D = 0, R = 0;  // the widths the passes see
};

inline Operand operand(const Tensor& x, const std::optional<Tensor>& correction, int64_t width, bool join,
                       bool token_major, double x_scale = 1.0) {
  Operand o;
  o.main = to_acc(side_view(x, token_major));
  if (x_scale != 1.0) o.main = o.main * x_scale;
  if (width > 0 && join) o.main = at::cat({o.main, to_acc(side_view(*correction, token_major))}, -1);
  if (width > 0 && !join) o.corr = to_acc(side_view(*correction, token_major));
  o.D = o.main.size(-1), o.R = o.corr.defined() ? o.corr.size(-1) : 0;
  return o;
}

// A result shaped like operand o (zeroed, or uninitialised).
inline Operand like(const Operand& o, bool zeroed) {
  const auto make = [&](const Tensor& t) { return zeroed ? at::zeros_like(t) : at::empty_like(t); };
  return {make(o.main), o.corr.defined() ? make(o.corr) : Tensor(), o.D, o.R};
}

// A result's (width D, correction) pair in its side's layout, split where it was joined; an empty correction where
// there is none.
inline std::pair<Tensor, Tensor> unjoin(const Operand& o, int64_t D, bool token_major) {
  if (o.corr.defined()) return {side_view(o.main, token_major), side_view(o.corr, token_major)};
  const int64_t rest = o.main.size(-1) - D;
  if (rest == 0) return {side_view(o.main, token_major), at::empty({0}, o.main.options())};
  return {side_view(o.main.narrow(-1, 0, D).contiguous(), token_major),
          side_view(o.main.narrow(-1, D, rest).contiguous(), token_major)};
}

// q, k and v as the passes take them (q scaled; parts joined from kJoinRows query rows, see Operand).
struct Sides {
  bool join;
  Operand q, k, v;
};

inline Sides sides(const Layout& L, const Tensor& q, const Tensor& k, const Tensor& v,
                   const std::optional<Tensor>& q_c, const std::optional<Tensor>& k_c,
                   const std::optional<Tensor>& v_c, double scale) {
  const bool join = L.max_q >= kJoinRows;
  return {join, operand(q, q_c, L.R, join, L.q_token_major, scale), operand(k, k_c, L.R, join, L.k_token_major),
          operand(v, v_c, L.Rv, join, L.k_token_major)};
}

template <typename P>
Parts<P> parts(const Operand& o) {
  using T = std::remove_const_t<P>;
  return {o.main.data_ptr<T>(), o.R ? o.corr.data_ptr<T>() : nullptr, o.D, o.R};
}

template <typename T>
Problem<T> make_problem(const Layout& L, bool causal, const Operand& q, const Operand& k, const Operand& v) {
  Problem<T> g{};
  g.B = L.B, g.H = L.H, g.Hkv = L.Hkv, g.group = L.H / L.Hkv;
  g.max_q = L.max_q, g.max_k = L.max_k;
  g.causal = causal;
  g.qs = L.qs, g.ks = L.ks, g.stats = L.stats;
  g.q = parts<const T>(q), g.k = parts<const T>(k), g.v = parts<const T>(v);
  g.blas = blas_gemm<T>();
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

// Query rows per forward work item: the most (of kFwdRows, halved down to kFwdRowsMin) that still gives every
// thread two items: bigger blocks make bigger products, but a thread left idle costs more.
inline int64_t forward_rows(const Layout& L) {
  int64_t rows = kFwdRows;
  while (rows > kFwdRowsMin && L.B * L.H * ceil_div(L.max_q, rows) < 2 * at::get_num_threads()) rows /= 2;
  return rows;
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
  const Sides in = sides(L, q, k, v, q_c, k_c, v_c, scale);
  const Operand &qo = in.q, &ko = in.k, &vo = in.v;
  auto shape = side_view(q, L.q_token_major).sizes().vec();
  Operand out;
  shape.back() = vo.D;
  out.main = at::empty(shape, q.options().dtype(adt)), out.D = vo.D;
  shape.back() = vo.R;
  if (vo.R) out.corr = at::empty(shape, q.options().dtype(adt)), out.R = vo.R;
  Tensor lse = at::empty(L.lse_shape, q.options().dtype(at::kDouble));
  const Isa isa = cpu_isa();
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const Problem<T> g = make_problem<T>(L, causal, qo, ko, vo);
    const int64_t rows = forward_rows(L);
    const FwdOut<T> o{parts<T>(out), lse.data_ptr<double>(), rows};
    const int64_t per_item = rows * std::max<int64_t>(1, L.max_k) * (2 * L.D + L.R + L.Rv);
    at::parallel_for(0, L.B * L.H * ceil_div(L.max_q, rows), grain_items(per_item),
                     [&](int64_t b, int64_t e) { run_on_isa<ForwardPass>(isa, g, o, b, e); });
  };
  if (adt == at::kDouble) run(double{}); else run(float{});
  auto [o, oc] = unjoin(out, L.D, L.q_token_major);
  if (dt != adt) {
    o = o.to(dt), oc = oc.to(dt);
    lse = lse.to(at::kFloat);  // 16-bit inputs: float32 statistics, as on every backend
  }
  return {o, oc, lse};
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
  TORCH_CHECK(grad_out.sizes() == q.sizes(), kWhere, "grad_out: expected q's shape ", q.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(lse.sizes().vec() == L.lse_shape, kWhere, "lse: expected shape ", L.lse_shape,
              ", got ", lse.sizes());
  if (L.Rv) {
    auto shape = q.sizes().vec();
    shape.back() = L.Rv;
    TORCH_CHECK(grad_out_c.sizes().vec() == shape, kWhere, "grad_out_c: expected shape ", shape,
                ", got ", grad_out_c.sizes());
  }
  (void)out, (void)out_c;  // Delta is rowsum(P * dP), recomputed (see the design notes)
  const Sides in = sides(L, q, k, v, q_c, k_c, v_c, scale);
  const Operand &qo = in.q, &ko = in.k, &vo = in.v;
  const Operand go = operand(grad_out, L.Rv ? std::optional<Tensor>(grad_out_c) : std::nullopt, L.Rv, in.join,
                             L.q_token_major);
  const Tensor lse_d = lse.to(at::kDouble).contiguous();
  Tensor delta = at::empty(L.lse_shape, q.options().dtype(at::kDouble));
  // Every dq row is written by one item; both backwards add into dk / dv (a key no query sees keeps zeros).
  const Operand dq = like(qo, false), dk = like(ko, true), dv = like(vo, true);
  const bool fused = use_fused_backward(L.B * L.Hkv);
  const Isa isa = cpu_isa();
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const Problem<T> g = make_problem<T>(L, causal, qo, ko, vo);
    const BwdData<T> w{parts<const T>(go), lse_d.data_ptr<double>(), delta.data_ptr<double>(), parts<T>(dq),
                       parts<T>(dk), parts<T>(dv)};
    const int64_t width = 2 * L.D + L.R + L.Rv;
    if (fused) {
      at::parallel_for(0, L.B * L.Hkv, 1,
                       [&](int64_t b, int64_t e) { run_on_isa<BackwardFusedPass>(isa, g, w, b, e); });
      return;
    }
    at::parallel_for(0, L.B * L.H * ceil_div(L.max_q, kBwdRows),
                     grain_items(kBwdRows * std::max<int64_t>(1, L.max_k) * width),
                     [&](int64_t b, int64_t e) { run_on_isa<BackwardQueryPass>(isa, g, w, b, e); });
    at::parallel_for(0, L.B * L.Hkv * ceil_div(L.max_k, kKeyRows),
                     grain_items(kKeyRows * std::max<int64_t>(1, L.max_q) * (L.H / L.Hkv) * width),
                     [&](int64_t b, int64_t e) { run_on_isa<BackwardKeyPass>(isa, g, w, b, e); });
  };
  if (adt == at::kDouble) run(double{}); else run(float{});
  auto [dq_main, dqc] = unjoin(dq, L.D, L.q_token_major);
  auto [dk_main, dkc] = unjoin(dk, L.D, L.k_token_major);
  auto [dv_main, dvc] = unjoin(dv, L.D, L.k_token_major);
  dq_main = dq_main * scale;  // back through the scaling of q
  const auto fin = [&](const Tensor& t) { return dt == adt ? t : t.to(dt); };
  return {fin(dq_main), fin(dk_main), fin(dv_main), fin(dqc), fin(dkc), fin(dvc)};
}

}  // namespace cpu
}  // namespace recursive_kernels
