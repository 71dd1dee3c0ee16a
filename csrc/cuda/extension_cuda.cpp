// Python binding of the CUDA fallback backend (module recursive_kernels._C_cuda): `lowrank_linear` and
// `circuit_attention` (dense and packed varlen).
//
// lowrank_linear implements the two functions of the backend interface in kernels/lowrank_linear.py on CUDA
// tensors:
//   * the dense shared-weight matmuls through ATen (cuBLAS): y = addmm(bias, x, W^T), dx = grad_y @ W,
//     dW = grad_y^T @ x, db = grad_y.sum(0);
//   * the gathered low-rank parts (per-slot adapters, tensor indices) through the hand-written kernels of
//     lowrank_linear_kernels.cu, which read x, grad_y and the adapter factors through their strides;
//   * single-adapter mode (indices None: every row uses `adapter`) is dense: u, v, dlora_a and dlora_b are
//     fp32 ATen matmuls, and only the in-place fp32 read-modify-write of y / dx goes through the
//     expand-add kernel (with no index tensor).
// Every accumulation is fp32; results are contiguous and cast to the dtype of their input.
//
// circuit_attention validates the inputs, allocates the results (and the backward's Delta scratch) and runs
// the kernels of circuit_attention_kernels.cu, which read every operand in place through its strides (the
// dense and the packed layouts differ only in the strides passed and in cu_seqlens). lse is float64 for
// float32 inputs and float32 for 16-bit inputs.
//
// Only c10/cuda headers are used for the CUDA runtime side (guard, stream, error checks), so this file
// needs no cuBLAS/cuSPARSE headers of its own.

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "circuit_attention_kernels.h"
#include "lowrank_linear_kernels.h"

namespace {

namespace rk = recursive_kernels::cuda_backend;

rk::ScalarKind scalar_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return rk::ScalarKind::kFloat32;
    case at::kHalf:
      return rk::ScalarKind::kFloat16;
    case at::kBFloat16:
      return rk::ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, name, ": the cuda backend supports float32, float16 and bfloat16, got ",
                  t.scalar_type());
  }
  return rk::ScalarKind::kFloat32;  // unreachable
}

void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(t.device() == x.device(), name, ": expected a tensor on ", x.device(), " (like x), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(),
              " (like x), got ", t.scalar_type());
}

void check_on_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(t.device() == x.device(), name, ": expected a tensor on ", x.device(), " (like x), got ",
              t.device());
}

// x: a 2-D CUDA tensor of a supported dtype.
void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.defined(), "x: expected a tensor, got an undefined one");
  TORCH_CHECK(x.is_cuda(), "x: the cuda backend needs a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor (M, K), got ", x.dim(), " dimensions");
  scalar_kind(x, "x");
}

void check_weight(const at::Tensor& weight, const at::Tensor& x) {
  check_like_x(weight, x, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight: expected shape (N, K=", x.size(1),
              "), got ", weight.sizes());
}

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

// Validates the optional low-rank arguments; returns std::nullopt when there is no low-rank part.
std::optional<LowRank> check_lowrank(const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& lora_a,
                                     const std::optional<at::Tensor>& lora_b,
                                     const std::optional<at::Tensor>& indices,
                                     const std::optional<at::Tensor>& gates, int64_t adapter) {
  const bool has_a = lora_a.has_value() && lora_a->defined();
  const bool has_b = lora_b.has_value() && lora_b->defined();
  const bool has_indices = indices.has_value() && indices->defined();
  const bool has_gates = gates.has_value() && gates->defined();
  TORCH_CHECK(has_a == has_b, "lora_a, lora_b: give both low-rank factors or neither");
  if (!has_a) {
    TORCH_CHECK(!has_indices, "indices: given without lora_a/lora_b");
    TORCH_CHECK(!has_gates, "gates: given without lora_a/lora_b");
    return std::nullopt;
  }
  const int64_t M = x.size(0), K = x.size(1);
  LowRank lr;
  lr.a = *lora_a;
  lr.b = *lora_b;
  check_like_x(lr.a, x, "lora_a");
  check_like_x(lr.b, x, "lora_b");
  TORCH_CHECK(lr.a.dim() == 3 && lr.a.size(2) == K, "lora_a: expected shape (E, r, K=", K, "), got ",
              lr.a.sizes());
  lr.E = lr.a.size(0);
  lr.r = lr.a.size(1);
  TORCH_CHECK(lr.b.dim() == 3 && lr.b.size(0) == lr.E && lr.b.size(1) == N && lr.b.size(2) == lr.r,
              "lora_b: expected shape (E=", lr.E, ", N=", N, ", r=", lr.r, "), got ", lr.b.sizes());
  if (has_indices) {
    const at::Tensor& idx = *indices;
    check_on_device(idx, x, "indices");
    TORCH_CHECK(idx.scalar_type() == at::kLong, "indices: expected int64, got ", idx.scalar_type());
    TORCH_CHECK(idx.dim() == 2 && idx.size(0) == M && idx.size(1) >= 1,
                "indices: expected shape (M=", M, ", k >= 1), got ", idx.sizes());
    lr.indices = idx.contiguous();
    lr.k = idx.size(1);
    if (has_gates) {
      const at::Tensor& g = *gates;
      check_on_device(g, x, "gates");
      TORCH_CHECK(g.is_floating_point(), "gates: expected a floating dtype, got ", g.scalar_type());
      TORCH_CHECK(g.sizes() == idx.sizes(), "gates: expected shape ", idx.sizes(), " (like indices), got ",
                  g.sizes());
      lr.gates = g.to(at::kFloat).contiguous();
    }
  } else {
    TORCH_CHECK(!has_gates, "gates: per-slot gates need a tensor of indices shaped like them");
    TORCH_CHECK(adapter >= 0 && adapter < lr.E, "adapter: ", adapter, " is outside [0, ", lr.E, ")");
    lr.adapter = adapter;
    lr.k = 1;
  }
  return lr;
}

void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "lowrank_linear (cuda backend): ", what, " failed: ",
              cudaGetErrorString(status));
}

at::Tensor empty_result(const at::Tensor& x) { return at::empty({0}, x.options().dtype(at::kFloat)); }

}  // namespace

// forward(x, weight, bias, lora_a, lora_b, indices, gates, scaling, adapter) -> (y, u)
std::tuple<at::Tensor, at::Tensor> lowrank_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& gates, double scaling,
    int64_t adapter) {
  check_x(x);
  check_weight(weight, x);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_like_x(*bias, x, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias: expected shape (N=", N, ",), got ",
                bias->sizes());
  }
  const std::optional<LowRank> lr = check_lowrank(x, N, lora_a, lora_b, indices, gates, adapter);

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
  check_x(x);
  check_weight(weight, x);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check_like_x(grad_y, x, "grad_y");
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N, "grad_y: expected shape (M=", M,
              ", N=", N, "), got ", grad_y.sizes());
  TORCH_CHECK(needs.size() == 6, "needs: expected 6 flags (x, weight, bias, lora_a, lora_b, gates), got ",
              needs.size());
  const std::optional<LowRank> lr = check_lowrank(x, N, lora_a, lora_b, indices, gates, adapter);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  at::Tensor dx = empty_result(x), dweight = empty_result(x), dbias = empty_result(x);
  at::Tensor dlora_a = empty_result(x), dlora_b = empty_result(x), dgates = empty_result(x);

  // Shared weight and bias (cuBLAS / ATen reductions, fp32 accumulation inside).
  if (needs[0]) dx = at::mm(grad_y, weight).contiguous();
  if (needs[1]) dweight = at::mm(grad_y.t(), x).contiguous();
  if (needs[2]) dbias = grad_y.sum(0).contiguous();
  if (!lr) return {dx, dweight, dbias, dlora_a, dlora_b, dgates};

  const bool want_da = needs[3];
  const bool want_db = needs[4];
  const bool want_dg = needs[5] && lr->gates.defined();
  if (!(needs[0] || want_da || want_db || want_dg)) return {dx, dweight, dbias, dlora_a, dlora_b, dgates};

  check_on_device(u_in, x, "u");
  TORCH_CHECK(u_in.scalar_type() == at::kFloat, "u: expected float32 (as returned by forward), got ",
              u_in.scalar_type());
  TORCH_CHECK(u_in.dim() == 3 && u_in.size(0) == M && u_in.size(1) == lr->k && u_in.size(2) == lr->r,
              "u: expected shape (M=", M, ", k=", lr->k, ", r=", lr->r, ") as returned by forward, got ",
              u_in.sizes());
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

// ---- circuit_attention ----

namespace {

// Dense: q (B, H, Sq, D), k / v (B, Hkv, Sk, D), lse (B, H, Sq). Packed: q (total_q, H, D), k / v
// (total_k, Hkv, D), lse (H, total_q), sequences delimited by cu_seqlens. Corrections like their partners
// with widths R (q_c, k_c) and Rv (v_c).
enum class Layout { kDense, kPacked };

// The validated inputs of one call: every tensor contiguous, an absent correction undefined.
struct AttentionArgs {
  Layout layout = Layout::kDense;
  at::Tensor q, k, v, q_c, k_c, v_c;
  at::Tensor cu_seqlens_q, cu_seqlens_k;  // packed only
  rk::CircuitAttentionShape shape{};
};

using Dim = std::pair<const char*, int64_t>;  // a dim's label and its expected size (-1: any)

void check_shape(const at::Tensor& t, const char* name, std::initializer_list<Dim> dims) {
  bool ok = t.dim() == static_cast<int64_t>(dims.size());
  int64_t d = 0;
  for (const Dim& dim : dims) {
    ok = ok && (dim.second < 0 || t.size(d) == dim.second);
    ++d;
  }
  if (ok) return;
  std::string want;
  for (const Dim& dim : dims) {
    if (!want.empty()) want += ", ";
    want += dim.first;
    if (dim.second >= 0) want += "=" + std::to_string(dim.second);
  }
  TORCH_CHECK(false, name, ": expected shape (", want, "), got ", t.sizes());
}

void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(t.device() == q.device(), name, ": expected a tensor on ", q.device(), " (like q), got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(), " (like q), got ",
              t.scalar_type());
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The dtype of lse and Delta: the softmax statistics are double for float32 inputs.
at::ScalarType stats_dtype(const at::Tensor& q) { return q.scalar_type() == at::kFloat ? at::kDouble : at::kFloat; }

void check_cu_seqlens(const at::Tensor& cu, const at::Tensor& q, const char* name) {
  TORCH_CHECK(cu.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(cu.device() == q.device(), name, ": expected a tensor on ", q.device(), " (like q), got ", cu.device());
  TORCH_CHECK(cu.scalar_type() == at::kInt, name, ": expected int32 offsets, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, name, ": expected a 1-D tensor of batch + 1 offsets, got shape ",
              cu.sizes());
}

// Validates the inputs of either layout. cu_seqlens_q / cu_seqlens_k and the max lengths are used by the
// packed layout only.
AttentionArgs check_inputs(Layout layout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& q_c, const std::optional<at::Tensor>& k_c,
                           const std::optional<at::Tensor>& v_c, const at::Tensor& cu_seqlens_q,
                           const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                           double scale) {
  const bool packed = layout == Layout::kPacked;
  TORCH_CHECK(q.defined(), "q: expected a tensor, got an undefined one");
  TORCH_CHECK(q.is_cuda(), "q: the cuda backend needs a CUDA tensor, got one on ", q.device());
  scalar_kind(q, "q");
  TORCH_CHECK(q.dim() == (packed ? 3 : 4), "q: expected ", packed ? "3 dims (total_q, H, D)" : "4 dims (B, H, Sq, D)",
              ", got shape ", q.sizes());
  const int64_t H = q.size(1), D = q.size(-1);
  const int64_t rows_q = packed ? q.size(0) : q.size(2);  // total_q or Sq
  const int64_t B = packed ? -1 : q.size(0);
  check_like_q(k, q, "k");
  check_like_q(v, q, "v");
  if (packed) {
    check_shape(k, "k", {{"total_k", -1}, {"Hkv", -1}, {"D", D}});
  } else {
    check_shape(k, "k", {{"B", B}, {"Hkv", -1}, {"Sk", -1}, {"D", D}});
  }
  const int64_t Hkv = k.size(1);
  const int64_t rows_k = packed ? k.size(0) : k.size(2);  // total_k or Sk
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "k: its ", Hkv, " key/value heads must divide the ", H,
              " query heads of q (grouped-query attention)");
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected shape ", k.sizes(), " (like k), got ", v.sizes());

  TORCH_CHECK(present(q_c) == present(k_c), present(q_c) ? "k_c" : "q_c",
              ": q_c and k_c are the two factors of the logit correction; give both or neither");
  int64_t R = 0, Rv = 0;
  if (present(q_c)) {
    check_like_q(*q_c, q, "q_c");
    check_like_q(*k_c, q, "k_c");
    if (packed) {
      check_shape(*q_c, "q_c", {{"total_q", rows_q}, {"H", H}, {"R", -1}});
      R = q_c->size(2);
      check_shape(*k_c, "k_c", {{"total_k", rows_k}, {"Hkv", Hkv}, {"R", R}});
    } else {
      check_shape(*q_c, "q_c", {{"B", B}, {"H", H}, {"Sq", rows_q}, {"R", -1}});
      R = q_c->size(3);
      check_shape(*k_c, "k_c", {{"B", B}, {"Hkv", Hkv}, {"Sk", rows_k}, {"R", R}});
    }
  }
  if (present(v_c)) {
    check_like_q(*v_c, q, "v_c");
    if (packed) {
      check_shape(*v_c, "v_c", {{"total_k", rows_k}, {"Hkv", Hkv}, {"Rv", -1}});
    } else {
      check_shape(*v_c, "v_c", {{"B", B}, {"Hkv", Hkv}, {"Sk", rows_k}, {"Rv", -1}});
    }
    Rv = v_c->size(-1);
  }

  AttentionArgs args;
  args.layout = layout;
  args.q = q.contiguous();
  args.k = k.contiguous();
  args.v = v.contiguous();
  if (present(q_c)) {
    args.q_c = q_c->contiguous();
    args.k_c = k_c->contiguous();
  }
  if (present(v_c)) args.v_c = v_c->contiguous();

  rk::CircuitAttentionShape& shape = args.shape;
  if (packed) {
    check_cu_seqlens(cu_seqlens_q, q, "cu_seqlens_q");
    check_cu_seqlens(cu_seqlens_k, q, "cu_seqlens_k");
    TORCH_CHECK(cu_seqlens_k.numel() == cu_seqlens_q.numel(), "cu_seqlens_k: expected ", cu_seqlens_q.numel(),
                " offsets like cu_seqlens_q, got ", cu_seqlens_k.numel());
    TORCH_CHECK(max_seqlen_q >= 0, "max_seqlen_q: expected a length >= 0, got ", max_seqlen_q);
    TORCH_CHECK(max_seqlen_k >= 0, "max_seqlen_k: expected a length >= 0, got ", max_seqlen_k);
    args.cu_seqlens_q = cu_seqlens_q.contiguous();
    args.cu_seqlens_k = cu_seqlens_k.contiguous();
    shape.batch = cu_seqlens_q.numel() - 1;
    shape.seqlen_q = max_seqlen_q;
    shape.seqlen_k = max_seqlen_k;
    shape.cu_seqlens_q = args.cu_seqlens_q.data_ptr<int32_t>();
    shape.cu_seqlens_k = args.cu_seqlens_k.data_ptr<int32_t>();
  } else {
    shape.batch = B;
    shape.seqlen_q = rows_q;
    shape.seqlen_k = rows_k;
    shape.cu_seqlens_q = nullptr;
    shape.cu_seqlens_k = nullptr;
  }
  shape.heads = H;
  shape.kv_heads = Hkv;
  shape.head_dim = D;
  shape.rank_qk = R;
  shape.rank_v = Rv;
  shape.causal = causal;
  shape.scale = static_cast<float>(scale);
  return args;
}

// An operand of the layout (see AttentionOperand); an undefined tensor is absent.
rk::AttentionOperand operand(const at::Tensor& t, Layout layout) {
  if (!t.defined()) return {nullptr, 0, 0, 0};
  if (layout == Layout::kDense) return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
  return {t.data_ptr(), 0, t.stride(1), t.stride(0)};
}

// lse / Delta: dense (B, H, Sq), packed (H, total_q).
rk::AttentionOperand stats_operand(const at::Tensor& t, Layout layout) {
  if (layout == Layout::kDense) return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
  return {t.data_ptr(), 0, t.stride(0), t.stride(1)};
}

std::vector<int64_t> stats_sizes(const AttentionArgs& a) {
  if (a.layout == Layout::kDense) return {a.q.size(0), a.q.size(1), a.q.size(2)};
  return {a.q.size(1), a.q.size(0)};
}

// q's sizes with the last one replaced by `width`: the shape of out (width D) and out_c (width Rv).
std::vector<int64_t> query_sizes(const AttentionArgs& a, int64_t width) {
  std::vector<int64_t> sizes = a.q.sizes().vec();
  sizes.back() = width;
  return sizes;
}

rk::CircuitAttentionTensors tensors_of(const AttentionArgs& a, const at::Tensor& out, const at::Tensor& out_c,
                                       const at::Tensor& lse) {
  rk::CircuitAttentionTensors ts;
  ts.q = operand(a.q, a.layout);
  ts.k = operand(a.k, a.layout);
  ts.v = operand(a.v, a.layout);
  ts.q_c = operand(a.q_c, a.layout);
  ts.k_c = operand(a.k_c, a.layout);
  ts.v_c = operand(a.v_c, a.layout);
  ts.out = operand(out, a.layout);
  ts.out_c = operand(a.v_c.defined() ? out_c : at::Tensor(), a.layout);
  ts.lse = stats_operand(lse, a.layout);
  return ts;
}

void check_attention_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "circuit_attention (cuda backend): ", what, " failed: ",
              cudaGetErrorString(status));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const AttentionArgs& a) {
  const at::Tensor& q = a.q;
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor out_c =
      a.v_c.defined() ? at::empty(query_sizes(a, a.shape.rank_v), q.options()) : at::empty({0}, q.options());
  at::Tensor lse = at::empty(stats_sizes(a), q.options().dtype(stats_dtype(q)));

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_attention_launch(
      rk::circuit_attention_forward(scalar_kind(q, "q"), a.shape, tensors_of(a, out, out_c, lse), stream),
      "the forward kernel");
  return {out, out_c, lse};
}

std::vector<at::Tensor> attention_backward(const AttentionArgs& a, const at::Tensor& grad_out_in,
                                           const at::Tensor& grad_out_c_in, const at::Tensor& out_in,
                                           const at::Tensor& out_c_in, const at::Tensor& lse_in) {
  const at::Tensor& q = a.q;
  const std::vector<int64_t> out_sizes = query_sizes(a, a.shape.head_dim);
  check_like_q(out_in, q, "out");
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef(out_sizes), "out: expected shape ", out_sizes, " (like q), got ",
              out_in.sizes());
  check_like_q(grad_out_in, q, "grad_out");
  TORCH_CHECK(grad_out_in.sizes() == out_in.sizes(), "grad_out: expected shape ", out_in.sizes(), " (like out), got ",
              grad_out_in.sizes());
  at::Tensor out_c, grad_out_c;  // undefined without v_c: the kernels then read neither
  if (a.v_c.defined()) {
    const std::vector<int64_t> out_c_sizes = query_sizes(a, a.shape.rank_v);
    check_like_q(out_c_in, q, "out_c");
    TORCH_CHECK(out_c_in.sizes() == at::IntArrayRef(out_c_sizes), "out_c: expected shape ", out_c_sizes, ", got ",
                out_c_in.sizes());
    check_like_q(grad_out_c_in, q, "grad_out_c");
    TORCH_CHECK(grad_out_c_in.sizes() == out_c_in.sizes(), "grad_out_c: expected shape ", out_c_in.sizes(),
                " (like out_c), got ", grad_out_c_in.sizes());
    out_c = out_c_in.contiguous();
    grad_out_c = grad_out_c_in.contiguous();
  }
  TORCH_CHECK(lse_in.defined(), "lse: expected a tensor, got an undefined one");
  TORCH_CHECK(lse_in.device() == q.device(), "lse: expected a tensor on ", q.device(), " (like q), got ",
              lse_in.device());
  TORCH_CHECK(lse_in.scalar_type() == stats_dtype(q), "lse: expected dtype ", stats_dtype(q), " for ",
              q.scalar_type(), " inputs (as returned by the forward), got ", lse_in.scalar_type());
  const std::vector<int64_t> lse_sizes = stats_sizes(a);
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef(lse_sizes), "lse: expected shape ", lse_sizes, ", got ",
              lse_in.sizes());
  const at::Tensor out = out_in.contiguous(), grad_out = grad_out_in.contiguous(), lse = lse_in.contiguous();

  auto gradient_like = [&q](const at::Tensor& t) {
    return t.defined() ? at::empty(t.sizes(), t.options()) : at::empty({0}, q.options());
  };
  std::vector<at::Tensor> grads = {gradient_like(a.q),   gradient_like(a.k),   gradient_like(a.v),
                                   gradient_like(a.q_c), gradient_like(a.k_c), gradient_like(a.v_c)};
  at::Tensor delta = at::empty(lse_sizes, lse.options());

  rk::CircuitAttentionGrads gs;
  gs.grad_out = operand(grad_out, a.layout);
  gs.grad_out_c = operand(grad_out_c, a.layout);
  gs.delta = stats_operand(delta, a.layout);
  gs.dq = operand(grads[0], a.layout);
  gs.dk = operand(grads[1], a.layout);
  gs.dv = operand(grads[2], a.layout);
  gs.dq_c = operand(a.q_c.defined() ? grads[3] : at::Tensor(), a.layout);
  gs.dk_c = operand(a.k_c.defined() ? grads[4] : at::Tensor(), a.layout);
  gs.dv_c = operand(a.v_c.defined() ? grads[5] : at::Tensor(), a.layout);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_attention_launch(
      rk::circuit_attention_backward(scalar_kind(q, "q"), a.shape, tensors_of(a, out, out_c, lse), gs, stream),
      "the backward kernels");
  return grads;
}

Layout layout_of(const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k) {
  TORCH_CHECK(present(cu_seqlens_q) == present(cu_seqlens_k), present(cu_seqlens_q) ? "cu_seqlens_k" : "cu_seqlens_q",
              ": give both cu_seqlens_q and cu_seqlens_k (packed layout) or neither (dense layout)");
  return present(cu_seqlens_q) ? Layout::kPacked : Layout::kDense;
}

}  // namespace

// The backend interface of kernels/circuit_attention.py: one entry point per direction for both layouts,
// packed when cu_seqlens are given (max_seqlen_q/k are read only then).
std::tuple<at::Tensor, at::Tensor, at::Tensor> circuit_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& q_c,
    const std::optional<at::Tensor>& k_c, const std::optional<at::Tensor>& v_c,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale) {
  const Layout layout = layout_of(cu_seqlens_q, cu_seqlens_k);
  return attention_forward(check_inputs(layout, q, k, v, q_c, k_c, v_c, cu_seqlens_q.value_or(at::Tensor()),
                                        cu_seqlens_k.value_or(at::Tensor()), max_seqlen_q, max_seqlen_k, causal,
                                        scale));
}

std::vector<at::Tensor> circuit_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_out_c, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& q_c, const std::optional<at::Tensor>& k_c,
    const std::optional<at::Tensor>& v_c, const at::Tensor& out, const at::Tensor& out_c, const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale) {
  const Layout layout = layout_of(cu_seqlens_q, cu_seqlens_k);
  const AttentionArgs args =
      check_inputs(layout, q, k, v, q_c, k_c, v_c, cu_seqlens_q.value_or(at::Tensor()),
                   cu_seqlens_k.value_or(at::Tensor()), max_seqlen_q, max_seqlen_k, causal, scale);
  return attention_backward(args, grad_out, grad_out_c, out, out_c, lse);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recursive-kernels: CUDA fallback backend (lowrank_linear, circuit_attention); see the backend "
            "interfaces in kernels/lowrank_linear.py and kernels/circuit_attention.py";
  m.def("lowrank_linear_forward", &lowrank_linear_forward,
        "lowrank_linear forward on CUDA tensors -> (y, u)", py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("lora_a"), py::arg("lora_b"), py::arg("indices"), py::arg("gates"), py::arg("scaling"),
        py::arg("adapter"));
  m.def("lowrank_linear_backward", &lowrank_linear_backward,
        "lowrank_linear backward on CUDA tensors -> (dx, dweight, dbias, dlora_a, dlora_b, dgates)",
        py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("indices"), py::arg("gates"), py::arg("scaling"), py::arg("adapter"), py::arg("u"),
        py::arg("needs"));
  m.def("circuit_attention_forward", &circuit_attention_forward,
        "circuit_attention forward on CUDA tensors, the backend interface of kernels/circuit_attention.py (packed "
        "when cu_seqlens are given) -> (out, out_c, lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_c"), py::arg("k_c"), py::arg("v_c"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("causal"), py::arg("scale"));
  m.def("circuit_attention_backward", &circuit_attention_backward,
        "circuit_attention backward on CUDA tensors, the backend interface of kernels/circuit_attention.py "
        "-> [dq, dk, dv, dq_c, dk_c, dv_c]",
        py::arg("grad_out"), py::arg("grad_out_c"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_c"),
        py::arg("k_c"), py::arg("v_c"), py::arg("out"), py::arg("out_c"), py::arg("lse"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("causal"),
        py::arg("scale"));
}
