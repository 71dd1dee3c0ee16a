// lowrank_linear, CPU backend: what the host code (lowrank_linear_cpu.cpp) and the hand-written loop kernels
// (lowrank_linear_cpu_loops.cpp) share. The host sorts the (row, slot) assignments by adapter into a Plan, hands
// the loops their operands as row pointers and adapter stacks in the accumulator dtype A (float; double for double
// inputs), and calls one of the passes below; each pass runs its kernel over at::parallel_for.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace recursive_kernels {
namespace cpu {
namespace lowrank {

// Work per at::parallel_for chunk, in elements touched: about as much as a fork and join of the threads costs
// (a few microseconds), so that decode-sized passes run on the calling thread.
constexpr int64_t kGrainElems = 1 << 16;

inline int64_t grain_for(int64_t per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, per_item));
}

// The (row, slot) assignments sorted by adapter, and the work-buffer layout.
struct Plan {
  int64_t M = 0, k = 1, E = 0;
  int64_t P = 0;          // slots that have an adapter (index != -1)
  int64_t Q = 0;          // rows of the work buffers (== P)
  bool loops = false;     // hand-written loop kernels instead of ATen matmuls
  bool identity = false;  // ATen path, k == 1 and buffer row q is row q of x for every q (so Q == M)
  std::vector<int64_t> begin, count;  // E: adapter e's buffer rows are [begin[e], begin[e] + count[e])
  std::vector<int64_t> slot_of;       // Q: the slot id t * k + j of each buffer row
  std::vector<int64_t> ad_of;         // Q: the adapter of each buffer row
  std::vector<int64_t> buf_of;        // M * k: the buffer row of each slot, -1 for an empty slot
  std::vector<double> coef;           // Q: scaling * gate of each buffer row
  bool gated = false;                 // gates given (else every coef is the scaling)
  std::vector<int64_t> used;          // adapters with at least one slot, ascending
};

// An (E, R, C) adapter stack with unit innermost stride.
template <typename A>
struct Stack {
  const A* p = nullptr;
  int64_t s0 = 0, s1 = 0;
  const A* row(int64_t e, int64_t i) const { return p + e * s0 + i * s1; }
};

template <typename A>
struct LoopArgs {
  LoopArgs(const Plan* plan, int64_t K_, int64_t N_, int64_t r_) : pl(plan), K(K_), N(N_), r(r_) {}
  const Plan* pl;
  int64_t K, N, r;
  Stack<A> la;                       // (E, r, K)
  Stack<A> lb;                       // (E, N, r)
  const A* const* xrow = nullptr;    // Q: the x row of each buffer row (unit stride, length K)
  const A* const* grow = nullptr;    // Q: the grad_y row of each buffer row (length N)
  const A* w = nullptr;              // (Q, r): coef * u (forward) or coef * v (backward) or coef * u (dB)
  A* out = nullptr;                  // pass-specific output
  const int64_t* tiles = nullptr;    // u pass: (adapter, first, end) buffer rows of each tile (set by u_rows)
};

// The passes, instantiated for A = float and double. out is contiguous and fully written.

// out (Q, r): u[q] = A_e @ x_q for every buffer row q. Reads xrow, la.
template <typename A>
void u_rows(LoopArgs<A> a);

// out (Q, r): v[q] = grad_y_q @ B_e for every buffer row q. Reads grow, lb.
template <typename A>
void v_rows(const LoopArgs<A>& a);

// out (E, r, K): dA_e = sum over e's buffer rows q of w[q]^T x_q (w = coef v), zeros for an unused adapter.
template <typename A>
void da_sums(const LoopArgs<A>& a);

// out (E, N, r): dB_e = sum over e's buffer rows q of grad_y_q^T w[q] (w = coef u), zeros for an unused adapter.
template <typename A>
void db_sums(const LoopArgs<A>& a);

// The output-bound products, whose contraction is the short rank, added in place into the rows of y or dx.
enum class AddInto {
  y,   // y[t] += sum over the slots of row t of w[q] @ B_e^T (w = coef u; reads lb; N columns)
  dx,  // dx[t] += sum over the slots of row t of w[q] @ A_e (w = coef v; reads la; K columns)
};

// out (M, N or K) contiguous, of the input dtype T (float, double, bfloat16, float16): the sum over a row's
// slots is formed in A and rounded once; rows without a slot are left as they are.
template <typename T>
void add_rows(AddInto into, T* out, const LoopArgs<at::opmath_type<T>>& a);

}  // namespace lowrank
}  // namespace cpu
}  // namespace recursive_kernels
