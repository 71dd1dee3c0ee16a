// Declarations of the CPU (C++/ATen/OpenMP) ops that csrc/extension_cpu.cpp exposes as recursive_kernels._C.
// Each op's entry points live in csrc/<op>_cpu.cpp; add their declarations here and their binding there.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace recursive_kernels {
namespace cpu {

// lowrank_linear: y = x @ weight.T + bias + scaling * sum_j gates[t, j] * (x @ A_e.T) @ B_e.T, e = indices[t, j].
// The normalised backend interface of kernels/lowrank_linear.py. Returns (y, u): y (M, N) in x's dtype,
// u (M, k, r) in the accumulator dtype (float32, float64 for float64 inputs), or an empty tensor of that
// dtype when lora_a is None.
std::tuple<at::Tensor, at::Tensor> lowrank_linear_forward(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& lora_a,
    const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& indices,
    const std::optional<at::Tensor>& gates,
    double scaling,
    int64_t adapter);

// Returns the 6 gradients (dx, dweight, dbias, dlora_a, dlora_b, dgates); needs (6 bools, in that order)
// says which are wanted; the others (and the inapplicable ones) are empty tensors of x's dtype.
std::vector<at::Tensor> lowrank_linear_backward(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& lora_a,
    const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& indices,
    const std::optional<at::Tensor>& gates,
    double scaling,
    int64_t adapter,
    const at::Tensor& u,
    const std::vector<bool>& needs);

// circuit_attention: S = scale * q @ k^T + q_c @ k_c^T, P = softmax(S) (bottom-right causal mask per sequence),
// out = P @ v, out_c = P @ v_c. The backend interface of kernels/circuit_attention.py: contiguous inputs,
// dense (cu_seqlens None: q (B, H, Sq, D), k / v (B, Hkv, Sk, D), lse (B, H, Sq)) or packed (q (total_q, H, D),
// k / v (total_k, Hkv, D), cu_seqlens int32 (B + 1), lse (H, total_q)); q_c / k_c (width R >= 1) both or
// neither, v_c (width Rv >= 1) or None. Returns (out, out_c, lse): out_c empty without v_c; lse float64 for
// float32 / float64 inputs, float32 for 16-bit ones, -inf for a row that sees no key.
std::tuple<at::Tensor, at::Tensor, at::Tensor> circuit_attention_forward(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& q_c,
    const std::optional<at::Tensor>& k_c,
    const std::optional<at::Tensor>& v_c,
    const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q,
    int64_t max_seqlen_k,
    bool causal,
    double scale);

// Returns the 6 gradients (dq, dk, dv, dq_c, dk_c, dv_c), each in its input's dtype; an empty tensor for an
// absent correction. grad_out_c / out_c are empty without v_c.
std::vector<at::Tensor> circuit_attention_backward(
    const at::Tensor& grad_out,
    const at::Tensor& grad_out_c,
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& q_c,
    const std::optional<at::Tensor>& k_c,
    const std::optional<at::Tensor>& v_c,
    const at::Tensor& out,
    const at::Tensor& out_c,
    const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q,
    int64_t max_seqlen_k,
    bool causal,
    double scale);

}  // namespace cpu
}  // namespace recursive_kernels
