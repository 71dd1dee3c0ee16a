// lowrank_linear, CPU backend (ATen + OpenMP through at::parallel_for): the op's entry points and argument
// checks, the plan and the choice of path, the ATen products and the work buffers. The hand-written loop kernels
// are in lowrank_linear_cpu_loops.cpp.
//
//   y[t] = x[t] @ W.T + b + s * sum_j g[t, j] * (x[t] @ A_e.T) @ B_e.T,   e = indices[t, j]
//
// Design.
// * The dense, shared matmuls (x @ W.T + b, grad_y @ W, grad_y.T @ x) go to ATen (multithreaded BLAS /
//   oneDNN); they dominate the cost.
// * The (row, slot) assignments are counting-sorted by adapter in O(M k) into a "plan": every slot with an
//   adapter gets a row of a work buffer, the rows of one adapter contiguous (buffer row q <-> slot).
// * Small problems (decode; up to a few million low-rank multiply-adds per used adapter) run on the
//   hand-written loop kernels: u = A_e x, v = grad_y B_e, and dlora_a / dlora_b as per-adapter reductions.
//   Larger problems (prefill) do those products with one ATen matmul per used adapter on the adapter's rows
//   gathered into an fp32/fp64 buffer: the per-op overhead is amortised and BLAS is faster.
// * The output-bound products, whose contraction is the short rank (y += (g s u) B_e^T and dx += (g s v) A_e),
//   always run on loop kernels that add straight into y / dx (every element written by one thread, the k slots
//   of a row summed in fp32 and rounded once): no (P, N) buffer, no scatter pass.
//   Exception: the identity assignment (one adapter for every row, or per-row indices already sorted) without
//   upcast, where x / grad_y are read as they are and y / dx updated by addmm_, nothing gathered at all.
// * bfloat16 / float16: low-rank math in fp32 (x rows and the used adapters upcast once per call), results
//   rounded once; the dense matmuls run in the input dtype through ATen. float64 stays float64.
#include "ops_cpu.h"
#include "checks.h"
#include "lowrank_linear_cpu_loops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace recursive_kernels {
namespace cpu {
namespace {

using namespace lowrank;  // the plan, the loop arguments and passes (lowrank_linear_cpu_loops.h)
using at::Tensor;

constexpr const char* kWhere = "lowrank_linear (cpu): ";  // opens every message (see checks.h)

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Path choice: the loop kernels save the per-op overhead of one ATen matmul per used adapter and product,
// BLAS is faster per multiply-add. So the loops run while the low-rank work (P slots * r * (K + N)
// multiply-adds) is at most this much per used adapter; measured crossovers on a 2-core AVX-512 machine
// (fp32 and bf16, r = 16, K = N = 1024, E = 1 or 8).
constexpr double kLoopMacsPerAdapterForward = 4.0e6;
constexpr double kLoopMacsPerAdapterBackward = 4.0e5;

// RECURSIVE_KERNELS_CPU_PATH=grouped|loops forces a path (for tests and benchmarks); read on every call.
int forced_path() {
  const char* env = std::getenv("RECURSIVE_KERNELS_CPU_PATH");
  if (env == nullptr || env[0] == '\0') return 0;
  const std::string v(env);
  return v == "grouped" ? 1 : v == "loops" ? 2 : 0;
}

Plan make_plan(int64_t M, int64_t E, int64_t r, int64_t K, int64_t N, const std::optional<Tensor>& indices,
               const std::optional<Tensor>& gates, double scaling, int64_t adapter, bool acc_is_input,
               double loop_macs_per_adapter) {
  Plan pl;
  pl.M = M;
  pl.E = E;
  pl.begin.assign(E, 0);
  pl.count.assign(E, 0);
  Tensor idx;
  const int64_t* ip = nullptr;
  if (indices.has_value()) {
    idx = indices->to(at::kLong).contiguous();
    ip = idx.data_ptr<int64_t>();
    pl.k = idx.size(1);
  }
  const int64_t S = M * pl.k;
  auto adapter_of = [&](int64_t s) { return ip ? ip[s] : adapter; };  // -1: none
  for (int64_t s = 0; s < S; ++s) {
    const int64_t e = adapter_of(s);
    TORCH_CHECK(e >= -1 && e < E, kWhere, "indices: value ", e, " is outside [-1, ", E, ")");
    if (e >= 0) ++pl.count[e];
  }
  for (int64_t e = 0; e < E; ++e) {
    pl.begin[e] = pl.P;
    pl.P += pl.count[e];
    if (pl.count[e] > 0) pl.used.push_back(e);
  }
  pl.Q = pl.P;

  pl.slot_of.assign(pl.Q, -1);
  pl.ad_of.assign(pl.Q, 0);
  pl.buf_of.assign(S, -1);
  pl.coef.assign(pl.Q, 0.0);
  std::vector<int64_t> fill(pl.begin);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t e = adapter_of(s);
    if (e < 0) continue;
    const int64_t q = fill[e]++;
    pl.slot_of[q] = s;
    pl.ad_of[q] = e;
    pl.buf_of[s] = q;
    pl.coef[q] = scaling;
  }
  pl.gated = gates.has_value();
  if (pl.gated) {
    const Tensor g = gates->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "lowrank_linear_cpu_gates", [&] {
      const scalar_t* gp = g.data_ptr<scalar_t>();
      for (int64_t q = 0; q < pl.Q; ++q) pl.coef[q] = scaling * static_cast<double>(gp[pl.slot_of[q]]);
    });
  }
  bool identity = pl.k == 1 && pl.P == M;
  for (int64_t q = 0; identity && q < pl.Q; ++q) identity = pl.slot_of[q] == q;
  // Path: one adapter on the identity assignment without an upcast goes straight to BLAS (no gather, no scatter:
  // nothing for the loops to save); otherwise the loop kernels up to loop_macs_per_adapter per used adapter (for
  // several adapters the identity assignment would cost two ATen products each: at decode sizes, more than
  // one pass of the loops over every row).
  const double work = static_cast<double>(pl.P) * static_cast<double>(r) * static_cast<double>(K + N);
  const bool one_blas_adapter = identity && acc_is_input && pl.used.size() == 1;
  pl.loops = !one_blas_adapter && work <= loop_macs_per_adapter * static_cast<double>(pl.used.size());
  if (forced_path() != 0) pl.loops = forced_path() == 2;
  pl.identity = identity && !pl.loops;
  return pl;
}

// out (Q, C) acc: row q = src[row of slot_of[q]]. src (rows, C) of dtype T, any strides.
template <typename T, typename A>
Tensor gather_rows(const Tensor& src_in, const Plan& pl) {
  const int64_t C = src_in.size(1);
  Tensor out = at::empty({pl.Q, C}, src_in.options().dtype(c10::CppTypeToScalarType<A>::value));
  if (pl.Q == 0 || C == 0) return out;
  const Tensor src = (C > 1 && src_in.stride(1) != 1) ? src_in.contiguous() : src_in;
  const T* base = src.data_ptr<T>();
  const int64_t s0 = src.stride(0);
  A* o = out.data_ptr<A>();
  at::parallel_for(0, pl.Q, grain_for(C), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      A* dst = o + q * C;
      const T* in = base + (pl.slot_of[q] / pl.k) * s0;
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<A>(in[c]);
    }
  });
  return out;
}

// The buffer rows the low-rank products read: src itself where no gather/upcast is needed, else gathered.
template <typename T, typename A>
Tensor rows_for(const Tensor& src, const Plan& pl) {
  if (pl.identity && std::is_same<T, A>::value) return src;
  return gather_rows<T, A>(src, pl);
}

// An (E, R, C) adapter stack in the accumulator dtype A, contiguous: src itself when it already is A (and
// force_copy is false), else the used adapters' slices converted, the unused ones left uninitialised and
// never read. force_copy: copy even if src is A already (to get a unit innermost stride).
template <typename T, typename A>
Tensor adapters_acc(const Tensor& src, const Plan& pl, bool force_copy = false) {
  if (std::is_same<T, A>::value && !force_copy) return src;
  const int64_t E = src.size(0), R = src.size(1), C = src.size(2);
  Tensor out = at::empty({E, R, C}, src.options().dtype(c10::CppTypeToScalarType<A>::value));
  const T* base = src.data_ptr<T>();
  const int64_t s0 = src.stride(0), s1 = src.stride(1), s2 = src.stride(2);
  A* o = out.data_ptr<A>();
  const int64_t rows = static_cast<int64_t>(pl.used.size()) * R;
  at::parallel_for(0, rows, grain_for(C), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const int64_t ad = pl.used[q / R], i = q % R;
      const T* in = base + ad * s0 + i * s1;
      A* dst = o + (ad * R + i) * C;
      if (s2 == 1) {
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<A>(in[c]);
      } else {
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<A>(in[c * s2]);
      }
    }
  });
  return out;
}

// (Q, C) contiguous A: row q = coef[q] * src_row(q)[0:C].
template <typename A, typename RowFn>
Tensor scaled_rows(int64_t Q, int64_t C, const at::TensorOptions& opt, const Plan& pl, RowFn src_row) {
  Tensor out = at::empty({Q, C}, opt);
  A* o = out.data_ptr<A>();
  at::parallel_for(0, Q, grain_for(C), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      A* dst = o + q * C;
      const A c = static_cast<A>(pl.coef[q]);
      const A* in = src_row(q);
      for (int64_t i = 0; i < C; ++i) dst[i] = c * in[i];
    }
  });
  return out;
}

// at::mm_out into a view (it wants an lvalue).
inline void mm_into(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }

// out (Q, Cout) = per used adapter e: in_e (e's buffer rows, Cin) @ stack[e] (Cin, Cout). Any strides.
void grouped_mm(Tensor& out, const Tensor& in, const Tensor& stack, const Plan& pl) {
  for (int64_t e : pl.used) {
    const int64_t o = pl.begin[e], n = pl.count[e];
    mm_into(out.narrow(0, o, n), in.narrow(0, o, n), stack.select(0, e));
  }
}

// (E, C1, C2) = per adapter e: in1_e.T @ in2_e (a sum over e's buffer rows); zero for unused adapters.
Tensor grouped_tn(const Tensor& in1, const Tensor& in2, const Plan& pl) {
  const int64_t C1 = in1.size(1), C2 = in2.size(1);
  const bool all_used = static_cast<int64_t>(pl.used.size()) == pl.E;
  Tensor dst = all_used ? at::empty({pl.E, C1, C2}, in1.options()) : at::zeros({pl.E, C1, C2}, in1.options());
  for (int64_t e : pl.used) {
    const int64_t o = pl.begin[e], n = pl.count[e];
    mm_into(dst.select(0, e), in1.narrow(0, o, n).t(), in2.narrow(0, o, n));
  }
  return dst;
}

// Row pointers (unit column stride, dtype A) of the buffer rows: straight into src where it already is
// A with unit column stride, else into `holder`, a gathered (Q, C) copy.
template <typename T, typename A>
std::vector<const A*> row_pointers(const Tensor& src, const Plan& pl, Tensor& holder) {
  std::vector<const A*> rows(pl.Q);
  const int64_t C = src.size(1);
  if (std::is_same<T, A>::value && (src.stride(1) == 1 || C <= 1)) {
    const A* base = reinterpret_cast<const A*>(src.data_ptr<T>());
    for (int64_t q = 0; q < pl.Q; ++q) rows[q] = base + (pl.slot_of[q] / pl.k) * src.stride(0);
  } else {
    holder = gather_rows<T, A>(src, pl);
    const A* base = holder.data_ptr<A>();
    for (int64_t q = 0; q < pl.Q; ++q) rows[q] = base + q * C;
  }
  return rows;
}

// An adapter stack as Stack<A> (unit innermost stride): src itself where possible, else converted.
template <typename T, typename A>
Stack<A> stack_for(const Tensor& src, const Plan& pl, Tensor& holder) {
  if (std::is_same<T, A>::value && (src.stride(2) == 1 || src.size(2) <= 1)) {
    return {reinterpret_cast<const A*>(src.data_ptr<T>()), src.stride(0), src.stride(1)};
  }
  holder = adapters_acc<T, A>(src, pl, /*force_copy=*/true);
  return {holder.data_ptr<A>(), holder.stride(0), holder.stride(1)};
}

// ---------------------------------------------------------------------------------------------------
// Argument checks (things that would otherwise crash or silently misbehave).

// x: a CPU tensor of a supported dtype; then the checks of checks.h, and a rank r >= 1 (the interface's; the
// loop kernels block over the rank).
LowrankLinearSizes check_inputs(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                const std::optional<Tensor>& lora_a, const std::optional<Tensor>& lora_b,
                                const std::optional<Tensor>& indices, const std::optional<Tensor>& gates,
                                int64_t adapter) {
  check_defined(x, kWhere, "x");
  TORCH_CHECK(x.device().is_cpu(), kWhere, "x: expected a CPU tensor, got one on ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, kWhere,
              "x: expected float32, float64, bfloat16 or float16, got ", dt);
  const LowrankLinearSizes d = check_lowrank_linear_args(kWhere, x, weight, bias, lora_a, lora_b, indices, gates,
                                                         adapter);
  TORCH_CHECK(!lora_a.has_value() || d.r >= 1, kWhere, "lora_a: expected a rank r >= 1, got shape ",
              lora_a->sizes());
  return d;
}

// ---------------------------------------------------------------------------------------------------
// The low-rank terms. Each product picks its implementation:
// * input-bound products with a long contraction (u = x A_e^T over K, v = grad_y B_e over N) and the
//   per-adapter reductions (dA, dB over an adapter's rows): the loop kernels when pl.loops, else one ATen
//   matmul per used adapter on gathered rows (or on x / grad_y themselves for the identity assignment);
// * output-bound products with the short contraction over r (the expand into y, the dx term): addmm_
//   straight into y / dx for the identity assignment without upcast, else the loop kernels, which add
//   into y / dx in place (rounding once) with no (P, N) / (P, K) buffer and no scatter pass.

// y[t] += sum_j (coef u)_q @ B_e^T (into y; factor lora_b) or dx[t] += sum_j (coef v)_q @ A_e (into dx; factor
// lora_a); w (Q, r) contiguous A: the coefficient rows. addmm_ straight into out for the identity assignment
// without upcast, else the loop kernels.
// alpha: a factor of every row of w, applied by addmm_ (the identity assignment only).
template <typename T>
void add_lowrank(AddInto into, Tensor& out, const Tensor& w, const Tensor& factor, const Plan& pl,
                 const LowrankLinearSizes& d, double alpha = 1.0) {
  using A = at::opmath_type<T>;
  if (pl.identity && std::is_same<T, A>::value) {
    for (int64_t e : pl.used) {
      const int64_t o = pl.begin[e], n = pl.count[e];
      const Tensor f = factor.select(0, e);
      out.narrow(0, o, n).addmm_(w.narrow(0, o, n), into == AddInto::y ? f.t() : f, 1.0, alpha);
    }
    return;
  }
  TORCH_INTERNAL_ASSERT(alpha == 1.0, "add_lowrank: alpha is for the identity assignment");
  Tensor holder;
  LoopArgs<A> a{&pl, d.K, d.N, d.r};
  (into == AddInto::y ? a.lb : a.la) = stack_for<T, A>(factor, pl, holder);
  a.w = w.data_ptr<A>();
  add_rows<T>(into, out.data_ptr<T>(), a);
}

// Forward: y (M, N) T holds x @ W.T + b; adds the low-rank terms and fills u ((M, k, r) zeros, or left
// undefined for the identity assignment, where it becomes a view of the buffer).
template <typename T>
void forward_lowrank(Tensor& y, Tensor& u, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b,
                     const Plan& pl, const LowrankLinearSizes& d) {
  using A = at::opmath_type<T>;
  const auto aopt = x.options().dtype(c10::CppTypeToScalarType<A>::value);

  // us[q] = x[row(q)] @ A_e.T
  Tensor us = at::empty({pl.Q, d.r}, aopt);
  if (pl.loops) {
    Tensor hx, ha;
    LoopArgs<A> a{&pl, d.K, d.N, d.r};
    const std::vector<const A*> xr = row_pointers<T, A>(x, pl, hx);
    a.xrow = xr.data();
    a.la = stack_for<T, A>(lora_a, pl, ha);
    a.out = us.data_ptr<A>();
    u_rows(a);
  } else {
    grouped_mm(us, rows_for<T, A>(x, pl), adapters_acc<T, A>(lora_a, pl).transpose(1, 2), pl);
  }
  const A* usp = us.data_ptr<A>();
  if (pl.identity) {
    u = us.view({d.M, 1, d.r});
  } else {
    A* up = u.data_ptr<A>();
    for (int64_t q = 0; q < pl.Q; ++q) std::memcpy(up + pl.slot_of[q] * d.r, usp + q * d.r, sizeof(A) * d.r);
  }

  // y[row(q)] += (coef[q] * us[q]) @ B_e.T; without gates on the addmm_ path, coef is addmm_'s alpha
  if (!pl.gated && pl.identity && std::is_same<T, A>::value) {
    add_lowrank<T>(AddInto::y, y, us, lora_b, pl, d, pl.coef[0]);
    return;
  }
  const Tensor ug = scaled_rows<A>(pl.Q, d.r, aopt, pl, [&](int64_t q) { return usp + q * d.r; });
  add_lowrank<T>(AddInto::y, y, ug, lora_b, pl, d);
}

// Backward: adds the low-rank term to *dx (which holds grad_y @ W), sets *da, *db (accumulator dtype, every
// adapter; unused ones zero), fills *dg (zeros (M, k), accumulator dtype). A null pointer: not needed.
template <typename T>
void backward_lowrank(Tensor* dx, Tensor* da, Tensor* db, Tensor* dg, const Tensor& grad_y, const Tensor& x,
                      const Tensor& lora_a, const Tensor& lora_b, const Tensor& u, const Plan& pl,
                      const LowrankLinearSizes& d, double scaling) {
  using A = at::opmath_type<T>;
  const auto aopt = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  const A* up = u.data_ptr<A>();  // (M, k, r) contiguous

  // The grad_y rows: pointers for the loops, a (Q, N) matrix (or grad_y itself) for the matmuls.
  Tensor hg, gs;
  std::vector<const A*> gr;
  if (pl.loops) {
    gr = row_pointers<T, A>(grad_y, pl, hg);
  } else {
    gs = rows_for<T, A>(grad_y, pl);
  }
  LoopArgs<A> a{&pl, d.K, d.N, d.r};
  a.grow = gr.data();

  Tensor vs;  // (Q, r): v = grad_y[row] @ B_e
  if (dx || da || dg) {
    vs = at::empty({pl.Q, d.r}, aopt);
    if (pl.loops) {
      Tensor hb;
      a.lb = stack_for<T, A>(lora_b, pl, hb);
      a.out = vs.data_ptr<A>();
      v_rows(a);
    } else {
      grouped_mm(vs, gs, adapters_acc<T, A>(lora_b, pl), pl);
    }
  }
  if (dg) {  // dgates[slot] = s * dot(u[slot], v)
    A* gp = dg->data_ptr<A>();
    const A* vp = vs.data_ptr<A>();
    const A sc = static_cast<A>(scaling);
    at::parallel_for(0, pl.Q, grain_for(d.r), [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        const int64_t s = pl.slot_of[q];
        const A* ur = up + s * d.r;
        const A* vr = vp + q * d.r;
        A acc = 0;
        for (int64_t i = 0; i < d.r; ++i) acc += ur[i] * vr[i];
        gp[s] = sc * acc;
      }
    });
  }
  if (dx || da) {
    const A* vp = vs.data_ptr<A>();
    const Tensor vg = scaled_rows<A>(pl.Q, d.r, aopt, pl, [&](int64_t q) { return vp + q * d.r; });  // coef v
    if (dx) add_lowrank<T>(AddInto::dx, *dx, vg, lora_a, pl, d);  // dx[row] += (coef v) @ A_e
    if (da) {  // dA[e] = (coef v)_e.T @ x_e
      if (pl.loops) {
        Tensor hx;
        const std::vector<const A*> xr = row_pointers<T, A>(x, pl, hx);
        a.xrow = xr.data();
        a.w = vg.data_ptr<A>();
        *da = at::empty({d.E, d.r, d.K}, aopt);
        a.out = da->data_ptr<A>();
        da_sums(a);
      } else {
        *da = grouped_tn(vg, rows_for<T, A>(x, pl), pl);
      }
    }
  }
  if (db) {  // dB[e] = grad_y_e.T @ (coef u)_e
    const Tensor ucg = scaled_rows<A>(pl.Q, d.r, aopt, pl, [&](int64_t q) { return up + pl.slot_of[q] * d.r; });
    if (pl.loops) {
      a.w = ucg.data_ptr<A>();
      *db = at::empty({d.E, d.N, d.r}, aopt);
      a.out = db->data_ptr<A>();
      db_sums(a);
    } else {
      *db = grouped_tn(gs, ucg, pl);
    }
  }
}

}  // namespace

std::tuple<Tensor, Tensor> lowrank_linear_forward(const Tensor& x, const Tensor& weight,
                                                  const std::optional<Tensor>& bias,
                                                  const std::optional<Tensor>& lora_a,
                                                  const std::optional<Tensor>& lora_b,
                                                  const std::optional<Tensor>& indices,
                                                  const std::optional<Tensor>& gates, double scaling,
                                                  int64_t adapter) {
  const LowrankLinearSizes d = check_inputs(x, weight, bias, lora_a, lora_b, indices, gates, adapter);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // a kernel: it records no autograd graph itself
  const auto aopt = x.options().dtype(acc_dtype(x.scalar_type()));
  Tensor y = at::linear(x, weight, bias).contiguous();
  if (!lora_a.has_value()) return {y, at::empty({0}, aopt)};

  const bool acc_is_input = aopt.dtype() == x.dtype();
  const Plan pl = make_plan(d.M, d.E, d.r, d.K, d.N, indices, gates, scaling, adapter, acc_is_input,
                            kLoopMacsPerAdapterForward);
  Tensor u;
  if (!pl.identity || pl.P == 0) u = at::zeros({d.M, pl.k, d.r}, aopt);
  if (pl.P == 0) return {y, u};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lowrank_linear_forward_cpu", [&] {
    forward_lowrank<scalar_t>(y, u, x, *lora_a, *lora_b, pl, d);
  });
  return {y, u};
}

std::vector<Tensor> lowrank_linear_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                            const std::optional<Tensor>& lora_a,
                                            const std::optional<Tensor>& lora_b,
                                            const std::optional<Tensor>& indices,
                                            const std::optional<Tensor>& gates, double scaling, int64_t adapter,
                                            const Tensor& u, const std::vector<bool>& needs) {
  const LowrankLinearSizes d = check_inputs(x, weight, std::nullopt, lora_a, lora_b, indices, gates, adapter);
  check_lowrank_linear_grad_y(kWhere, grad_y, x, d, needs.size());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = acc_dtype(x.scalar_type());
  const auto aopt = x.options().dtype(acc);
  const bool lora = lora_a.has_value();
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2];
  const bool need_a = needs[3] && lora, need_bb = needs[4] && lora, need_g = needs[5] && gates.has_value();

  std::vector<Tensor> out(6);
  if (need_w) out[1] = at::mm(grad_y.t(), x).contiguous();
  if (need_b) {  // fp32 inputs: summed in fp64 (it is cheap); bf16/fp16 are summed in fp32 by ATen
    out[2] = x.scalar_type() == at::kFloat ? grad_y.sum(0, /*keepdim=*/false, at::kDouble).to(at::kFloat)
                                           : grad_y.sum(0);
  }
  if (need_x) out[0] = at::mm(grad_y, weight).contiguous();

  if (lora && (need_x || need_a || need_bb || need_g)) {
    check_lowrank_linear_u(kWhere, u, x, d);
    const Tensor uc = u.to(acc).contiguous();
    const Plan pl = make_plan(d.M, d.E, d.r, d.K, d.N, indices, gates, scaling, adapter,
                              acc == x.scalar_type(), kLoopMacsPerAdapterBackward);
    Tensor da, db, dg;
    if (need_g) dg = at::zeros({d.M, d.k}, aopt);
    if (pl.P > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lowrank_linear_backward_cpu", [&] {
        backward_lowrank<scalar_t>(need_x ? &out[0] : nullptr, need_a ? &da : nullptr, need_bb ? &db : nullptr,
                                   need_g ? &dg : nullptr, grad_y, x, *lora_a, *lora_b, uc, pl, d, scaling);
      });
    } else {
      if (need_a) da = at::zeros(lora_a->sizes(), aopt);
      if (need_bb) db = at::zeros(lora_b->sizes(), aopt);
    }
    if (need_a) out[3] = da.to(lora_a->scalar_type()).contiguous();
    if (need_bb) out[4] = db.to(lora_b->scalar_type()).contiguous();
    if (need_g) out[5] = dg.to(gates->scalar_type()).contiguous();
  }
  for (auto& t : out)  // a distinct empty tensor each: outputs of a custom op must not alias one another
    if (!t.defined()) t = at::empty({0}, x.options());
  return out;
}

}  // namespace cpu
}  // namespace recursive_kernels
