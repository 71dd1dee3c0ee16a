// Hand-written CUDA kernels for the low-rank (LoRA) parts of `lowrank_linear` (the CUDA fallback backend).
//
// Plain CUDA C++: no torch headers on either side of this interface. The host code
// (lowrank_linear_cuda.cpp) does the dense shared-weight matmuls through ATen/cuBLAS and calls the launchers
// below for the gathered low-rank parts, in the style of Punica's BGMV: every (row, slot) reads its own
// adapter's factor in place, through the factor's element strides (no per-row copies of weights).
//
// Conventions shared by every launcher:
//   * Element pointers of the input dtype are passed as void* together with a ScalarKind; arithmetic is
//     done in fp32 (fp32 accumulation, one rounding when a result is stored in the input dtype).
//   * Strides are in ELEMENTS (as torch's Tensor::stride()), may be any non-negative value (including 0
//     for broadcast views); pointers already include the tensor's storage offset.
//   * A "slot" is one (row t, slot j) pair, numbered slot = t * slots + j. Per-slot fp32 buffers
//     (`coef`, `out`) are contiguous (rows, slots, rank).
//   * Every launcher only enqueues work on `stream` and returns the launch status
//     (cudaGetLastError()); nothing is launched (cudaSuccess) when there is nothing to do.

#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace recursive_kernels {
namespace cuda_backend {

// dtype of the non-fp32-buffer operands (x, weights, y, grad_y).
enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Which adapter each slot uses, and with which gate.
struct SlotMap {
  const int64_t* indices;  // (rows, slots) contiguous int64, -1 = empty slot; nullptr: every row uses `adapter`
  const float* gates;      // (rows, slots) contiguous float32, or nullptr (every gate is 1)
  int64_t adapter;         // the adapter of every row when indices is nullptr (then slots must be 1)
  int64_t num_adapters;    // E; an index outside [0, E) is treated like -1 (an empty slot)
  int64_t rows;            // M
  int64_t slots;           // k >= 1
};

// Shrink (BGMV "shrink"): for every slot (t, j) with adapter e,
//     out[t, j, i] = sum_c X[t, c] * W[e, i, c]          i < rank, c < len
// and out[t, j, :] = 0 for an empty slot. out: fp32 contiguous (rows, slots, rank), fully written.
//   X[t, c]    at x + t * x_s0 + c * x_s1
//   W[e, i, c] at w + e * w_s0 + i * w_s1 + c * w_s2
// Forward u = x @ lora_a[e]^T: W = lora_a with its strides (s0, s1, s2), len = K.
// Backward v = grad_y @ lora_b[e]: W = lora_b read as (E, r, N), strides (s0, s2, s1), len = N.
// Gates are not used.
cudaError_t lowrank_shrink(ScalarKind kind, float* out,
                           const void* x, int64_t x_s0, int64_t x_s1,
                           const void* w, int64_t w_s0, int64_t w_s1, int64_t w_s2,
                           const SlotMap& map, int64_t rank, int64_t len, cudaStream_t stream);

// Expand-add (BGMV "expand"), in place on Y (read-modify-write in fp32, stored in Y's dtype):
//     Y[t, c] += scale * sum_j g[t, j] * sum_i coef[t, j, i] * W[e[t, j], c, i]       c < cols
// over the non-empty slots of row t (rows without one are left untouched).
//   Y[t, c]    at y + t * y_s0 + c * y_s1
//   W[e, c, i] at w + e * w_s0 + c * w_s1 + i * w_s2
// Forward y += s * sum_j g u_j @ lora_b[e]^T: W = lora_b with its strides, cols = N.
// Backward dx += s * sum_j g v_j @ lora_a[e]: W = lora_a read as (E, K, r), strides (s0, s2, s1), cols = K.
cudaError_t lowrank_expand_add(ScalarKind kind, void* y, int64_t y_s0, int64_t y_s1,
                               const float* coef,
                               const void* w, int64_t w_s0, int64_t w_s1, int64_t w_s2,
                               const SlotMap& map, int64_t rank, int64_t cols, float scale,
                               cudaStream_t stream);

// Outer-product scatter for the adapter gradients, accumulated with float atomicAdd into an fp32 buffer D
// (the caller zeroes it first and casts it afterwards):
//     D[e[t, j], i, c] += scale * g[t, j] * coef[t, j, i] * Q[t, c]          i < rank, c < cols
//   D[e, i, c] at d + e * d_s0 + i * d_s1 + c * d_s2
//   Q[t, c]    at q + t * q_s0 + c * q_s1 (input dtype)
// dlora_a: D (E, r, K) contiguous -> strides (r*K, K, 1); coef = v; Q = x;      cols = K.
// dlora_b: D (E, N, r) contiguous -> strides (N*r, 1, r); coef = u; Q = grad_y; cols = N.
cudaError_t lowrank_outer_scatter(ScalarKind kind, float* d, int64_t d_s0, int64_t d_s1, int64_t d_s2,
                                  const float* coef,
                                  const void* q, int64_t q_s0, int64_t q_s1,
                                  const SlotMap& map, int64_t rank, int64_t cols, float scale,
                                  cudaStream_t stream);

}  // namespace cuda_backend
}  // namespace recursive_kernels
