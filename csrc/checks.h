// Argument checks shared by the host code of both compiled backends (csrc/<op>_cpu.cpp, csrc/cuda/<op>_cuda.cpp):
// tensor primitives (defined, device, dtype, labelled shapes) and, per op, the checks that do not depend on the
// backend; each backend checks its own device and dtypes first and adds what only it needs after. The public ops
// (kernels/<op>.py) validate first and raise ValueError: these guard direct calls of the extensions.
//
// Every message opens with `where` and the argument's name: where is "lowrank_linear (cpu): " on the CPU
// backend and "" on the CUDA one, whose tests match the name at the start ("x: ...").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

namespace recursive_kernels {

inline void check_defined(const at::Tensor& t, const char* where, const char* name) {
  TORCH_CHECK(t.defined(), where, name, ": expected a tensor, got an undefined one");
}

// t is on the device of ref, which the message calls ref_name.
inline void check_device_like(const at::Tensor& t, const at::Tensor& ref, const char* where, const char* name,
                              const char* ref_name) {
  check_defined(t, where, name);
  TORCH_CHECK(t.device() == ref.device(), where, name, ": expected a tensor on ", ref.device(), " (like ", ref_name,
              "), got ", t.device());
}

// t is on the device of ref and of its dtype.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* where, const char* name,
                       const char* ref_name) {
  check_device_like(t, ref, where, name, ref_name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), where, name, ": expected dtype ", ref.scalar_type(), " (like ",
              ref_name, "), got ", t.scalar_type());
}

// One dimension of an expected shape: its label in messages and its size (-1: any).
struct Dim {
  const char* label;
  int64_t size;
};

// t has exactly the dims given; the message spells the expected shape out, e.g. "k: expected shape (B=2, Hkv,
// Sk, D=64), got [2, 4, 7, 32]".
inline void check_shape(const at::Tensor& t, const char* where, const char* name, std::initializer_list<Dim> dims) {
  bool ok = t.dim() == static_cast<int64_t>(dims.size());
  int64_t d = 0;
  for (const Dim& dim : dims) {
    ok = ok && (dim.size < 0 || t.size(d) == dim.size);
    ++d;
  }
  if (ok) return;
  std::string want;
  for (const Dim& dim : dims) {
    if (!want.empty()) want += ", ";
    want += dim.label;
    if (dim.size >= 0) want += "=" + std::to_string(dim.size);
  }
  TORCH_CHECK(false, where, name, ": expected shape (", want, "), got ", t.sizes());
}

// ---- lowrank_linear ----

// The sizes of one call: x (M, K), weight (N, K), lora_a (E, r, K), lora_b (E, N, r), indices (M, k); E = r = 0
// without low-rank factors, k = 1 without indices.
struct LowrankLinearSizes {
  int64_t M = 0, K = 0, N = 0, E = 0, r = 0, k = 1;
};

// Once the backend has checked x's device and dtype: x is 2-D; weight, bias, lora_a and lora_b are like x and
// shaped to match it; the optional arguments come in the combinations the interface allows; indices is an
// integer (M, k >= 1) tensor and gates a floating one shaped like it, both on x's device (their dtypes are each
// backend's to convert or to insist on); without indices, adapter lies in [0, E).
inline LowrankLinearSizes check_lowrank_linear_args(const char* where, const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias,
                                                    const std::optional<at::Tensor>& lora_a,
                                                    const std::optional<at::Tensor>& lora_b,
                                                    const std::optional<at::Tensor>& indices,
                                                    const std::optional<at::Tensor>& gates, int64_t adapter) {
  TORCH_CHECK(x.dim() == 2, where, "x: expected a 2-D tensor (M, K), got ", x.dim(), " dimensions");
  LowrankLinearSizes s;
  s.M = x.size(0);
  s.K = x.size(1);
  check_like(weight, x, where, "weight", "x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == s.K, where, "weight: expected shape (N, K=", s.K, "), got ",
              weight.sizes());
  s.N = weight.size(0);
  if (bias.has_value()) {
    check_like(*bias, x, where, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.N, where, "bias: expected shape (N=", s.N, ",), got ",
                bias->sizes());
  }
  TORCH_CHECK(lora_a.has_value() == lora_b.has_value(), where,
              "lora_a, lora_b: give both low-rank factors or neither");
  if (!lora_a.has_value()) {
    TORCH_CHECK(!indices.has_value(), where, "indices: given without lora_a/lora_b");
    TORCH_CHECK(!gates.has_value(), where, "gates: given without lora_a/lora_b");
    return s;
  }
  check_like(*lora_a, x, where, "lora_a", "x");
  check_like(*lora_b, x, where, "lora_b", "x");
  TORCH_CHECK(lora_a->dim() == 3 && lora_a->size(2) == s.K, where, "lora_a: expected shape (E, r, K=", s.K,
              "), got ", lora_a->sizes());
  s.E = lora_a->size(0);
  s.r = lora_a->size(1);
  TORCH_CHECK(lora_b->dim() == 3 && lora_b->size(0) == s.E && lora_b->size(1) == s.N && lora_b->size(2) == s.r,
              where, "lora_b: expected shape (E=", s.E, ", N=", s.N, ", r=", s.r, "), got ", lora_b->sizes());
  if (indices.has_value()) {
    check_device_like(*indices, x, where, "indices", "x");
    const at::ScalarType index_type = indices->scalar_type();
    TORCH_CHECK(!at::isFloatingType(index_type) && !at::isComplexType(index_type) && index_type != at::kBool, where,
                "indices: expected an integer tensor, got ", index_type);
    TORCH_CHECK(indices->dim() == 2 && indices->size(0) == s.M && indices->size(1) >= 1, where,
                "indices: expected shape (M=", s.M, ", k >= 1), got ", indices->sizes());
    s.k = indices->size(1);
    if (gates.has_value()) {
      check_device_like(*gates, x, where, "gates", "x");
      TORCH_CHECK(gates->is_floating_point(), where, "gates: expected a floating dtype, got ", gates->scalar_type());
      TORCH_CHECK(gates->sizes() == indices->sizes(), where, "gates: expected shape ", indices->sizes(),
                  " (like indices), got ", gates->sizes());
    }
  } else {
    TORCH_CHECK(!gates.has_value(), where, "gates: per-slot gates need a tensor of indices shaped like them");
    TORCH_CHECK(adapter >= 0 && adapter < s.E, where, "adapter: ", adapter, " is outside [0, ", s.E, ")");
  }
  return s;
}

// The backward's own arguments: grad_y (M, N) like x, and six flags in `needs`.
inline void check_lowrank_linear_grad_y(const char* where, const at::Tensor& grad_y, const at::Tensor& x,
                                        const LowrankLinearSizes& s, size_t num_needs) {
  check_like(grad_y, x, where, "grad_y", "x");
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == s.M && grad_y.size(1) == s.N, where, "grad_y: expected shape (M=",
              s.M, ", N=", s.N, "), got ", grad_y.sizes());
  TORCH_CHECK(num_needs == 6, where, "needs: expected 6 flags (x, weight, bias, lora_a, lora_b, gates), got ",
              num_needs);
}

// u, the forward's second result: (M, k, r) on x's device (its dtype is each backend's).
inline void check_lowrank_linear_u(const char* where, const at::Tensor& u, const at::Tensor& x,
                                   const LowrankLinearSizes& s) {
  check_device_like(u, x, where, "u", "x");
  TORCH_CHECK(u.dim() == 3 && u.size(0) == s.M && u.size(1) == s.k && u.size(2) == s.r, where,
              "u: expected shape (M=", s.M, ", k=", s.k, ", r=", s.r, ") as returned by the forward, got ", u.sizes());
}

// ---- circuit_attention ----

// Whether dense t (B, heads, S, width) is token-major: not contiguous, but a transpose(1, 2) view of a contiguous
// (B, S, heads, width) tensor, the layout models and KV caches keep (the rule of is_token_major in
// kernels/circuit_attention.py; a tensor that is both counts as contiguous). A side of the problem takes the
// layout of its first tensor (q, k), and out and out_c come back in q's.
inline bool is_token_major(const at::Tensor& t) { return !t.is_contiguous() && t.transpose(1, 2).is_contiguous(); }

// Whether the call is packed (both cu_seqlens given) or dense (neither).
inline bool check_packed(const char* where, const std::optional<at::Tensor>& cu_seqlens_q,
                         const std::optional<at::Tensor>& cu_seqlens_k) {
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), where,
              cu_seqlens_q.has_value() ? "cu_seqlens_k" : "cu_seqlens_q",
              ": give both cu_seqlens_q and cu_seqlens_k (packed layout) or neither (dense layout)");
  return cu_seqlens_q.has_value();
}

// The sizes of one call. rows_q / rows_k: Sq / Sk dense, total_q / total_k packed; B: the dense batch (-1 packed,
// where cu_seqlens give it). R = 0 without q_c / k_c, Rv = 0 without v_c.
struct CircuitAttentionSizes {
  int64_t B = -1, H = 0, Hkv = 0, D = 0, R = 0, Rv = 0, rows_q = 0, rows_k = 0;
};

// Once the backend has checked q's device and dtype: q has the layout's dims, dense (B, H, Sq, D) or packed
// (total_q, H, D); k and v are like q and shaped (B, Hkv, Sk, D) / (total_k, Hkv, D), Hkv dividing H; q_c and k_c
// come both or neither, like q, shaped like q and k with one width R; v_c is like q and shaped like k with its
// own width Rv.
inline CircuitAttentionSizes check_circuit_attention_args(const char* where, bool packed, const at::Tensor& q,
                                                          const at::Tensor& k, const at::Tensor& v,
                                                          const std::optional<at::Tensor>& q_c,
                                                          const std::optional<at::Tensor>& k_c,
                                                          const std::optional<at::Tensor>& v_c) {
  TORCH_CHECK(q.dim() == (packed ? 3 : 4), where, "q: expected ",
              packed ? "3 dims (total_q, H, D)" : "4 dims (B, H, Sq, D)", ", got shape ", q.sizes());
  CircuitAttentionSizes s;
  s.H = q.size(1);
  s.D = q.size(-1);
  s.rows_q = packed ? q.size(0) : q.size(2);
  if (!packed) s.B = q.size(0);
  check_like(k, q, where, "k", "q");
  check_like(v, q, where, "v", "q");
  if (packed) {
    check_shape(k, where, "k", {{"total_k", -1}, {"Hkv", -1}, {"D", s.D}});
  } else {
    check_shape(k, where, "k", {{"B", s.B}, {"Hkv", -1}, {"Sk", -1}, {"D", s.D}});
  }
  s.Hkv = k.size(1);
  s.rows_k = packed ? k.size(0) : k.size(2);
  TORCH_CHECK(s.Hkv >= 1 && s.H % s.Hkv == 0, where, "k: its ", s.Hkv, " key/value heads must divide the ", s.H,
              " query heads of q (grouped-query attention)");
  TORCH_CHECK(v.sizes() == k.sizes(), where, "v: expected shape ", k.sizes(), " (like k), got ", v.sizes());

  TORCH_CHECK(q_c.has_value() == k_c.has_value(), where, q_c.has_value() ? "k_c" : "q_c",
              ": q_c and k_c are the two factors of the logit correction; give both or neither");
  if (q_c.has_value()) {
    check_like(*q_c, q, where, "q_c", "q");
    check_like(*k_c, q, where, "k_c", "q");
    if (packed) {
      check_shape(*q_c, where, "q_c", {{"total_q", s.rows_q}, {"H", s.H}, {"R", -1}});
      s.R = q_c->size(2);
      check_shape(*k_c, where, "k_c", {{"total_k", s.rows_k}, {"Hkv", s.Hkv}, {"R", s.R}});
    } else {
      check_shape(*q_c, where, "q_c", {{"B", s.B}, {"H", s.H}, {"Sq", s.rows_q}, {"R", -1}});
      s.R = q_c->size(3);
      check_shape(*k_c, where, "k_c", {{"B", s.B}, {"Hkv", s.Hkv}, {"Sk", s.rows_k}, {"R", s.R}});
    }
  }
  if (v_c.has_value()) {
    check_like(*v_c, q, where, "v_c", "q");
    if (packed) {
      check_shape(*v_c, where, "v_c", {{"total_k", s.rows_k}, {"Hkv", s.Hkv}, {"Rv", -1}});
    } else {
      check_shape(*v_c, where, "v_c", {{"B", s.B}, {"Hkv", s.Hkv}, {"Sk", s.rows_k}, {"Rv", -1}});
    }
    s.Rv = v_c->size(-1);
  }
  return s;
}

}  // namespace recursive_kernels
