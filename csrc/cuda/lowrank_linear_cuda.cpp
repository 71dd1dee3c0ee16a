// lowrank_linear, CUDA backend: the host side of the two functions of the backend interface in
// kernels/lowrank_linear.py, on CUDA tensors:
//   * the dense shared-weight matmuls through ATen (cuBLAS): y = addmm(bias, x, W^T), dx = grad_y @ W,
//     dW = grad_y^T @ x, db = grad_y.sum(0);
//   * the gathered low-rank parts (per-slot adapters, tensor indices) through the hand-written kernels of
//     lowrank_linear_kernels.cu, which read x, grad_y and the adapter factors through their strides;
//   * single-adapter mode (indices None: every row uses `adapter`) is dense: u, v, dlora_a and dlora_b are
//     fp32 ATen matmuls, and only the in-place fp32 read-modify-write of y / dx goes through the
//     expand-add kernel (with no index tensor).
// Every accumulation is fp32; results are contiguous and cast to the dtype of their input.
//
// Only c10/cuda headers are used for the CUDA runtime side (guard, stream, error checks), so this file
// needs no cuBLAS/cuSPARSE headers of its own.
#include "ops_cuda.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "kernel_launch.h"
#include "lowrank_linear_kernels.h"

namespace recursive_kernels {
namespace cuda {
namespace {

namespace rk = recursive_kernels::cuda_backend;

constexpr const char* kWhere = "";  // the messages open with the argument's name (see checks.h)

// The validated low-rank arguments.
struct LowRank {
  at::Tensor a;        // (E, r, K), any strides
  at::Tensor b;        // (E, N, r), any strides
  at::Tensor indices;  // (M, k) int64 contiguous; undefined in single-adapter mode
  at::Tensor gates;    // (M, k) float32 contiguous; undefined when there are no gates
  int64_t E = 0, r = 0, k = 1, adapter = 0;

  bool single() const { return !indices.defined(); }

  rk::SlotMap slot_map(int64_t M) const {
    rk::SlotMap map;
    map.indices = single() ? nullptr : indices.data_ptr<int64_t>();
    map.gates = gates.defined() ? gates.data_ptr<float>() : nullptr;
    map.adapter = adapter;
    map.num_adapters = E;
    map.rows = M;
    map.slots = k;
    return map;
  }
};

// x: a CUDA tensor of a supported dtype; then the checks of checks.h, and indices int64 (the kernels read them
// as they are).
LowrankLinearSizes check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                              const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& gates,
                              int64_t adapter) {
  check_defined(x, kWhere, "x");
  TORCH_CHECK(x.is_cuda(), "x: the cuda backend needs a CUDA tensor, got one on ", x.device());
  scalar_kind(x, "x");
  const LowrankLinearSizes s = check_lowrank_linear_args(kWhere, x, weight, bias, lora_a, lora_b, indices, gates,
                                                         adapter);
  TORCH_CHECK(!indices.has_value() || indices->scalar_type() == at::kLong, "indices: expected int64, got ",
              indices->scalar_type());
  return s;
}

// The low-rank arguments as the kernels take them; std::nullopt when there is no low-rank part.
std::optional<LowRank> low_rank(const LowrankLinearSizes& s, const std::optional<at::Tensor>& lora_a,
                                const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& indices,
                                const std::optional<at::Tensor>& gates, int64_t adapter) {
  if (!lora_a.has_value()) return std::nullopt;
  LowRank lr;
  lr.a = *lora_a;
  lr.b = *lora_b;
  lr.E = s.E;
  lr.r = s.r;
  lr.k = s.k;
  if (indices.has_value()) {
    lr.indices = indices->contiguous();
    if (gates.has_value()) lr.gates = gates->to(at::kFloat).contiguous();
  } else {
    lr.adapter = adapter;
  }
  return lr;
}

void check_cuda(cudaError_t status, const char* what) { check_launch(status, "lowrank_linear", what); }

at::Tensor empty_result(const at::Tensor& x) { return at::empty({0}, x.options().dtype(at::kFloat)); }

}  // namespace

// forward(x, weight, bias, lora_a, lora_b, indices, gates, scaling, adapter) -> (y, u)
std::tuple<at::Tensor, at::Tensor> lowrank_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& gates, double scaling,
    int64_t adapter) {
  const LowrankLinearSizes sizes = check_args(x, weight, bias, lora_a, lora_b, indices, gates, adapter);
  const int64_t M = sizes.M, K = sizes.K, N = sizes.N;
  const bool has_bias = bias.has_value();
  const std::optional<LowRank> lr = low_rank(sizes, lora_a, lora_b, indices, gates, adapter);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  // Shared weight (cuBLAS).
  at::Tensor y = has_bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y = y.contiguous();
  if (!lr) return {y, empty_result(x)};

  const rk::ScalarKind kind = scalar_kind(x, "x");
  const rk::SlotMap map = lr->slot_map(M);
  at::Tensor u;
  if (lr->single()) {
    const at::Tensor a = lr->a.select(0, lr->adapter);  // (r, K)
    u = at::mm(x.to(at::kFloat), a.to(at::kFloat).t()).reshape({M, 1, lr->r}).contiguous();
  } else {
    u = at::empty({M, lr->k, lr->r}, x.options().dtype(at::kFloat));
    check_cuda(rk::lowrank_shrink(kind, u.data_ptr<float>(), x.data_ptr(), x.stride(0), x.stride(1),
                                  lr->a.data_ptr(), lr->a.stride(0), lr->a.stride(1), lr->a.stride(2), map,
                                  lr->r, K, stream),
               "the shrink kernel (u = x @ lora_a[e]^T)");
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // y[t] += s * sum_j g u[t, j] @ lora_b[e]^T, in place (fp32 read-modify-write).
  check_cuda(rk::lowrank_expand_add(kind, y.data_ptr(), y.stride(0), y.stride(1), u.data_ptr<float>(),
                                    lr->b.data_ptr(), lr->b.stride(0), lr->b.stride(1), lr->b.stride(2), map,
                                    lr->r, N, static_cast<float>(scaling), stream),
             "the expand-add kernel (y += s * g * u @ lora_b[e]^T)");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, u};
}

// backward(grad_y, x, weight, lora_a, lora_b, indices, gates, scaling, adapter, u, needs)
//   -> (dx, dweight, dbias, dlora_a, dlora_b, dgates)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& gates, double scaling,
    int64_t adapter, const at::Tensor& u_in, std::vector<bool> needs) {
  const LowrankLinearSizes sizes = check_args(x, weight, std::nullopt, lora_a, lora_b, indices, gates, adapter);
  check_lowrank_linear_grad_y(kWhere, grad_y, x, sizes, needs.size());
  const int64_t M = sizes.M, K = sizes.K, N = sizes.N;
  const std::optional<LowRank> lr = low_rank(sizes, lora_a, lora_b, indices, gates, adapter);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  // Gradients not computed: empty, in x's dtype as the op's fake (meta) implementation gives them.
  at::Tensor dx = at::empty({0}, x.options()), dweight = at::empty({0}, x.options());
  at::Tensor dbias = at::empty({0}, x.options()), dlora_a = at::empty({0}, x.options());
  at::Tensor dlora_b = at::empty({0}, x.options()), dgates = at::empty({0}, x.options());

  // Shared weight and bias (cuBLAS / ATen reductions, fp32 accumulation inside).
  if (needs[0]) dx = at::mm(grad_y, weight).contiguous();
  if (needs[1]) dweight = at::mm(grad_y.t(), x).contiguous();
  if (needs[2]) dbias = grad_y.sum(0).contiguous();
  if (!lr) return {dx, dweight, dbias, dlora_a, dlora_b, dgates};

  const bool want_da = needs[3];
  const bool want_db = needs[4];
  const bool want_dg = needs[5] && lr->gates.defined();
  if (!(needs[0] || want_da || want_db || want_dg)) return {dx, dweight, dbias, dlora_a, dlora_b, dgates};

  check_lowrank_linear_u(kWhere, u_in, x, sizes);
  TORCH_CHECK(u_in.scalar_type() == at::kFloat, "u: expected float32 (as returned by forward), got ",
              u_in.scalar_type());
  const at::Tensor u = u_in.contiguous();
  const rk::ScalarKind kind = scalar_kind(x, "x");
  const rk::SlotMap map = lr->slot_map(M);
  const float s = static_cast<float>(scaling);
  const at::Tensor& a = lr->a;
  const at::Tensor& b = lr->b;

  // v[t, j] = grad_y[t] @ lora_b[e[t, j]]   (fp32, (M, k, r), zeros for empty slots)
  at::Tensor v;
  if (needs[0] || want_da || want_dg) {
    if (lr->single()) {
      v = at::mm(grad_y.to(at::kFloat), b.select(0, lr->adapter).to(at::kFloat)).reshape({M, 1, lr->r}).contiguous();
    } else {
      v = at::empty({M, lr->k, lr->r}, x.options().dtype(at::kFloat));
      // lora_b[e] read as (r, N): strides (s0, s2, s1).
      check_cuda(rk::lowrank_shrink(kind, v.data_ptr<float>(), grad_y.data_ptr(), grad_y.stride(0),
                                    grad_y.stride(1), b.data_ptr(), b.stride(0), b.stride(2), b.stride(1), map,
                                    lr->r, N, stream),
                 "the shrink kernel (v = grad_y @ lora_b[e])");
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  // dx[t] += s * sum_j g v[t, j] @ lora_a[e]   (lora_a[e] read as (K, r): strides (s0, s2, s1))
  if (needs[0]) {
    check_cuda(rk::lowrank_expand_add(kind, dx.data_ptr(), dx.stride(0), dx.stride(1), v.data_ptr<float>(),
                                      a.data_ptr(), a.stride(0), a.stride(2), a.stride(1), map, lr->r, K, s,
                                      stream),
               "the expand-add kernel (dx += s * g * v @ lora_a[e])");
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // dlora_a[e] = s * sum g outer(v, x)   (E, r, K)
  if (want_da) {
    at::Tensor acc = at::zeros({lr->E, lr->r, K}, x.options().dtype(at::kFloat));
    if (lr->single()) {
      acc.select(0, lr->adapter).copy_(at::mm(v.reshape({M, lr->r}).t(), x.to(at::kFloat)).mul_(scaling));
    } else {
      check_cuda(rk::lowrank_outer_scatter(kind, acc.data_ptr<float>(), acc.stride(0), acc.stride(1),
                                           acc.stride(2), v.data_ptr<float>(), x.data_ptr(), x.stride(0),
                                           x.stride(1), map, lr->r, K, s, stream),
                 "the outer-scatter kernel (dlora_a)");
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dlora_a = acc.to(a.scalar_type()).contiguous();
  }

  // dlora_b[e] = s * sum g outer(grad_y, u)   (E, N, r); the buffer is indexed [e, i (rank), c (= n)].
  if (want_db) {
    at::Tensor acc = at::zeros({lr->E, N, lr->r}, x.options().dtype(at::kFloat));
    if (lr->single()) {
      acc.select(0, lr->adapter).copy_(at::mm(grad_y.to(at::kFloat).t(), u.reshape({M, lr->r})).mul_(scaling));
    } else {
      check_cuda(rk::lowrank_outer_scatter(kind, acc.data_ptr<float>(), acc.stride(0), acc.stride(2),
                                           acc.stride(1), u.data_ptr<float>(), grad_y.data_ptr(),
                                           grad_y.stride(0), grad_y.stride(1), map, lr->r, N, s, stream),
                 "the outer-scatter kernel (dlora_b)");
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dlora_b = acc.to(b.scalar_type()).contiguous();
  }

  // dgates[t, j] = s * dot(u[t, j], v[t, j]); u and v are zero on empty slots, so those get 0.
  if (want_dg) dgates = (u * v).sum(-1).mul_(scaling).contiguous();

  return {dx, dweight, dbias, dlora_a, dlora_b, dgates};
}

}  // namespace cuda
}  // namespace recursive_kernels
