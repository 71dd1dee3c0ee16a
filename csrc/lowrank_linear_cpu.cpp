// lowrank_linear, CPU backend (ATen + OpenMP through at::parallel_for).
//
//   y[t] = x[t] @ W.T + b + s * sum_j g[t, j] * (x[t] @ A_e.T) @ B_e.T,   e = indices[t, j]
//
// Design.
// * The dense, shared matmuls (x @ W.T + b, grad_y @ W, grad_y.T @ x) go to ATen (multithreaded BLAS /
//   oneDNN); they dominate the cost.
// * The (row, slot) assignments are counting-sorted by adapter in O(M k) into a "plan": every slot with an
//   adapter gets a row of a work buffer, the rows of one adapter contiguous (buffer row q <-> slot).
// * Small problems (decode; up to a few million low-rank multiply-adds per used adapter) run on
//   hand-written loop kernels parallelised with at::parallel_for: u = A_e x (4 ranks x 2 rows register-
//   blocked dot products), v = grad_y B_e (rank-wide accumulators), and dlora_a / dlora_b as per-adapter
//   reductions (one item per adapter and rank / column chunk, so no atomics and no per-row weight copies).
//   Larger problems (prefill) do those products with one ATen matmul per used adapter on the adapter's rows
//   gathered into an fp32/fp64 buffer: the per-op overhead is amortised and BLAS is faster.
// * The output-bound products, whose contraction is the short rank (y += (g s u) B_e^T and dx += (g s v) A_e),
//   always run on loop kernels that add straight into y / dx, per output row and column chunk (every element
//   written by one thread, the k slots of a row summed in fp32 and rounded once; on AVX2 the r-long dot
//   products of eight outputs are reduced together in registers): no (P, N) buffer, no scatter pass.
//   Exception: the identity assignment (one adapter for every row, or per-row indices already sorted) without
//   upcast, where x / grad_y are read as they are and y / dx updated by addmm_, nothing gathered at all.
// * x86 loop kernels are compiled for AVX2+FMA and for the baseline ISA and picked at run time (the
//   extension is built without -march flags); the kernels for ranks 8/16/32/64 are specialised.
// * bfloat16 / float16: low-rank math in fp32 (x rows and the used adapters upcast once per call), results
//   rounded once; the dense matmuls run in the input dtype through ATen. float64 stays float64.
#include "ops_cpu.h"
#include "checks.h"
#include "cpu_dispatch.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace recursive_kernels {
namespace cpu {
namespace {

using at::Tensor;

constexpr const char* kWhere = "lowrank_linear (cpu): ";  // opens every message (see checks.h)

// Work per at::parallel_for chunk, in elements touched.
constexpr int64_t kGrainElems = 1 << 14;

inline int64_t grain_for(int64_t per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, per_item));
}

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Path choice: the loop kernels save the per-op overhead of one ATen matmul per used adapter and product,
// BLAS is faster per multiply-add. So the loops run while the low-rank work (P slots * r * (K + N)
// multiply-adds) is at most this much per used adapter; measured crossovers on a 2-core AVX-512 machine
// (fp32 and bf16, r = 16, K = N = 1024, E = 1 or 8).
constexpr double kLoopMacsPerAdapterForward = 4.0e6;
constexpr double kLoopMacsPerAdapterBackward = 4.0e5;

// RECURSIVE_KERNELS_CPU_PATH=grouped|loops forces a path (for tests and benchmarks); read on every call.
int forced_path() {
  const char* env = std::getenv("RECURSIVE_KERNELS_CPU_PATH");
  if (env == nullptr || env[0] == '\0') return 0;
  const std::string v(env);
  return v == "grouped" ? 1 : v == "loops" ? 2 : 0;
}

// The (row, slot) assignments sorted by adapter, and the work-buffer layout.
struct Plan {
  int64_t M = 0, k = 1, E = 0;
  int64_t P = 0;          // slots that have an adapter (index != -1)
  int64_t Q = 0;          // rows of the work buffers (== P)
  bool loops = false;     // hand-written loop kernels instead of ATen matmuls
  bool identity = false;  // ATen path, k == 1 and buffer row q is row q of x for every q (so Q == M)
  std::vector<int64_t> begin, count;  // E: adapter e's buffer rows are [begin[e], begin[e] + count[e])
  std::vector<int64_t> slot_of;       // Q: the slot id t * k + j of each buffer row
  std::vector<int64_t> ad_of;         // Q: the adapter of each buffer row
  std::vector<int64_t> buf_of;        // M * k: the buffer row of each slot, -1 for an empty slot
  std::vector<double> coef;           // Q: scaling * gate of each buffer row
  std::vector<int64_t> used;          // adapters with at least one slot, ascending
};

Plan make_plan(int64_t M, int64_t E, int64_t r, int64_t K, int64_t N, const std::optional<Tensor>& indices,
               const std::optional<Tensor>& gates, double scaling, int64_t adapter, bool acc_is_input,
               double loop_macs_per_adapter) {
  Plan pl;
  pl.M = M;
  pl.E = E;
  pl.begin.assign(E, 0);
  pl.count.assign(E, 0);
  Tensor idx;
  const int64_t* ip = nullptr;
  if (indices.has_value()) {
    idx = indices->to(at::kLong).contiguous();
    ip = idx.data_ptr<int64_t>();
    pl.k = idx.size(1);
  }
  const int64_t S = M * pl.k;
  auto adapter_of = [&](int64_t s) { return ip ? ip[s] : adapter; };  // -1: none
  for (int64_t s = 0; s < S; ++s) {
    const int64_t e = adapter_of(s);
    TORCH_CHECK(e >= -1 && e < E, kWhere, "indices: value ", e, " is outside [-1, ", E, ")");
    if (e >= 0) ++pl.count[e];
  }
  for (int64_t e = 0; e < E; ++e) {
    pl.begin[e] = pl.P;
    pl.P += pl.count[e];
    if (pl.count[e] > 0) pl.used.push_back(e);
  }
  pl.Q = pl.P;

  pl.slot_of.assign(pl.Q, -1);
  pl.ad_of.assign(pl.Q, 0);
  pl.buf_of.assign(S, -1);
  pl.coef.assign(pl.Q, 0.0);
  std::vector<int64_t> fill(pl.begin);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t e = adapter_of(s);
    if (e < 0) continue;
    const int64_t q = fill[e]++;
    pl.slot_of[q] = s;
    pl.ad_of[q] = e;
    pl.buf_of[s] = q;
    pl.coef[q] = scaling;
  }
  if (gates.has_value()) {
    const Tensor g = gates->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "lowrank_linear_cpu_gates", [&] {
      const scalar_t* gp = g.data_ptr<scalar_t>();
      for (int64_t q = 0; q < pl.Q; ++q) pl.coef[q] = scaling * static_cast<double>(gp[pl.slot_of[q]]);
    });
  }
  bool identity = pl.k == 1 && pl.P == M;
  for (int64_t q = 0; identity && q < pl.Q; ++q) identity = pl.slot_of[q] == q;
  // Path: the identity assignment without an upcast goes straight to BLAS (no gather, no scatter: nothing
  // for the loops to save); otherwise the loop kernels up to loop_macs_per_adapter per used adapter.
  const double work = static_cast<double>(pl.P) * static_cast<double>(r) * static_cast<double>(K + N);
  pl.loops = !(identity && acc_is_input) && work <= loop_macs_per_adapter * static_cast<double>(pl.used.size());
  if (forced_path() != 0) pl.loops = forced_path() == 2;
  pl.identity = identity && !pl.loops;
  return pl;
}

// out (Q, C) acc: row q = src[row of slot_of[q]]. src (rows, C) of dtype T, any strides.
template <typename T, typename A>
Tensor gather_rows(const Tensor& src_in, const Plan& pl) {
  const int64_t C = src_in.size(1);
  Tensor out = at::empty({pl.Q, C}, src_in.options().dtype(c10::CppTypeToScalarType<A>::value));
  if (pl.Q == 0 || C == 0) return out;
  const Tensor src = (C > 1 && src_in.stride(1) != 1) ? src_in.contiguous() : src_in;
  const T* base = src.data_ptr<T>();
  const int64_t s0 = src.stride(0);
  A* o = out.data_ptr<A>();
  at::parallel_for(0, pl.Q, grain_for(C), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      A* dst = o + q * C;
      const T* in = base + (pl.slot_of[q] / pl.k) * s0;
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<A>(in[c]);
    }
  });
  return out;
}

// The buffer rows the low-rank products read: src itself where no gather/upcast is needed, else gathered.
template <typename T, typename A>
Tensor rows_for(const Tensor& src, const Plan& pl) {
  if (pl.identity && std::is_same<T, A>::value) return src;
  return gather_rows<T, A>(src, pl);
}

// An (E, R, C) adapter stack in the accumulator dtype A, contiguous: src itself when it already is A (and
// force_copy is false), else the used adapters' slices converted, the unused ones left uninitialised and
// never read. force_copy: copy even if src is A already (to get a unit innermost stride).
template <typename T, typename A>
Tensor adapters_acc(const Tensor& src, const Plan& pl, bool force_copy = false) {
  if (std::is_same<T, A>::value && !force_copy) return src;
  const int64_t E = src.size(0), R = src.size(1), C = src.size(2);
  Tensor out = at::empty({E, R, C}, src.options().dtype(c10::CppTypeToScalarType<A>::value));
  const T* base = src.data_ptr<T>();
  const int64_t s0 = src.stride(0), s1 = src.stride(1), s2 = src.stride(2);
  A* o = out.data_ptr<A>();
  const int64_t rows = static_cast<int64_t>(pl.used.size()) * R;
  at::parallel_for(0, rows, grain_for(C), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const int64_t ad = pl.used[q / R], i = q % R;
      const T* in = base + ad * s0 + i * s1;
      A* dst = o + (ad * R + i) * C;
      if (s2 == 1) {
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<A>(in[c]);
      } else {
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<A>(in[c * s2]);
      }
    }
  });
  return out;
}

// (Q, C) contiguous A: row q = coef[q] * src_row(q)[0:C].
template <typename A, typename RowFn>
Tensor scaled_rows(int64_t Q, int64_t C, const at::TensorOptions& opt, const Plan& pl, RowFn src_row) {
  Tensor out = at::empty({Q, C}, opt);
  A* o = out.data_ptr<A>();
  at::parallel_for(0, Q, grain_for(C), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      A* dst = o + q * C;
      const A c = static_cast<A>(pl.coef[q]);
      const A* in = src_row(q);
      for (int64_t i = 0; i < C; ++i) dst[i] = c * in[i];
    }
  });
  return out;
}

// at::mm_out into a view (it wants an lvalue).
inline void mm_into(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }

// out (Q, Cout) = per used adapter e: in_e (e's buffer rows, Cin) @ stack[e] (Cin, Cout). Any strides.
void grouped_mm(Tensor& out, const Tensor& in, const Tensor& stack, const Plan& pl) {
  for (int64_t e : pl.used) {
    const int64_t o = pl.begin[e], n = pl.count[e];
    mm_into(out.narrow(0, o, n), in.narrow(0, o, n), stack.select(0, e));
  }
}

// (E, C1, C2) = per adapter e: in1_e.T @ in2_e (a sum over e's buffer rows); zero for unused adapters.
Tensor grouped_tn(const Tensor& in1, const Tensor& in2, const Plan& pl) {
  const int64_t C1 = in1.size(1), C2 = in2.size(1);
  const bool all_used = static_cast<int64_t>(pl.used.size()) == pl.E;
  Tensor dst = all_used ? at::empty({pl.E, C1, C2}, in1.options()) : at::zeros({pl.E, C1, C2}, in1.options());
  for (int64_t e : pl.used) {
    const int64_t o = pl.begin[e], n = pl.count[e];
    mm_into(dst.select(0, e), in1.narrow(0, o, n).t(), in2.narrow(0, o, n));
  }
  return dst;
}

// ---------------------------------------------------------------------------------------------------
// Hand-written loop kernels for small problems (decode): no ATen op per adapter, no work buffers beyond
// u/v, every output element written by exactly one thread. Bodies are plain loops (#pragma omp simd for
// the reductions); on x86 they are compiled twice, for AVX2+FMA and for the baseline ISA, and picked at
// run time (the extension is built without -march flags).

// An (E, R, C) adapter stack with unit innermost stride.
template <typename A>
struct Stack {
  const A* p = nullptr;
  int64_t s0 = 0, s1 = 0;
  const A* row(int64_t e, int64_t i) const { return p + e * s0 + i * s1; }
};

template <typename A>
struct LoopArgs {
  LoopArgs(const Plan* plan, int64_t K_, int64_t N_, int64_t r_) : pl(plan), K(K_), N(N_), r(r_) {}
  const Plan* pl;
  int64_t K, N, r;
  Stack<A> la;                       // (E, r, K)
  Stack<A> lb;                       // (E, N, r)
  const A* const* xrow = nullptr;    // Q: the x row of each buffer row (unit stride, length K)
  const A* const* grow = nullptr;    // Q: the grad_y row of each buffer row (length N)
  const A* w = nullptr;              // (Q, r): coef * u (forward) or coef * v (backward) or coef * u (dB)
  A* out = nullptr;                  // kernel-specific output
  const int64_t* tiles = nullptr;    // u kernel: (adapter, first, end) buffer rows of each tile
};

// Rows of one adapter that one u-kernel item handles.
constexpr int64_t kRowTile = 32;

// u[q, :] = A_e @ x_q ; item = (tile of up to kRowTile buffer rows of one adapter, block of 4 ranks).
template <typename A>
RK_INLINE void k_u_body(const LoopArgs<A>& a, int64_t item) {
  const int64_t nrb = (a.r + 3) / 4;
  const int64_t* tile = a.tiles + 3 * (item / nrb);
  const int64_t ad = tile[0], q0 = tile[1], q1 = tile[2];
  const int64_t r0 = (item % nrb) * 4;
  const A* a0 = a.la.row(ad, std::min(r0 + 0, a.r - 1));
  const A* a1 = a.la.row(ad, std::min(r0 + 1, a.r - 1));
  const A* a2 = a.la.row(ad, std::min(r0 + 2, a.r - 1));
  const A* a3 = a.la.row(ad, std::min(r0 + 3, a.r - 1));
  const int64_t K = a.K;
  for (int64_t q = q0; q < q1; q += 2) {
    const A* x0 = a.xrow[q];
    const A* x1 = a.xrow[std::min(q + 1, q1 - 1)];
    A s00 = 0, s01 = 0, s10 = 0, s11 = 0, s20 = 0, s21 = 0, s30 = 0, s31 = 0;
#pragma omp simd reduction(+ : s00, s01, s10, s11, s20, s21, s30, s31)
    for (int64_t c = 0; c < K; ++c) {
      const A v0 = x0[c], v1 = x1[c];
      s00 += a0[c] * v0;
      s01 += a0[c] * v1;
      s10 += a1[c] * v0;
      s11 += a1[c] * v1;
      s20 += a2[c] * v0;
      s21 += a2[c] * v1;
      s30 += a3[c] * v0;
      s31 += a3[c] * v1;
    }
    const A c0[4] = {s00, s10, s20, s30}, c1[4] = {s01, s11, s21, s31};
    for (int64_t i = 0; i < 4 && r0 + i < a.r; ++i) {
      a.out[q * a.r + r0 + i] = c0[i];
      if (q + 1 < q1) a.out[(q + 1) * a.r + r0 + i] = c1[i];
    }
  }
}

// tmp[0:cn] = sum over the slots of row t of (coef u)_q @ B_e[n0:n0+cn].T ; item = (row, chunk of N).
template <typename A>
RK_INLINE void k_expand_body(const LoopArgs<A>& a, int64_t t, int64_t n0, int64_t cn, A* tmp) {
  const int64_t k = a.pl->k, r = a.r;
  for (int64_t n = 0; n < cn; ++n) tmp[n] = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t q = a.pl->buf_of[t * k + j];
    if (q < 0) continue;
    const int64_t ad = a.pl->ad_of[q];
    const A* w = a.w + q * r;
    const A* B = a.lb.row(ad, n0);
    const int64_t bs = a.lb.s1;
    int64_t n = 0;
    for (; n + 4 <= cn; n += 4) {
      const A *b0 = B + n * bs, *b1 = b0 + bs, *b2 = b1 + bs, *b3 = b2 + bs;
      A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t i = 0; i < r; ++i) {
        s0 += b0[i] * w[i];
        s1 += b1[i] * w[i];
        s2 += b2[i] * w[i];
        s3 += b3[i] * w[i];
      }
      tmp[n] += s0;
      tmp[n + 1] += s1;
      tmp[n + 2] += s2;
      tmp[n + 3] += s3;
    }
    for (; n < cn; ++n) {
      const A* b0 = B + n * bs;
      A s0 = 0;
#pragma omp simd reduction(+ : s0)
      for (int64_t i = 0; i < r; ++i) s0 += b0[i] * w[i];
      tmp[n] += s0;
    }
  }
}

// Kernels whose innermost loop runs over the rank are instantiated for common ranks (R > 0: compile-time,
// accumulators in registers) and for any rank (R = 0).
#define RK_RANK_SWITCH(r, CALL) \
  switch (r) {                  \
    case 8: CALL(8); break;     \
    case 16: CALL(16); break;   \
    case 32: CALL(32); break;   \
    case 64: CALL(64); break;   \
    default: CALL(0); break;    \
  }

// out[q, :] = grad_y_q @ B_e  (v, length r) ; item = buffer row q.
template <typename A, int R>
RK_INLINE void k_v_rank(const LoopArgs<A>& a, int64_t q) {
  const int64_t r = R > 0 ? R : a.r, N = a.N;
  A* o = a.out + q * r;
  const A* g = a.grow[q];
  const A* B = a.lb.row(a.pl->ad_of[q], 0);
  const int64_t bs = a.lb.s1;
  if constexpr (R > 0) {
    A acc[R] = {};
    for (int64_t n = 0; n < N; ++n) {
      const A g0 = g[n];
      const A* b0 = B + n * bs;
      for (int64_t i = 0; i < R; ++i) acc[i] += g0 * b0[i];
    }
    for (int64_t i = 0; i < R; ++i) o[i] = acc[i];
  } else {
    for (int64_t i = 0; i < r; ++i) o[i] = 0;
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) {
      const A g0 = g[n], g1 = g[n + 1], g2 = g[n + 2], g3 = g[n + 3];
      const A *b0 = B + n * bs, *b1 = b0 + bs, *b2 = b1 + bs, *b3 = b2 + bs;
#pragma omp simd
      for (int64_t i = 0; i < r; ++i) o[i] += g0 * b0[i] + g1 * b1[i] + g2 * b2[i] + g3 * b3[i];
    }
    for (; n < N; ++n) {
      const A g0 = g[n];
      const A* b0 = B + n * bs;
#pragma omp simd
      for (int64_t i = 0; i < r; ++i) o[i] += g0 * b0[i];
    }
  }
}

template <typename A>
RK_INLINE void k_v_body(const LoopArgs<A>& a, int64_t q) {
#define RK_CALL(R) k_v_rank<A, R>(a, q)
  RK_RANK_SWITCH(a.r, RK_CALL)
#undef RK_CALL
}

// tmp[0:cc] = sum over the slots of row t of (coef v)_q @ A_e[:, c0:c0+cc] ; item = (row, chunk of K).
template <typename A>
RK_INLINE void k_dx_body(const LoopArgs<A>& a, int64_t t, int64_t c0, int64_t cc, A* tmp) {
  const int64_t k = a.pl->k, r = a.r;
  for (int64_t c = 0; c < cc; ++c) tmp[c] = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t q = a.pl->buf_of[t * k + j];
    if (q < 0) continue;
    const int64_t ad = a.pl->ad_of[q];
    const A* w = a.w + q * r;
    int64_t i = 0;
    for (; i + 4 <= r; i += 4) {
      const A w0 = w[i], w1 = w[i + 1], w2 = w[i + 2], w3 = w[i + 3];
      const A *p0 = a.la.row(ad, i) + c0, *p1 = a.la.row(ad, i + 1) + c0, *p2 = a.la.row(ad, i + 2) + c0,
              *p3 = a.la.row(ad, i + 3) + c0;
#pragma omp simd
      for (int64_t c = 0; c < cc; ++c) tmp[c] += w0 * p0[c] + w1 * p1[c] + w2 * p2[c] + w3 * p3[c];
    }
    for (; i < r; ++i) {
      const A w0 = w[i];
      const A* p0 = a.la.row(ad, i) + c0;
#pragma omp simd
      for (int64_t c = 0; c < cc; ++c) tmp[c] += w0 * p0[c];
    }
  }
}

// out (E, r, K): row (e, i) = sum over e's buffer rows q of (coef v)[q, i] * x_q ; item = (adapter, rank).
// The first (up to) four rows are assigned, later ones added: one pass over the output row for n_e <= 4.
template <typename A>
RK_INLINE void k_da_body(const LoopArgs<A>& a, int64_t item) {
  const int64_t r = a.r, K = a.K;
  const int64_t ad = a.pl->used[item / r], i = item % r;
  A* o = a.out + (ad * r + i) * K;
  const int64_t q0 = a.pl->begin[ad], q1 = q0 + a.pl->count[ad];
  auto g = [&](int64_t q) { return a.w[q * r + i]; };
  const int64_t m = std::min<int64_t>(4, q1 - q0);
  const A* x0 = a.xrow[q0];
  if (m == 1) {
    const A g0 = g(q0);
#pragma omp simd
    for (int64_t c = 0; c < K; ++c) o[c] = g0 * x0[c];
  } else if (m == 2) {
    const A g0 = g(q0), g1 = g(q0 + 1);
    const A* x1 = a.xrow[q0 + 1];
#pragma omp simd
    for (int64_t c = 0; c < K; ++c) o[c] = g0 * x0[c] + g1 * x1[c];
  } else if (m == 3) {
    const A g0 = g(q0), g1 = g(q0 + 1), g2 = g(q0 + 2);
    const A *x1 = a.xrow[q0 + 1], *x2 = a.xrow[q0 + 2];
#pragma omp simd
    for (int64_t c = 0; c < K; ++c) o[c] = g0 * x0[c] + g1 * x1[c] + g2 * x2[c];
  } else {
    const A g0 = g(q0), g1 = g(q0 + 1), g2 = g(q0 + 2), g3 = g(q0 + 3);
    const A *x1 = a.xrow[q0 + 1], *x2 = a.xrow[q0 + 2], *x3 = a.xrow[q0 + 3];
#pragma omp simd
    for (int64_t c = 0; c < K; ++c) o[c] = g0 * x0[c] + g1 * x1[c] + g2 * x2[c] + g3 * x3[c];
  }
  int64_t q = q0 + m;
  for (; q + 4 <= q1; q += 4) {
    const A g0 = g(q), g1 = g(q + 1), g2 = g(q + 2), g3 = g(q + 3);
    const A *y0 = a.xrow[q], *y1 = a.xrow[q + 1], *y2 = a.xrow[q + 2], *y3 = a.xrow[q + 3];
#pragma omp simd
    for (int64_t c = 0; c < K; ++c) o[c] += g0 * y0[c] + g1 * y1[c] + g2 * y2[c] + g3 * y3[c];
  }
  for (; q < q1; ++q) {
    const A g0 = g(q);
    const A* y0 = a.xrow[q];
#pragma omp simd
    for (int64_t c = 0; c < K; ++c) o[c] += g0 * y0[c];
  }
}

// out (E, N, r): rows n0..n0+cn of adapter e = sum over e's buffer rows q of grad_y_q[n] * (coef u)_q ;
// item = (adapter, chunk of N).
template <typename A, int R>
RK_INLINE void k_db_rank(const LoopArgs<A>& a, int64_t ad, int64_t n0, int64_t cn) {
  const int64_t r = R > 0 ? R : a.r;
  A* o = a.out + (ad * a.N + n0) * r;
  const int64_t q0 = a.pl->begin[ad], q1 = q0 + a.pl->count[ad];
  if constexpr (R > 0) {
    for (int64_t n = 0; n < cn; ++n) {
      A acc[R] = {};
      for (int64_t q = q0; q < q1; ++q) {
        const A h = a.grow[q][n0 + n];
        const A* u = a.w + q * R;
        for (int64_t i = 0; i < R; ++i) acc[i] += h * u[i];
      }
      for (int64_t i = 0; i < R; ++i) o[n * R + i] = acc[i];
    }
  } else {
    for (int64_t z = 0; z < cn * r; ++z) o[z] = 0;
    for (int64_t q = q0; q < q1; ++q) {
      const A* u0 = a.w + q * r;
      const A* g0 = a.grow[q] + n0;
      for (int64_t n = 0; n < cn; ++n) {
        const A h0 = g0[n];
        A* on = o + n * r;
#pragma omp simd
        for (int64_t i = 0; i < r; ++i) on[i] += h0 * u0[i];
      }
    }
  }
}

template <typename A>
RK_INLINE void k_db_body(const LoopArgs<A>& a, int64_t ad, int64_t n0, int64_t cn) {
#define RK_CALL(R) k_db_rank<A, R>(a, ad, n0, cn)
  RK_RANK_SWITCH(a.r, RK_CALL)
#undef RK_CALL
}

// Per-ISA entry points: NAME(args, ...) runs NAME_body compiled for AVX2+FMA where the CPU has it.
#if RK_HAVE_AVX2
#define RK_KERNEL(NAME, PARAMS, ARGS)                                                        \
  RK_AVX2 void NAME##_avx2(const LoopArgs<float>& a PARAMS(float)) { NAME##_body<float>(a ARGS); }    \
  RK_AVX2 void NAME##_avx2(const LoopArgs<double>& a PARAMS(double)) { NAME##_body<double>(a ARGS); } \
  void NAME##_base(const LoopArgs<float>& a PARAMS(float)) { NAME##_body<float>(a ARGS); }             \
  void NAME##_base(const LoopArgs<double>& a PARAMS(double)) { NAME##_body<double>(a ARGS); }          \
  template <typename A>                                                                       \
  void NAME(const LoopArgs<A>& a PARAMS(A)) {                                                 \
    if (cpu_has_avx2()) NAME##_avx2(a ARGS); else NAME##_base(a ARGS);                       \
  }
#else
#define RK_KERNEL(NAME, PARAMS, ARGS)                  \
  template <typename A>                                \
  void NAME(const LoopArgs<A>& a PARAMS(A)) { NAME##_body<A>(a ARGS); }
#endif

#define RK_P_ITEM(A) , int64_t item
#define RK_A_ITEM , item
#define RK_P_CHUNK(A) , int64_t t, int64_t c0, int64_t cn, A* tmp
#define RK_A_CHUNK , t, c0, cn, tmp
#define RK_P_DB(A) , int64_t ad, int64_t n0, int64_t cn
#define RK_A_DB , ad, n0, cn

RK_KERNEL(k_u, RK_P_ITEM, RK_A_ITEM)
RK_KERNEL(k_v, RK_P_ITEM, RK_A_ITEM)
RK_KERNEL(k_da, RK_P_ITEM, RK_A_ITEM)
#if RK_HAVE_AVX2
// The expand for float with AVX2 intrinsics: the reduction runs over r, the contiguous dimension of B, so
// eight outputs are computed at once and their eight partial-sum vectors transposed and added in registers.
RK_AVX2 inline __m256 hsum8x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                              __m256 a7) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

RK_AVX2 void k_expand_avx2(const LoopArgs<float>& a, int64_t t, int64_t n0, int64_t cn, float* tmp) {
  const int64_t k = a.pl->k, r = a.r;
  const int64_t rfull = r & ~int64_t(7), rtail = r - rfull;
  alignas(32) int32_t lanes[8];
  for (int i = 0; i < 8; ++i) lanes[i] = i < rtail ? -1 : 0;
  const __m256i mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  for (int64_t n = 0; n < cn; ++n) tmp[n] = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t q = a.pl->buf_of[t * k + j];
    if (q < 0) continue;
    const float* w = a.w + q * r;
    const float* B = a.lb.row(a.pl->ad_of[q], n0);
    const int64_t bs = a.lb.s1;
    int64_t n = 0;
    for (; n + 8 <= cn; n += 8) {
      const float* b = B + n * bs;
      __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
      for (int64_t i = 0; i < rfull; i += 8) {
        const __m256 wv = _mm256_loadu_ps(w + i);
        c0 = _mm256_fmadd_ps(_mm256_loadu_ps(b + i), wv, c0);
        c1 = _mm256_fmadd_ps(_mm256_loadu_ps(b + bs + i), wv, c1);
        c2 = _mm256_fmadd_ps(_mm256_loadu_ps(b + 2 * bs + i), wv, c2);
        c3 = _mm256_fmadd_ps(_mm256_loadu_ps(b + 3 * bs + i), wv, c3);
        c4 = _mm256_fmadd_ps(_mm256_loadu_ps(b + 4 * bs + i), wv, c4);
        c5 = _mm256_fmadd_ps(_mm256_loadu_ps(b + 5 * bs + i), wv, c5);
        c6 = _mm256_fmadd_ps(_mm256_loadu_ps(b + 6 * bs + i), wv, c6);
        c7 = _mm256_fmadd_ps(_mm256_loadu_ps(b + 7 * bs + i), wv, c7);
      }
      if (rtail) {
        const int64_t i = rfull;
        const __m256 wv = _mm256_maskload_ps(w + i, mask);
        c0 = _mm256_fmadd_ps(_mm256_maskload_ps(b + i, mask), wv, c0);
        c1 = _mm256_fmadd_ps(_mm256_maskload_ps(b + bs + i, mask), wv, c1);
        c2 = _mm256_fmadd_ps(_mm256_maskload_ps(b + 2 * bs + i, mask), wv, c2);
        c3 = _mm256_fmadd_ps(_mm256_maskload_ps(b + 3 * bs + i, mask), wv, c3);
        c4 = _mm256_fmadd_ps(_mm256_maskload_ps(b + 4 * bs + i, mask), wv, c4);
        c5 = _mm256_fmadd_ps(_mm256_maskload_ps(b + 5 * bs + i, mask), wv, c5);
        c6 = _mm256_fmadd_ps(_mm256_maskload_ps(b + 6 * bs + i, mask), wv, c6);
        c7 = _mm256_fmadd_ps(_mm256_maskload_ps(b + 7 * bs + i, mask), wv, c7);
      }
      _mm256_storeu_ps(tmp + n, _mm256_add_ps(_mm256_loadu_ps(tmp + n), hsum8x8(c0, c1, c2, c3, c4, c5, c6, c7)));
    }
    for (; n < cn; ++n) {
      const float* b = B + n * bs;
      float s0 = 0;
      for (int64_t i = 0; i < r; ++i) s0 += b[i] * w[i];
      tmp[n] += s0;
    }
  }
}
RK_AVX2 void k_expand_avx2(const LoopArgs<double>& a, int64_t t, int64_t n0, int64_t cn, double* tmp) {
  k_expand_body<double>(a, t, n0, cn, tmp);
}
void k_expand_base(const LoopArgs<float>& a, int64_t t, int64_t n0, int64_t cn, float* tmp) {
  k_expand_body<float>(a, t, n0, cn, tmp);
}
void k_expand_base(const LoopArgs<double>& a, int64_t t, int64_t n0, int64_t cn, double* tmp) {
  k_expand_body<double>(a, t, n0, cn, tmp);
}
template <typename A>
void k_expand(const LoopArgs<A>& a, int64_t t, int64_t n0, int64_t cn, A* tmp) {
  if (cpu_has_avx2()) k_expand_avx2(a, t, n0, cn, tmp); else k_expand_base(a, t, n0, cn, tmp);
}
#else
RK_KERNEL(k_expand, RK_P_CHUNK, RK_A_CHUNK)
#endif
RK_KERNEL(k_dx, RK_P_CHUNK, RK_A_CHUNK)
RK_KERNEL(k_db, RK_P_DB, RK_A_DB)

// Chunk of the output columns one loop item handles (bounded scratch; splits rows for small M).
constexpr int64_t kColChunk = 256;

// Row pointers (unit column stride, dtype A) of the buffer rows: straight into src where it already is
// A with unit column stride, else into `holder`, a gathered (Q, C) copy.
template <typename T, typename A>
std::vector<const A*> row_pointers(const Tensor& src, const Plan& pl, Tensor& holder) {
  std::vector<const A*> rows(pl.Q);
  const int64_t C = src.size(1);
  if (std::is_same<T, A>::value && (src.stride(1) == 1 || C <= 1)) {
    const A* base = reinterpret_cast<const A*>(src.data_ptr<T>());
    for (int64_t q = 0; q < pl.Q; ++q) rows[q] = base + (pl.slot_of[q] / pl.k) * src.stride(0);
  } else {
    holder = gather_rows<T, A>(src, pl);
    const A* base = holder.data_ptr<A>();
    for (int64_t q = 0; q < pl.Q; ++q) rows[q] = base + q * C;
  }
  return rows;
}

// An adapter stack as Stack<A> (unit innermost stride): src itself where possible, else converted.
template <typename T, typename A>
Stack<A> stack_for(const Tensor& src, const Plan& pl, Tensor& holder) {
  if (std::is_same<T, A>::value && (src.stride(2) == 1 || src.size(2) <= 1)) {
    return {reinterpret_cast<const A*>(src.data_ptr<T>()), src.stride(0), src.stride(1)};
  }
  holder = adapters_acc<T, A>(src, pl, /*force_copy=*/true);
  return {holder.data_ptr<A>(), holder.stride(0), holder.stride(1)};
}

// dst[0:cn] += tmp[0:cn], rounded once to T. The bfloat16 / float16 versions are written to vectorise
// (bfloat16: branch-free round-to-nearest-even on the bits, as c10::BFloat16 does; float16: F16C).
RK_INLINE void add_row_bf16_body(uint16_t* d, const float* tmp, int64_t cn) {
  for (int64_t c = 0; c < cn; ++c) {
    const uint32_t in = static_cast<uint32_t>(d[c]) << 16;
    float f;
    std::memcpy(&f, &in, sizeof(f));
    f += tmp[c];
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    d[c] = f != f ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}
void add_row_bf16_base(uint16_t* d, const float* tmp, int64_t cn) { add_row_bf16_body(d, tmp, cn); }
#if RK_HAVE_AVX2
RK_AVX2 void add_row_bf16_avx2(uint16_t* d, const float* tmp, int64_t cn) { add_row_bf16_body(d, tmp, cn); }
__attribute__((target("avx2,fma,f16c"))) void add_row_f16_f16c(c10::Half* dst, const float* tmp, int64_t cn) {
  int64_t c = 0;
  for (; c + 8 <= cn; c += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(dst + c));
    const __m256 v = _mm256_add_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(tmp + c));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; c < cn; ++c) dst[c] = static_cast<c10::Half>(static_cast<float>(dst[c]) + tmp[c]);
}
inline bool cpu_has_f16c() {
  static const bool value = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c");
  }();
  return value;
}
#endif

template <typename T, typename A>
inline void add_row_chunk(T* dst, const A* tmp, int64_t cn) {
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#if RK_HAVE_AVX2
    if (cpu_has_avx2()) return add_row_bf16_avx2(d, tmp, cn);
#endif
    return add_row_bf16_base(d, tmp, cn);
  } else {
#if RK_HAVE_AVX2
    if constexpr (std::is_same<T, c10::Half>::value) {
      if (cpu_has_avx2() && cpu_has_f16c()) return add_row_f16_f16c(dst, tmp, cn);
    }
#endif
    for (int64_t c = 0; c < cn; ++c) dst[c] = static_cast<T>(static_cast<A>(dst[c]) + tmp[c]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Argument checks (things that would otherwise crash or silently misbehave).

// x: a CPU tensor of a supported dtype; then the checks of checks.h, and a rank r >= 1 (the interface's; the
// loop kernels block over the rank).
LowrankLinearSizes check_inputs(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                const std::optional<Tensor>& lora_a, const std::optional<Tensor>& lora_b,
                                const std::optional<Tensor>& indices, const std::optional<Tensor>& gates,
                                int64_t adapter) {
  check_defined(x, kWhere, "x");
  TORCH_CHECK(x.device().is_cpu(), kWhere, "x: expected a CPU tensor, got one on ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, kWhere,
              "x: expected float32, float64, bfloat16 or float16, got ", dt);
  const LowrankLinearSizes d = check_lowrank_linear_args(kWhere, x, weight, bias, lora_a, lora_b, indices, gates,
                                                         adapter);
  TORCH_CHECK(!lora_a.has_value() || d.r >= 1, kWhere, "lora_a: expected a rank r >= 1, got shape ",
              lora_a->sizes());
  return d;
}

// ---------------------------------------------------------------------------------------------------
// The low-rank terms. Each product picks its implementation:
// * input-bound products with a long contraction (u = x A_e^T over K, v = grad_y B_e over N) and the
//   per-adapter reductions (dA, dB over an adapter's rows): the loop kernels when pl.loops, else one ATen
//   matmul per used adapter on gathered rows (or on x / grad_y themselves for the identity assignment);
// * output-bound products with the short contraction over r (the expand into y, the dx term): addmm_
//   straight into y / dx for the identity assignment without upcast, else the loop kernels, which add
//   into y / dx in place (rounding once) with no (P, N) / (P, K) buffer and no scatter pass.

// y[t] += sum_j (coef u)_q @ B_e.T ; ug (Q, r) contiguous A.
template <typename T>
void expand_into(Tensor& y, const Tensor& ug, const Tensor& lora_b, const Plan& pl, const LowrankLinearSizes& d) {
  using A = at::opmath_type<T>;
  Tensor hb;
  LoopArgs<A> a{&pl, d.K, d.N, d.r};
  a.lb = stack_for<T, A>(lora_b, pl, hb);
  a.w = ug.data_ptr<A>();
  T* yp = y.data_ptr<T>();
  const int64_t nch = (d.N + kColChunk - 1) / kColChunk;
  at::parallel_for(0, d.M * nch, grain_for(kColChunk * d.r * pl.k), [&](int64_t b, int64_t e) {
    A tmp[kColChunk];
    for (int64_t it = b; it < e; ++it) {
      const int64_t t = it / nch, c0 = (it % nch) * kColChunk, cn = std::min(kColChunk, d.N - c0);
      bool any = false;
      for (int64_t j = 0; j < pl.k; ++j) any = any || pl.buf_of[t * pl.k + j] >= 0;
      if (!any) continue;
      k_expand<A>(a, t, c0, cn, tmp);
      add_row_chunk<T, A>(yp + t * d.N + c0, tmp, cn);
    }
  });
}

// dx[t] += sum_j (coef v)_q @ A_e ; vg (Q, r) contiguous A.
template <typename T>
void dx_into(Tensor& dx, const Tensor& vg, const Tensor& lora_a, const Plan& pl, const LowrankLinearSizes& d) {
  using A = at::opmath_type<T>;
  Tensor ha;
  LoopArgs<A> a{&pl, d.K, d.N, d.r};
  a.la = stack_for<T, A>(lora_a, pl, ha);
  a.w = vg.data_ptr<A>();
  T* xp = dx.data_ptr<T>();
  const int64_t nch = (d.K + kColChunk - 1) / kColChunk;
  at::parallel_for(0, d.M * nch, grain_for(kColChunk * d.r * pl.k), [&](int64_t b, int64_t e) {
    A tmp[kColChunk];
    for (int64_t it = b; it < e; ++it) {
      const int64_t t = it / nch, c0 = (it % nch) * kColChunk, cn = std::min(kColChunk, d.K - c0);
      bool any = false;
      for (int64_t j = 0; j < pl.k; ++j) any = any || pl.buf_of[t * pl.k + j] >= 0;
      if (!any) continue;
      k_dx<A>(a, t, c0, cn, tmp);
      add_row_chunk<T, A>(xp + t * d.K + c0, tmp, cn);
    }
  });
}

// Forward: y (M, N) T holds x @ W.T + b; adds the low-rank terms and fills u ((M, k, r) zeros, or left
// undefined for the identity assignment, where it becomes a view of the buffer).
template <typename T>
void forward_lowrank(Tensor& y, Tensor& u, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b,
                     const Plan& pl, const LowrankLinearSizes& d) {
  using A = at::opmath_type<T>;
  constexpr bool same = std::is_same<T, A>::value;
  const auto aopt = x.options().dtype(c10::CppTypeToScalarType<A>::value);

  // us[q] = x[row(q)] @ A_e.T
  Tensor us = at::empty({pl.Q, d.r}, aopt);
  if (pl.loops) {
    Tensor hx, ha;
    LoopArgs<A> a{&pl, d.K, d.N, d.r};
    const std::vector<const A*> xr = row_pointers<T, A>(x, pl, hx);
    a.xrow = xr.data();
    a.la = stack_for<T, A>(lora_a, pl, ha);
    a.out = us.data_ptr<A>();
    std::vector<int64_t> tiles;
    for (int64_t e : pl.used) {
      for (int64_t q = pl.begin[e]; q < pl.begin[e] + pl.count[e]; q += kRowTile)
        tiles.insert(tiles.end(), {e, q, std::min(q + kRowTile, pl.begin[e] + pl.count[e])});
    }
    a.tiles = tiles.data();
    const int64_t ntiles = static_cast<int64_t>(tiles.size()) / 3, nrb = (d.r + 3) / 4;
    const int64_t per_tile = std::max<int64_t>(1, std::min(kRowTile, pl.P / std::max<int64_t>(1, ntiles)));
    at::parallel_for(0, ntiles * nrb, grain_for(4 * d.K * per_tile), [&](int64_t b, int64_t e) {
      for (int64_t it = b; it < e; ++it) k_u<A>(a, it);
    });
  } else {
    grouped_mm(us, rows_for<T, A>(x, pl), adapters_acc<T, A>(lora_a, pl).transpose(1, 2), pl);
  }
  const A* usp = us.data_ptr<A>();
  if (pl.identity) {
    u = us.view({d.M, 1, d.r});
  } else {
    A* up = u.data_ptr<A>();
    for (int64_t q = 0; q < pl.Q; ++q) std::memcpy(up + pl.slot_of[q] * d.r, usp + q * d.r, sizeof(A) * d.r);
  }

  // y[row(q)] += (coef[q] * us[q]) @ B_e.T
  const Tensor ug = scaled_rows<A>(pl.Q, d.r, aopt, pl, [&](int64_t q) { return usp + q * d.r; });
  if (pl.identity && same) {
    for (int64_t e : pl.used) {
      const int64_t o = pl.begin[e], n = pl.count[e];
      y.narrow(0, o, n).addmm_(ug.narrow(0, o, n), lora_b.select(0, e).t());
    }
  } else {
    expand_into<T>(y, ug, lora_b, pl, d);
  }
}

// Backward: adds the low-rank term to *dx (which holds grad_y @ W), sets *da, *db (accumulator dtype, every
// adapter; unused ones zero), fills *dg (zeros (M, k), accumulator dtype). A null pointer: not needed.
template <typename T>
void backward_lowrank(Tensor* dx, Tensor* da, Tensor* db, Tensor* dg, const Tensor& grad_y, const Tensor& x,
                      const Tensor& lora_a, const Tensor& lora_b, const Tensor& u, const Plan& pl,
                      const LowrankLinearSizes& d, double scaling) {
  using A = at::opmath_type<T>;
  constexpr bool same = std::is_same<T, A>::value;
  const auto aopt = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  const int64_t nused = static_cast<int64_t>(pl.used.size());
  const int64_t per_adapter = std::max<int64_t>(1, pl.P / std::max<int64_t>(1, nused));
  const A* up = u.data_ptr<A>();  // (M, k, r) contiguous

  // The grad_y rows: pointers for the loops, a (Q, N) matrix (or grad_y itself) for the matmuls.
  Tensor hg, gs;
  std::vector<const A*> gr;
  if (pl.loops) {
    gr = row_pointers<T, A>(grad_y, pl, hg);
  } else {
    gs = rows_for<T, A>(grad_y, pl);
  }
  LoopArgs<A> a{&pl, d.K, d.N, d.r};
  a.grow = gr.data();

  Tensor vs;  // (Q, r): v = grad_y[row] @ B_e
  if (dx || da || dg) {
    vs = at::empty({pl.Q, d.r}, aopt);
    if (pl.loops) {
      Tensor hb;
      a.lb = stack_for<T, A>(lora_b, pl, hb);
      a.out = vs.data_ptr<A>();
      at::parallel_for(0, pl.Q, grain_for(d.N * d.r), [&](int64_t b, int64_t e) {
        for (int64_t q = b; q < e; ++q) k_v<A>(a, q);
      });
    } else {
      grouped_mm(vs, gs, adapters_acc<T, A>(lora_b, pl), pl);
    }
  }
  if (dg) {  // dgates[slot] = s * dot(u[slot], v)
    A* gp = dg->data_ptr<A>();
    const A* vp = vs.data_ptr<A>();
    const A sc = static_cast<A>(scaling);
    at::parallel_for(0, pl.Q, grain_for(d.r), [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        const int64_t s = pl.slot_of[q];
        const A* ur = up + s * d.r;
        const A* vr = vp + q * d.r;
        A acc = 0;
        for (int64_t i = 0; i < d.r; ++i) acc += ur[i] * vr[i];
        gp[s] = sc * acc;
      }
    });
  }
  if (dx || da) {
    const A* vp = vs.data_ptr<A>();
    const Tensor vg = scaled_rows<A>(pl.Q, d.r, aopt, pl, [&](int64_t q) { return vp + q * d.r; });  // coef v
    if (dx) {  // dx[row] += (coef v) @ A_e
      if (pl.identity && same) {
        for (int64_t e : pl.used) {
          const int64_t o = pl.begin[e], n = pl.count[e];
          dx->narrow(0, o, n).addmm_(vg.narrow(0, o, n), lora_a.select(0, e));
        }
      } else {
        dx_into<T>(*dx, vg, lora_a, pl, d);
      }
    }
    if (da) {  // dA[e] = (coef v)_e.T @ x_e
      if (pl.loops) {
        Tensor hx;
        const std::vector<const A*> xr = row_pointers<T, A>(x, pl, hx);
        a.xrow = xr.data();
        a.w = vg.data_ptr<A>();
        *da = at::empty({d.E, d.r, d.K}, aopt);
        A* dp = da->data_ptr<A>();
        a.out = dp;
        at::parallel_for(0, nused * d.r, grain_for(d.K * per_adapter), [&](int64_t b, int64_t e) {
          for (int64_t it = b; it < e; ++it) k_da<A>(a, it);
        });
        for (int64_t e = 0; e < d.E; ++e)
          if (pl.count[e] == 0) std::fill(dp + e * d.r * d.K, dp + (e + 1) * d.r * d.K, A(0));
      } else {
        *da = grouped_tn(vg, rows_for<T, A>(x, pl), pl);
      }
    }
  }
  if (db) {  // dB[e] = grad_y_e.T @ (coef u)_e
    const Tensor ucg = scaled_rows<A>(pl.Q, d.r, aopt, pl, [&](int64_t q) { return up + pl.slot_of[q] * d.r; });
    if (pl.loops) {
      a.w = ucg.data_ptr<A>();
      *db = at::empty({d.E, d.N, d.r}, aopt);
      A* bp = db->data_ptr<A>();
      a.out = bp;
      const int64_t nch = (d.N + kColChunk - 1) / kColChunk;
      at::parallel_for(0, nused * nch, grain_for(kColChunk * d.r * per_adapter), [&](int64_t b, int64_t e) {
        for (int64_t it = b; it < e; ++it) {
          const int64_t n0 = (it % nch) * kColChunk;
          k_db<A>(a, pl.used[it / nch], n0, std::min(kColChunk, d.N - n0));
        }
      });
      for (int64_t e = 0; e < d.E; ++e)
        if (pl.count[e] == 0) std::fill(bp + e * d.N * d.r, bp + (e + 1) * d.N * d.r, A(0));
    } else {
      *db = grouped_tn(gs, ucg, pl);
    }
  }
}

}  // namespace

std::tuple<Tensor, Tensor> lowrank_linear_forward(const Tensor& x, const Tensor& weight,
                                                  const std::optional<Tensor>& bias,
                                                  const std::optional<Tensor>& lora_a,
                                                  const std::optional<Tensor>& lora_b,
                                                  const std::optional<Tensor>& indices,
                                                  const std::optional<Tensor>& gates, double scaling,
                                                  int64_t adapter) {
  const LowrankLinearSizes d = check_inputs(x, weight, bias, lora_a, lora_b, indices, gates, adapter);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // a kernel: it records no autograd graph itself
  const auto aopt = x.options().dtype(acc_dtype(x.scalar_type()));
  Tensor y = at::linear(x, weight, bias).contiguous();
  if (!lora_a.has_value()) return {y, at::empty({0}, aopt)};

  const bool acc_is_input = aopt.dtype() == x.dtype();
  const Plan pl = make_plan(d.M, d.E, d.r, d.K, d.N, indices, gates, scaling, adapter, acc_is_input,
                            kLoopMacsPerAdapterForward);
  Tensor u;
  if (!pl.identity || pl.P == 0) u = at::zeros({d.M, pl.k, d.r}, aopt);
  if (pl.P == 0) return {y, u};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lowrank_linear_forward_cpu", [&] {
    forward_lowrank<scalar_t>(y, u, x, *lora_a, *lora_b, pl, d);
  });
  return {y, u};
}

std::vector<Tensor> lowrank_linear_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                            const std::optional<Tensor>& lora_a,
                                            const std::optional<Tensor>& lora_b,
                                            const std::optional<Tensor>& indices,
                                            const std::optional<Tensor>& gates, double scaling, int64_t adapter,
                                            const Tensor& u, const std::vector<bool>& needs) {
  const LowrankLinearSizes d = check_inputs(x, weight, std::nullopt, lora_a, lora_b, indices, gates, adapter);
  check_lowrank_linear_grad_y(kWhere, grad_y, x, d, needs.size());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = acc_dtype(x.scalar_type());
  const auto aopt = x.options().dtype(acc);
  const bool lora = lora_a.has_value();
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2];
  const bool need_a = needs[3] && lora, need_bb = needs[4] && lora, need_g = needs[5] && gates.has_value();

  std::vector<Tensor> out(6);
  if (need_w) out[1] = at::mm(grad_y.t(), x).contiguous();
  if (need_b) {  // fp32 inputs: summed in fp64 (it is cheap); bf16/fp16 are summed in fp32 by ATen
    out[2] = x.scalar_type() == at::kFloat ? grad_y.sum(0, /*keepdim=*/false, at::kDouble).to(at::kFloat)
                                           : grad_y.sum(0);
  }
  if (need_x) out[0] = at::mm(grad_y, weight).contiguous();

  if (lora && (need_x || need_a || need_bb || need_g)) {
    check_lowrank_linear_u(kWhere, u, x, d);
    const Tensor uc = u.to(acc).contiguous();
    const Plan pl = make_plan(d.M, d.E, d.r, d.K, d.N, indices, gates, scaling, adapter,
                              acc == x.scalar_type(), kLoopMacsPerAdapterBackward);
    Tensor da, db, dg;
    if (need_g) dg = at::zeros({d.M, d.k}, aopt);
    if (pl.P > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lowrank_linear_backward_cpu", [&] {
        backward_lowrank<scalar_t>(need_x ? &out[0] : nullptr, need_a ? &da : nullptr, need_bb ? &db : nullptr,
                                   need_g ? &dg : nullptr, grad_y, x, *lora_a, *lora_b, uc, pl, d, scaling);
      });
    } else {
      if (need_a) da = at::zeros(lora_a->sizes(), aopt);
      if (need_bb) db = at::zeros(lora_b->sizes(), aopt);
    }
    if (need_a) out[3] = da.to(lora_a->scalar_type()).contiguous();
    if (need_bb) out[4] = db.to(lora_b->scalar_type()).contiguous();
    if (need_g) out[5] = dg.to(gates->scalar_type()).contiguous();
  }
  for (auto& t : out)  // a distinct empty tensor each: outputs of a custom op must not alias one another
    if (!t.defined()) t = at::empty({0}, x.options());
  return out;
}

}  // namespace cpu
}  // namespace recursive_kernels
