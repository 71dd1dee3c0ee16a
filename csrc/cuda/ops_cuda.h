// Declarations of the CUDA host ops that csrc/cuda/extension_cuda.cpp exposes as recursive_kernels._C_cuda.
// Each op's host code lives in its own csrc/cuda/<op>_cuda.cpp (validation, allocation, ATen calls and the
// launches of csrc/cuda/<op>_kernels.cu); add its declarations here and its binding there. The arguments and
// results are those of the backend interfaces in kernels/lowrank_linear.py and kernels/circuit_attention.py
// (as in csrc/ops_cpu.h), on CUDA tensors of float32, float16 or bfloat16.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace recursive_kernels {
namespace cuda {

// -> (y, u)
std::tuple<at::Tensor, at::Tensor> lowrank_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& gates, double scaling,
    int64_t adapter);

// -> (dx, dweight, dbias, dlora_a, dlora_b, dgates)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& gates, double scaling,
    int64_t adapter, const at::Tensor& u, std::vector<bool> needs);

// -> (out, out_c, lse); packed when cu_seqlens are given (max_seqlen_q/k are read only then).
std::tuple<at::Tensor, at::Tensor, at::Tensor> circuit_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& q_c,
    const std::optional<at::Tensor>& k_c, const std::optional<at::Tensor>& v_c,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale);

// -> [dq, dk, dv, dq_c, dk_c, dv_c]
std::vector<at::Tensor> circuit_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_out_c, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& q_c, const std::optional<at::Tensor>& k_c,
    const std::optional<at::Tensor>& v_c, const at::Tensor& out, const at::Tensor& out_c, const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale);

}  // namespace cuda
}  // namespace recursive_kernels
