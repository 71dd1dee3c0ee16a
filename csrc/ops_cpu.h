// Declarations of the CPU (C++/ATen/OpenMP) ops that csrc/extension_cpu.cpp exposes as kernels._C.
// Each op lives in its own csrc/<op>_cpu.cpp; add its declarations here and its binding there.
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

}  // namespace cpu
}  // namespace recursive_kernels
