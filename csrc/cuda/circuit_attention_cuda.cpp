// circuit_attention, CUDA backend (dense and packed varlen): the host side of the backend interface in
// kernels/circuit_attention.py. It validates the inputs, allocates the results (and the backward's Delta
// scratch) and runs the kernels of circuit_attention_kernels.cu, which read every operand in place through
// its strides (the dense and the packed layouts differ only in the strides passed and in cu_seqlens; a
// token-major dense side is read as it lies): only a tensor whose last dim is strided is copied. out and out_c
// are allocated in q's layout, each gradient in its input's. lse is float64 for float32 inputs and float32 for
// 16-bit inputs.
#include "ops_cuda.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "circuit_attention_kernels.h"
#include "kernel_launch.h"

namespace recursive_kernels {
namespace cuda {
namespace {

namespace rk = recursive_kernels::cuda_backend;

constexpr const char* kWhere = "";  // the messages open with the argument's name (see checks.h)

// Dense: q (B, H, Sq, D), k / v (B, Hkv, Sk, D), lse (B, H, Sq). Packed: q (total_q, H, D), k / v
// (total_k, Hkv, D), lse (H, total_q), sequences delimited by cu_seqlens. Corrections like their partners
// with widths R (q_c, k_c) and Rv (v_c).
enum class Layout { kDense, kPacked };

// The validated inputs of one call: every tensor's last dim contiguous, an absent correction undefined.
struct AttentionArgs {
  Layout layout = Layout::kDense;
  at::Tensor q, k, v, q_c, k_c, v_c;
  at::Tensor cu_seqlens_q, cu_seqlens_k;  // packed only
  rk::CircuitAttentionShape shape{};
};

// The dtype of lse and Delta: the softmax statistics are double for float32 inputs.
at::ScalarType stats_dtype(const at::Tensor& q) { return q.scalar_type() == at::kFloat ? at::kDouble : at::kFloat; }

void check_cu_seqlens(const at::Tensor& cu, const at::Tensor& q, const char* name) {
  check_device_like(cu, q, kWhere, name, "q");
  TORCH_CHECK(cu.scalar_type() == at::kInt, name, ": expected int32 offsets, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, name, ": expected a 1-D tensor of batch + 1 offsets, got shape ",
              cu.sizes());
}

// The tensor itself when its last dim is contiguous (the kernels take any other strides), else a contiguous copy.
at::Tensor unit_stride_rows(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Validates the inputs of either layout: q a CUDA tensor of a supported dtype, then the checks of checks.h and
// the packed layout's offsets. cu_seqlens_q / cu_seqlens_k and the max lengths are used by the packed layout
// only.
AttentionArgs check_inputs(Layout layout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& q_c, const std::optional<at::Tensor>& k_c,
                           const std::optional<at::Tensor>& v_c, const at::Tensor& cu_seqlens_q,
                           const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                           double scale) {
  const bool packed = layout == Layout::kPacked;
  check_defined(q, kWhere, "q");
  TORCH_CHECK(q.is_cuda(), "q: the cuda backend needs a CUDA tensor, got one on ", q.device());
  scalar_kind(q, "q");
  const CircuitAttentionSizes sizes = check_circuit_attention_args(kWhere, packed, q, k, v, q_c, k_c, v_c);

  AttentionArgs args;
  args.layout = layout;
  args.q = unit_stride_rows(q);
  args.k = unit_stride_rows(k);
  args.v = unit_stride_rows(v);
  if (q_c.has_value()) {
    args.q_c = unit_stride_rows(*q_c);
    args.k_c = unit_stride_rows(*k_c);
  }
  if (v_c.has_value()) args.v_c = unit_stride_rows(*v_c);

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
    shape.batch = sizes.B;
    shape.seqlen_q = sizes.rows_q;
    shape.seqlen_k = sizes.rows_k;
    shape.cu_seqlens_q = nullptr;
    shape.cu_seqlens_k = nullptr;
  }
  shape.heads = sizes.H;
  shape.kv_heads = sizes.Hkv;
  shape.head_dim = sizes.D;
  shape.rank_qk = sizes.R;
  shape.rank_v = sizes.Rv;
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

// A result of the query side (out, out_c) `width` wide, in q's layout: token-major or contiguous.
at::Tensor query_result(const AttentionArgs& a, int64_t width) {
  if (a.layout == Layout::kPacked || !is_token_major(a.q)) return at::empty(query_sizes(a, width), a.q.options());
  return at::empty({a.q.size(0), a.q.size(2), a.q.size(1), width}, a.q.options()).transpose(1, 2);
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
  check_launch(status, "circuit_attention", what);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const AttentionArgs& a) {
  const at::Tensor& q = a.q;
  at::Tensor out = query_result(a, a.shape.head_dim);
  at::Tensor out_c = a.v_c.defined() ? query_result(a, a.shape.rank_v) : at::empty({0}, q.options());
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
  check_like(out_in, q, kWhere, "out", "q");
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef(out_sizes), "out: expected shape ", out_sizes, " (like q), got ",
              out_in.sizes());
  check_like(grad_out_in, q, kWhere, "grad_out", "q");
  TORCH_CHECK(grad_out_in.sizes() == out_in.sizes(), "grad_out: expected shape ", out_in.sizes(), " (like out), got ",
              grad_out_in.sizes());
  at::Tensor out_c, grad_out_c;  // undefined without v_c: the kernels then read neither
  if (a.v_c.defined()) {
    const std::vector<int64_t> out_c_sizes = query_sizes(a, a.shape.rank_v);
    check_like(out_c_in, q, kWhere, "out_c", "q");
    TORCH_CHECK(out_c_in.sizes() == at::IntArrayRef(out_c_sizes), "out_c: expected shape ", out_c_sizes, ", got ",
                out_c_in.sizes());
    check_like(grad_out_c_in, q, kWhere, "grad_out_c", "q");
    TORCH_CHECK(grad_out_c_in.sizes() == out_c_in.sizes(), "grad_out_c: expected shape ", out_c_in.sizes(),
                " (like out_c), got ", grad_out_c_in.sizes());
    out_c = unit_stride_rows(out_c_in);
    grad_out_c = unit_stride_rows(grad_out_c_in);
  }
  check_device_like(lse_in, q, kWhere, "lse", "q");
  TORCH_CHECK(lse_in.scalar_type() == stats_dtype(q), "lse: expected dtype ", stats_dtype(q), " for ",
              q.scalar_type(), " inputs (as returned by the forward), got ", lse_in.scalar_type());
  const std::vector<int64_t> lse_sizes = stats_sizes(a);
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef(lse_sizes), "lse: expected shape ", lse_sizes, ", got ",
              lse_in.sizes());
  const at::Tensor out = unit_stride_rows(out_in), grad_out = unit_stride_rows(grad_out_in);
  const at::Tensor lse = lse_in.contiguous();

  auto gradient_like = [&q](const at::Tensor& t) {  // in t's layout (as the op's fake: empty_like)
    return t.defined() ? at::empty_like(t) : at::empty({0}, q.options());
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

}  // namespace

// One entry point per direction for both layouts, packed when cu_seqlens are given (max_seqlen_q/k are read
// only then).
std::tuple<at::Tensor, at::Tensor, at::Tensor> circuit_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& q_c,
    const std::optional<at::Tensor>& k_c, const std::optional<at::Tensor>& v_c,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale) {
  const Layout layout = check_packed(kWhere, cu_seqlens_q, cu_seqlens_k) ? Layout::kPacked : Layout::kDense;
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
  const Layout layout = check_packed(kWhere, cu_seqlens_q, cu_seqlens_k) ? Layout::kPacked : Layout::kDense;
  const AttentionArgs args =
      check_inputs(layout, q, k, v, q_c, k_c, v_c, cu_seqlens_q.value_or(at::Tensor()),
                   cu_seqlens_k.value_or(at::Tensor()), max_seqlen_q, max_seqlen_k, causal, scale);
  return attention_backward(args, grad_out, grad_out_c, out, out_c, lse);
}

}  // namespace cuda
}  // namespace recursive_kernels
