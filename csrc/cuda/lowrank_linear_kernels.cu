// CUDA kernels for the gathered low-rank parts of `lowrank_linear` (see lowrank_linear_kernels.h).
//
// Plain CUDA C++ (no torch headers). Three kernels, each templated on the element type of its
// non-fp32 operands (float, __half, __nv_bfloat16) and accumulating in fp32:
//
//   shrink_kernel        one thread block per slot (t, j): out[t, j, :] = X[t] @ W[e]^T, the reduction over
//                        the long dimension split across the block's threads, then warp shuffles and a
//                        small shared-memory step across warps. Ranks go in chunks of kRankChunk so X[t]
//                        is read once per chunk.
//   expand_add_kernel    one thread per output column, a block covers kColThreads columns of kExpandRows
//                        rows (so the adapter rows it reads stay in L1 across rows); per element a
//                        rank-length dot product per slot, then one fp32 read-modify-write of Y.
//   outer_scatter_kernel one thread per column c and a chunk of kScatterSlots consecutive slots; it keeps
//                        fp32 partial sums for kRankChunk ranks while consecutive slots use the same
//                        adapter and flushes them with atomicAdd when the adapter changes (and at the end).
//
// Nothing here needs --use_fast_math, relaxed constexpr or half operators: conversions go through the
// cuda_fp16.h / cuda_bf16.h intrinsics, so torch's -D__CUDA_NO_HALF_OPERATORS__ etc. are fine.

#include "lowrank_linear_kernels.h"
#include "element_conversions.cuh"

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace recursive_kernels {
namespace cuda_backend {
namespace {

constexpr int kWarpSize = 32;
constexpr int kShrinkThreads = 128;   // threads per block of shrink_kernel (a multiple of 32)
constexpr int kRankChunk = 8;         // ranks accumulated together per pass
constexpr int kColThreads = 128;      // threads (= columns) per block of the column kernels
constexpr int kExpandRows = 8;        // rows per block of expand_add_kernel
constexpr int kScatterSlots = 32;     // slots per block of outer_scatter_kernel
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridY = 65535;


// The adapter of a slot, or -1 for an empty slot (index -1, or anything outside [0, E)).
__device__ __forceinline__ int64_t slot_adapter(const SlotMap& map, int64_t slot) {
  const int64_t e = map.indices != nullptr ? map.indices[slot] : map.adapter;
  return (e >= 0 && e < map.num_adapters) ? e : -1;
}

__device__ __forceinline__ float slot_gate(const SlotMap& map, int64_t slot) {
  return map.gates != nullptr ? map.gates[slot] : 1.0f;
}

// Sum over the 32 lanes of a warp; every lane must call it; lane 0 holds the total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ __forceinline__ int rank_chunk_size(int64_t rank, int64_t i0) {
  const int64_t left = rank - i0;
  return left < kRankChunk ? static_cast<int>(left) : kRankChunk;
}

// ---- shrink: out[t, j, i] = sum_c X[t, c] * W[e, i, c] ----

template <typename T>
__global__ void __launch_bounds__(kShrinkThreads)
shrink_kernel(float* out, const T* x, int64_t x_s0, int64_t x_s1,
              const T* w, int64_t w_s0, int64_t w_s1, int64_t w_s2,
              SlotMap map, int64_t rank, int64_t len) {
  __shared__ float partial[kShrinkThreads / kWarpSize][kRankChunk];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int64_t total = map.rows * map.slots;

  // Grid-stride over slots. Everything that decides control flow below (slot, e, i0, nr) is the same
  // for the whole block, so every thread reaches every __syncthreads().
  for (int64_t slot = blockIdx.x; slot < total; slot += gridDim.x) {
    float* o = out + slot * rank;
    const int64_t e = slot_adapter(map, slot);
    if (e < 0) {
      for (int64_t i = tid; i < rank; i += kShrinkThreads) o[i] = 0.0f;
      continue;
    }
    const T* xr = x + (slot / map.slots) * x_s0;
    const T* we = w + e * w_s0;
    for (int64_t i0 = 0; i0 < rank; i0 += kRankChunk) {
      const int nr = rank_chunk_size(rank, i0);
      float acc[kRankChunk];
#pragma unroll
      for (int c = 0; c < kRankChunk; ++c) acc[c] = 0.0f;
      for (int64_t k = tid; k < len; k += kShrinkThreads) {
        const float xv = to_float(xr[k * x_s1]);
        const T* wk = we + i0 * w_s1 + k * w_s2;
#pragma unroll
        for (int c = 0; c < kRankChunk; ++c) {
          if (c < nr) acc[c] += xv * to_float(wk[c * w_s1]);
        }
      }
#pragma unroll
      for (int c = 0; c < kRankChunk; ++c) acc[c] = warp_sum(acc[c]);
      if (lane == 0) {
#pragma unroll
        for (int c = 0; c < kRankChunk; ++c) partial[warp][c] = acc[c];
      }
      __syncthreads();
      if (tid < nr) {
        float sum = 0.0f;
#pragma unroll
        for (int wi = 0; wi < kShrinkThreads / kWarpSize; ++wi) sum += partial[wi][tid];
        o[i0 + tid] = sum;
      }
      __syncthreads();  // `partial` is rewritten by the next chunk / slot
    }
  }
}

// ---- expand-add: Y[t, c] += scale * sum_j g[t, j] * sum_i coef[t, j, i] * W[e, c, i] ----

template <typename T>
__global__ void __launch_bounds__(kColThreads)
expand_add_kernel(T* y, int64_t y_s0, int64_t y_s1, const float* coef,
                  const T* w, int64_t w_s0, int64_t w_s1, int64_t w_s2,
                  SlotMap map, int64_t rank, int64_t cols, float scale) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  if (col >= cols) return;  // no block-level synchronisation in this kernel
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * kExpandRows; row0 < map.rows;
       row0 += static_cast<int64_t>(gridDim.y) * kExpandRows) {
    const int64_t row_end = (row0 + kExpandRows < map.rows) ? row0 + kExpandRows : map.rows;
    for (int64_t t = row0; t < row_end; ++t) {
      float acc = 0.0f;
      bool touched = false;
      for (int64_t j = 0; j < map.slots; ++j) {
        const int64_t slot = t * map.slots + j;
        const int64_t e = slot_adapter(map, slot);
        if (e < 0) continue;
        const float* cs = coef + slot * rank;
        const T* wc = w + e * w_s0 + col * w_s1;
        float part = 0.0f;
        for (int64_t i = 0; i < rank; ++i) part += cs[i] * to_float(wc[i * w_s2]);
        acc += slot_gate(map, slot) * part;
        touched = true;
      }
      if (touched) {
        T* yp = y + t * y_s0 + col * y_s1;
        *yp = from_float<T>(to_float(*yp) + scale * acc);
      }
    }
  }
}

// ---- outer scatter: D[e, i, c] += scale * g[t, j] * coef[t, j, i] * Q[t, c] ----

__device__ __forceinline__ void flush_chunk(float* d, int64_t d_s1, const float (&acc)[kRankChunk], int nr,
                                            float scale) {
#pragma unroll
  for (int c = 0; c < kRankChunk; ++c) {
    if (c < nr) atomicAdd(d + c * d_s1, scale * acc[c]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kColThreads)
outer_scatter_kernel(float* d, int64_t d_s0, int64_t d_s1, int64_t d_s2, const float* coef,
                     const T* q, int64_t q_s0, int64_t q_s1,
                     SlotMap map, int64_t rank, int64_t cols, float scale) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  if (col >= cols) return;  // no block-level synchronisation in this kernel
  const int64_t total = map.rows * map.slots;
  for (int64_t s0 = static_cast<int64_t>(blockIdx.y) * kScatterSlots; s0 < total;
       s0 += static_cast<int64_t>(gridDim.y) * kScatterSlots) {
    const int64_t s1 = (s0 + kScatterSlots < total) ? s0 + kScatterSlots : total;
    for (int64_t i0 = 0; i0 < rank; i0 += kRankChunk) {
      const int nr = rank_chunk_size(rank, i0);
      float acc[kRankChunk];
#pragma unroll
      for (int c = 0; c < kRankChunk; ++c) acc[c] = 0.0f;
      int64_t current = -1;  // the adapter `acc` belongs to
      for (int64_t slot = s0; slot < s1; ++slot) {
        const int64_t e = slot_adapter(map, slot);
        if (e < 0) continue;
        if (e != current) {
          if (current >= 0) flush_chunk(d + current * d_s0 + i0 * d_s1 + col * d_s2, d_s1, acc, nr, scale);
          current = e;
#pragma unroll
          for (int c = 0; c < kRankChunk; ++c) acc[c] = 0.0f;
        }
        const float qv = slot_gate(map, slot) * to_float(q[(slot / map.slots) * q_s0 + col * q_s1]);
        const float* cs = coef + slot * rank + i0;
#pragma unroll
        for (int c = 0; c < kRankChunk; ++c) {
          if (c < nr) acc[c] += qv * cs[c];
        }
      }
      if (current >= 0) flush_chunk(d + current * d_s0 + i0 * d_s1 + col * d_s2, d_s1, acc, nr, scale);
    }
  }
}

// ---- launchers ----

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

bool valid_map(const SlotMap& map) {
  if (map.rows < 0 || map.slots < 1 || map.num_adapters < 0) return false;
  // Single-adapter mode (no index tensor) has one slot per row. (An empty index tensor may have a null
  // data pointer, hence the rows > 0.)
  if (map.indices == nullptr && map.slots != 1 && map.rows > 0) return false;
  return true;
}

template <typename T>
cudaError_t launch_shrink(float* out, const void* x, int64_t x_s0, int64_t x_s1, const void* w, int64_t w_s0,
                          int64_t w_s1, int64_t w_s2, const SlotMap& map, int64_t rank, int64_t len,
                          cudaStream_t stream) {
  const int64_t total = map.rows * map.slots;
  if (total == 0 || rank == 0) return cudaSuccess;
  if (out == nullptr || (len > 0 && (x == nullptr || w == nullptr))) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(min64(total, kMaxGridX)));
  shrink_kernel<T><<<grid, kShrinkThreads, 0, stream>>>(
      out, static_cast<const T*>(x), x_s0, x_s1, static_cast<const T*>(w), w_s0, w_s1, w_s2, map, rank, len);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_expand_add(void* y, int64_t y_s0, int64_t y_s1, const float* coef, const void* w,
                              int64_t w_s0, int64_t w_s1, int64_t w_s2, const SlotMap& map, int64_t rank,
                              int64_t cols, float scale, cudaStream_t stream) {
  if (map.rows == 0 || cols == 0 || rank == 0) return cudaSuccess;
  if (y == nullptr || coef == nullptr || w == nullptr) return cudaErrorInvalidValue;
  const int64_t col_blocks = ceil_div(cols, kColThreads);
  if (col_blocks > kMaxGridX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(col_blocks),
                  static_cast<unsigned>(min64(ceil_div(map.rows, kExpandRows), kMaxGridY)));
  expand_add_kernel<T><<<grid, kColThreads, 0, stream>>>(
      static_cast<T*>(y), y_s0, y_s1, coef, static_cast<const T*>(w), w_s0, w_s1, w_s2, map, rank, cols, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_outer_scatter(float* d, int64_t d_s0, int64_t d_s1, int64_t d_s2, const float* coef,
                                 const void* q, int64_t q_s0, int64_t q_s1, const SlotMap& map, int64_t rank,
                                 int64_t cols, float scale, cudaStream_t stream) {
  const int64_t total = map.rows * map.slots;
  if (total == 0 || cols == 0 || rank == 0) return cudaSuccess;
  if (d == nullptr || coef == nullptr || q == nullptr) return cudaErrorInvalidValue;
  const int64_t col_blocks = ceil_div(cols, kColThreads);
  if (col_blocks > kMaxGridX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(col_blocks),
                  static_cast<unsigned>(min64(ceil_div(total, kScatterSlots), kMaxGridY)));
  outer_scatter_kernel<T><<<grid, kColThreads, 0, stream>>>(
      d, d_s0, d_s1, d_s2, coef, static_cast<const T*>(q), q_s0, q_s1, map, rank, cols, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lowrank_shrink(ScalarKind kind, float* out, const void* x, int64_t x_s0, int64_t x_s1,
                           const void* w, int64_t w_s0, int64_t w_s1, int64_t w_s2,
                           const SlotMap& map, int64_t rank, int64_t len, cudaStream_t stream) {
  if (!valid_map(map) || rank < 0 || len < 0) return cudaErrorInvalidValue;
  return with_element_type(kind, [&](auto element) {
    using T = typename decltype(element)::type;
    return launch_shrink<T>(out, x, x_s0, x_s1, w, w_s0, w_s1, w_s2, map, rank, len, stream);
  });
}

cudaError_t lowrank_expand_add(ScalarKind kind, void* y, int64_t y_s0, int64_t y_s1, const float* coef,
                               const void* w, int64_t w_s0, int64_t w_s1, int64_t w_s2,
                               const SlotMap& map, int64_t rank, int64_t cols, float scale,
                               cudaStream_t stream) {
  if (!valid_map(map) || rank < 0 || cols < 0) return cudaErrorInvalidValue;
  return with_element_type(kind, [&](auto element) {
    using T = typename decltype(element)::type;
    return launch_expand_add<T>(y, y_s0, y_s1, coef, w, w_s0, w_s1, w_s2, map, rank, cols, scale, stream);
  });
}

cudaError_t lowrank_outer_scatter(ScalarKind kind, float* d, int64_t d_s0, int64_t d_s1, int64_t d_s2,
                                  const float* coef, const void* q, int64_t q_s0, int64_t q_s1,
                                  const SlotMap& map, int64_t rank, int64_t cols, float scale,
                                  cudaStream_t stream) {
  if (!valid_map(map) || rank < 0 || cols < 0) return cudaErrorInvalidValue;
  return with_element_type(kind, [&](auto element) {
    using T = typename decltype(element)::type;
    return launch_outer_scatter<T>(d, d_s0, d_s1, d_s2, coef, q, q_s0, q_s1, map, rank, cols, scale, stream);
  });
}

}  // namespace cuda_backend
}  // namespace recursive_kernels
