// lowrank_linear, CPU backend: the hand-written loop kernels of the loops path and the in-place adds into y / dx
// (declared, with the Plan and the loop arguments they read, in lowrank_linear_cpu_loops.h; the host code that
// plans and calls them is lowrank_linear_cpu.cpp).
//
// For small problems (decode): no ATen op per adapter, no work buffers beyond u / v, every output element written
// by exactly one thread: u = A_e x (4 ranks x 2 rows register-blocked dot products), v = grad_y B_e (rank-wide
// accumulators), dA / dB as per-adapter reductions (one item per adapter and rank / column chunk, so no atomics and
// no per-row weight copies), and the adds into y / dx per output row and column chunk (the k slots of a row summed
// in A and rounded once; on AVX2 the r-long dot products of eight outputs are reduced together in registers).
// Bodies are plain loops (#pragma omp simd for the reductions); on x86 they are compiled twice, for AVX2+FMA and
// for the baseline ISA, and picked at run time (cpu_dispatch.h; the extension is built without -march flags); the
// kernels for ranks 8/16/32/64 are specialised.
#include "lowrank_linear_cpu_loops.h"
#include "cpu_dispatch.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace recursive_kernels {
namespace cpu {
namespace lowrank {
namespace {

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
#pragma omp simd  // one vector multiply-add per n: without it GCC 12 multiplies lane by lane for R = 8
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

// Buffer rows per used adapter (at least 1): the work of one item of the per-adapter reductions.
int64_t rows_per_adapter(const Plan& pl) {
  return std::max<int64_t>(1, pl.P / std::max<int64_t>(1, static_cast<int64_t>(pl.used.size())));
}

// Zeros for the adapters no slot uses: the per-adapter reductions write only the used ones.
template <typename A>
void zero_unused(A* out, int64_t per_adapter, const Plan& pl) {
  for (int64_t e = 0; e < pl.E; ++e)
    if (pl.count[e] == 0) std::fill(out + e * per_adapter, out + (e + 1) * per_adapter, A(0));
}

}  // namespace

template <typename A>
void u_rows(LoopArgs<A> a) {
  const Plan& pl = *a.pl;
  std::vector<int64_t> tiles;
  for (int64_t e : pl.used) {
    for (int64_t q = pl.begin[e]; q < pl.begin[e] + pl.count[e]; q += kRowTile)
      tiles.insert(tiles.end(), {e, q, std::min(q + kRowTile, pl.begin[e] + pl.count[e])});
  }
  a.tiles = tiles.data();
  const int64_t ntiles = static_cast<int64_t>(tiles.size()) / 3, nrb = (a.r + 3) / 4;
  const int64_t per_tile = std::max<int64_t>(1, std::min(kRowTile, pl.P / std::max<int64_t>(1, ntiles)));
  at::parallel_for(0, ntiles * nrb, grain_for(4 * a.K * per_tile), [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) k_u<A>(a, it);
  });
}

template <typename A>
void v_rows(const LoopArgs<A>& a) {
  at::parallel_for(0, a.pl->Q, grain_for(a.N * a.r), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) k_v<A>(a, q);
  });
}

template <typename A>
void da_sums(const LoopArgs<A>& a) {
  const Plan& pl = *a.pl;
  const int64_t nused = static_cast<int64_t>(pl.used.size());
  at::parallel_for(0, nused * a.r, grain_for(a.K * rows_per_adapter(pl)), [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) k_da<A>(a, it);
  });
  zero_unused(a.out, a.r * a.K, pl);
}

template <typename A>
void db_sums(const LoopArgs<A>& a) {
  const Plan& pl = *a.pl;
  const int64_t nused = static_cast<int64_t>(pl.used.size());
  const int64_t nch = (a.N + kColChunk - 1) / kColChunk;
  at::parallel_for(0, nused * nch, grain_for(kColChunk * a.r * rows_per_adapter(pl)), [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t n0 = (it % nch) * kColChunk;
      k_db<A>(a, pl.used[it / nch], n0, std::min(kColChunk, a.N - n0));
    }
  });
  zero_unused(a.out, a.N * a.r, pl);
}

template <typename T>
void add_rows(AddInto into, T* out, const LoopArgs<at::opmath_type<T>>& a) {
  using A = at::opmath_type<T>;
  const Plan& pl = *a.pl;
  const int64_t width = into == AddInto::y ? a.N : a.K;
  const int64_t nch = (width + kColChunk - 1) / kColChunk;
  at::parallel_for(0, pl.M * nch, grain_for(kColChunk * a.r * pl.k), [&](int64_t b, int64_t e) {
    A tmp[kColChunk];
    for (int64_t it = b; it < e; ++it) {
      const int64_t t = it / nch, c0 = (it % nch) * kColChunk, cn = std::min(kColChunk, width - c0);
      bool any = false;
      for (int64_t j = 0; j < pl.k; ++j) any = any || pl.buf_of[t * pl.k + j] >= 0;
      if (!any) continue;
      if (into == AddInto::y) {
        k_expand<A>(a, t, c0, cn, tmp);
      } else {
        k_dx<A>(a, t, c0, cn, tmp);
      }
      add_row_chunk<T, A>(out + t * width + c0, tmp, cn);
    }
  });
}

template void u_rows<float>(LoopArgs<float>);
template void u_rows<double>(LoopArgs<double>);
template void v_rows<float>(const LoopArgs<float>&);
template void v_rows<double>(const LoopArgs<double>&);
template void da_sums<float>(const LoopArgs<float>&);
template void da_sums<double>(const LoopArgs<double>&);
template void db_sums<float>(const LoopArgs<float>&);
template void db_sums<double>(const LoopArgs<double>&);
template void add_rows<float>(AddInto, float*, const LoopArgs<float>&);
template void add_rows<double>(AddInto, double*, const LoopArgs<double>&);
template void add_rows<c10::BFloat16>(AddInto, c10::BFloat16*, const LoopArgs<float>&);
template void add_rows<c10::Half>(AddInto, c10::Half*, const LoopArgs<float>&);

}  // namespace lowrank
}  // namespace cpu
}  // namespace recursive_kernels
