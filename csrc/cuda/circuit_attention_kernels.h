// Hand-written CUDA kernels of `circuit_attention` (the CUDA fallback backend), dense and packed varlen:
//
//   S = scale * q @ k^T + q_c @ k_c^T,   P = softmax(S),   out = P @ v,   out_c = P @ v_c
//
// per batch b, query head h and its kv head h / (H / Hkv) (grouped-query heads by index arithmetic). The
// correction is not scaled. Causal masking is bottom-right aligned per sequence: query i sees key j iff
// j <= i + (len_k - len_q). A row that sees no key gets out = 0, out_c = 0, lse = -inf and zero gradients.
//
// Plain CUDA C++: no torch headers on either side of this interface (circuit_attention_cuda.cpp validates,
// allocates and calls these launchers). Conventions:
//   * Element pointers of the input dtype are passed as void* with a ScalarKind. The softmax statistics
//     (lse, Delta) are in the "stat" dtype: double for kFloat32, float for kFloat16 / kBFloat16.
//   * Every launcher only enqueues work on `stream` and returns the launch status (cudaGetLastError());
//     nothing is launched (cudaSuccess) when there is nothing to do; cudaErrorInvalidValue for an
//     inconsistent shape or a grid too large.
//   * Memory is linear in the sequence lengths (no Sq x Sk buffer); nothing reads cu_seqlens on the host.

#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "lowrank_linear_kernels.h"  // ScalarKind, shared by every kernel family of the backend

namespace recursive_kernels {
namespace cuda_backend {

// One operand. Element (b, h, row, c) lies at data + b * batch_stride + h * head_stride + row * row_stride + c
// (strides in ELEMENTS, the last dim contiguous), where row counts from the first row of sequence b:
//   dense  (B, heads, S, width):  strides (s0, s1, s2) (head-major, token-major or other); sequence b starts
//                                 at row 0;
//   packed (total, heads, width): strides (0, s1, s0); sequence b starts at row cu_seqlens[b].
// The statistics use the same description with width 1: dense lse (B, H, Sq): (s0, s1, s2); packed lse
// (H, total_q): (0, s0, s1). data == nullptr marks an absent operand (its width must be 0).
struct AttentionOperand {
  void* data;
  int64_t batch_stride;
  int64_t head_stride;
  int64_t row_stride;
};

struct CircuitAttentionShape {
  int64_t batch;     // B: dense batch, or the number of packed sequences (cu_seqlens has batch + 1 entries)
  int64_t heads;     // H
  int64_t kv_heads;  // Hkv, divides H
  int64_t seqlen_q;  // dense: Sq; packed: max_seqlen_q (sizes the grid only)
  int64_t seqlen_k;  // dense: Sk; packed: max_seqlen_k
  const int32_t* cu_seqlens_q;  // packed: (batch + 1) device offsets into the rows of q; dense: nullptr
  const int32_t* cu_seqlens_k;  // packed: offsets into the rows of k / v; dense: nullptr
  int64_t head_dim;  // D (q, k, v, out)
  int64_t rank_qk;   // R (q_c, k_c), 0 when absent
  int64_t rank_v;    // Rv (v_c, out_c), 0 when absent
  bool causal;
  float scale;       // multiplies q @ k^T only
};

// The forward's operands; the backward reads all of them.
struct CircuitAttentionTensors {
  AttentionOperand q, k, v;         // (.., D)
  AttentionOperand q_c, k_c, v_c;   // (.., R), (.., R), (.., Rv)
  AttentionOperand out, out_c;      // (.., D), (.., Rv): written by the forward
  AttentionOperand lse;             // stat dtype, laid out as described above: written by the forward
};

struct CircuitAttentionGrads {
  AttentionOperand grad_out, grad_out_c;  // (.., D), (.., Rv), laid out like out / out_c
  AttentionOperand delta;                 // stat dtype scratch laid out like lse (rowsum(dO * out) + ...)
  AttentionOperand dq, dk, dv;            // laid out like q, k, v; fully written
  AttentionOperand dq_c, dk_c, dv_c;      // laid out like q_c, k_c, v_c; fully written when present
};

// Writes out, out_c (when rank_v > 0) and lse for every query row.
cudaError_t circuit_attention_forward(ScalarKind kind, const CircuitAttentionShape& shape,
                                      const CircuitAttentionTensors& tensors, cudaStream_t stream);

// Writes delta, then every gradient (dk, dv, dk_c, dv_c summed over the query heads of their group, no
// atomics). Reads out, out_c and lse as written by circuit_attention_forward.
cudaError_t circuit_attention_backward(ScalarKind kind, const CircuitAttentionShape& shape,
                                       const CircuitAttentionTensors& tensors, const CircuitAttentionGrads& grads,
                                       cudaStream_t stream);

}  // namespace cuda_backend
}  // namespace recursive_kernels
