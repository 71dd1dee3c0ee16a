// CUDA kernels of `circuit_attention` (see circuit_attention_kernels.h): FlashAttention-2 on CUDA cores.
//
// Plain CUDA C++ (no torch headers), templated on the element type (float, __half, __nv_bfloat16). One set
// of kernels serves the dense and the packed layouts: a block finds its sequence's first rows and lengths
// (from cu_seqlens, or 0 and Sq / Sk) and then only uses element strides.
//
// Tiling. A block of kWarps warps owns kTileRows "rows" (queries; keys in the dk/dv kernel), kRowsPerWarp
// per warp, and walks over tiles of 32 "columns" (keys; queries in the dk/dv kernel), one per lane:
//   * dot products (scores q.k and q_c.k_c, dP = dO.v + dOc.v_c): both sides are staged in shared memory
//     in chunks of kChunk contraction columns (converted to fp32) and each lane accumulates its column's
//     dot with the warp's rows in registers, so any D, R, Rv works with fixed shared memory;
//   * products (P @ [v | v_c], dS @ [k | k_c], [dS | P]^T @ [q | q_c | dO | dOc]): the lane side's operand
//     rows are staged once per tile and every lane accumulates 32-column slices of the output rows in
//     registers. A block covers at most kGroupCols output columns; wider outputs (D + Rv > 256 forward,
//     D + R > 256 for dq, 2 D + R + Rv > 256 for dk/dv) are split over "column groups", each block of a
//     group recomputing the scores of its tiles.
// Kernels:
//   forward_kernel  grid (query tiles x B x H x column groups of [out | out_c]): online softmax over the key
//                   tiles a query tile sees (causal: keys past the tile's last visible key are skipped),
//                   statistics in the stat dtype; writes out, out_c and (column group 0) lse.
//   delta_kernel    one warp per query row: Delta = rowsum(dO * out) + rowsum(dOc * out_c) (stat dtype).
//   dq_kernel       grid (query tiles x B x H x column groups of [dq | dq_c]): recomputes P = exp(S - lse)
//                   and dS = P (dP - Delta) per key tile; dq = scale dS k, dq_c = dS k_c.
//   dkdv_kernel     grid (key tiles x B x Hkv x column groups of [dk | dk_c | dv | dv_c]): a block owns a
//                   key tile of one kv head and loops over the H / Hkv query heads of its group and the query
//                   tiles that see the key tile (causal: from the first query that sees its first key), so
//                   the group sum stays in registers: no atomics, every gradient row written once.
// Precision: scores and products accumulate in fp32. The statistics (max, sum, exp, lse, P, dS, Delta) are
// double for float32 inputs (P and dS rounded to float for the products) and float, with accurate expf /
// logf, for 16-bit inputs. dP accumulates in the statistics' type too: dS = P (dP - Delta) cancels to
// nothing where a row's P is one-hot (a single visible key), where an fp32 dP would leave its rounding
// error while the eager reference cancels exactly. Results are rounded once to the input dtype. No
// fast-math intrinsics.
//
// Nothing here needs --use_fast_math, relaxed constexpr or half operators: conversions go through the
// cuda_fp16.h / cuda_bf16.h intrinsics, so torch's -D__CUDA_NO_HALF_OPERATORS__ etc. are fine.
//
// One file, longer than the others: the four kernels share the tile machinery defined first (sequences, block
// and query-tile decoding, staging, dot products, products), and the file reads top-down from it.

#include "circuit_attention_kernels.h"
#include "element_conversions.cuh"

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

namespace recursive_kernels {
namespace cuda_backend {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kRowsPerWarp = 4;
constexpr int kTileRows = kWarps * kRowsPerWarp;  // rows a block owns
constexpr int kTileCols = kWarpSize;              // columns per tile, one per lane
constexpr int kChunk = 32;                        // contraction columns staged per step
constexpr int kGroupSlices = 8;                  // 32-column output slices a lane accumulates
constexpr int kGroupCols = kGroupSlices * kWarpSize;
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1

static_assert(kTileCols == kWarpSize, "one tile column per lane");


// ---- softmax statistics: double for float32 inputs, float for 16-bit inputs ----

template <typename T>
struct StatOf {
  using type = float;
};
template <>
struct StatOf<float> {
  using type = double;
};
template <typename T>
using Stat = typename StatOf<T>::type;

__device__ __forceinline__ double stat_exp(double x) { return exp(x); }
__device__ __forceinline__ float stat_exp(float x) { return expf(x); }
__device__ __forceinline__ double stat_log(double x) { return log(x); }
__device__ __forceinline__ float stat_log(float x) { return logf(x); }
__device__ __forceinline__ double stat_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float stat_max(float a, float b) { return fmaxf(a, b); }

template <typename S>
__device__ __forceinline__ S minus_infinity();
template <>
__device__ __forceinline__ double minus_infinity<double>() { return -CUDART_INF; }
template <>
__device__ __forceinline__ float minus_infinity<float>() { return -CUDART_INF_F; }

// A statistic rounded once to the element type.
__device__ __forceinline__ float round_stat(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float round_stat(float v) { return v; }
template <typename T, typename S>
__device__ __forceinline__ T stat_to(S v) {
  return from_float<T>(round_stat(v));
}

// Butterfly reductions over the 32 lanes: every lane must call them, every lane gets the result.
template <typename S>
__device__ __forceinline__ S warp_max(S v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = stat_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename S>
__device__ __forceinline__ S warp_sum(S v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The logit from its two dot products, with one explicit rounding so that the forward and both backward
// kernels recompute bitwise the same S (the backward's P = exp(S - lse) must match the forward's lse).
__device__ __forceinline__ float logit(float scale, float dot_qk, float dot_c) {
  return __fmaf_rn(scale, dot_qk, dot_c);
}

__device__ __forceinline__ float fused_multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fused_multiply_add(double a, double b, double c) { return fma(a, b, c); }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- operands, sequences, visibility ----

// The rows of one (batch, head) sequence: element (i, c) at base[i * stride + c], c < width.
template <typename P>
struct Rows {
  P* base;
  int64_t stride;
  int64_t width;
};

template <typename P>
__device__ __forceinline__ Rows<P> sequence_rows(const AttentionOperand& op, int64_t b, int64_t h, int64_t first_row,
                                                 int64_t width) {
  Rows<P> rows;
  const bool present = op.data != nullptr && width > 0;
  rows.base = present ? static_cast<P*>(op.data) + b * op.batch_stride + h * op.head_stride + first_row * op.row_stride
                      : nullptr;
  rows.stride = op.row_stride;
  rows.width = present ? width : 0;
  return rows;
}

struct Sequence {
  int64_t q_first, q_len;  // first row in q (packed) and length
  int64_t k_first, k_len;
};

__device__ __forceinline__ Sequence sequence_of(const CircuitAttentionShape& shape, int64_t b) {
  Sequence seq;
  if (shape.cu_seqlens_q != nullptr) {
    seq.q_first = shape.cu_seqlens_q[b];
    seq.q_len = shape.cu_seqlens_q[b + 1] - seq.q_first;
    seq.k_first = shape.cu_seqlens_k[b];
    seq.k_len = shape.cu_seqlens_k[b + 1] - seq.k_first;
  } else {
    seq.q_first = 0;
    seq.q_len = shape.seqlen_q;
    seq.k_first = 0;
    seq.k_len = shape.seqlen_k;
  }
  return seq;
}

// Whether query i sees key j (both counted within the sequence, >= 0).
__device__ __forceinline__ bool sees(const CircuitAttentionShape& shape, const Sequence& seq, int64_t i, int64_t j) {
  return i < seq.q_len && j < seq.k_len && (!shape.causal || j <= i + (seq.k_len - seq.q_len));
}

// One past the last key that the queries before `query_end` see.
__device__ __forceinline__ int64_t visible_key_end(const CircuitAttentionShape& shape, const Sequence& seq,
                                                   int64_t query_end) {
  if (!shape.causal) return seq.k_len;
  return max64(0, min64(seq.k_len, query_end + (seq.k_len - seq.q_len)));
}

// The first query that sees key j.
__device__ __forceinline__ int64_t first_query_seeing(const CircuitAttentionShape& shape, const Sequence& seq,
                                                      int64_t j) {
  return shape.causal ? max64(0, j - (seq.k_len - seq.q_len)) : 0;
}

// Output columns [col0, col0 + kGroupCols) of a `width`-wide concatenation that column group `group` owns.
struct ColumnGroup {
  int64_t col0;
  int cols;    // <= kGroupCols
  int slices;  // 32-column slices holding them
};

__device__ __forceinline__ ColumnGroup column_group(int64_t group, int64_t width) {
  ColumnGroup g;
  g.col0 = group * kGroupCols;
  g.cols = static_cast<int>(max64(0, min64(kGroupCols, width - g.col0)));
  g.slices = (g.cols + kWarpSize - 1) / kWarpSize;
  return g;
}

// ---- shared-memory stages ----

struct SharedTiles {
  float row_chunk[kTileRows][kChunk];      // the block's rows, one contraction chunk (read as broadcasts)
  float col_chunk[kTileCols][kChunk + 1];  // the tile's columns, one row per lane (+1: no bank conflicts)
  float operand[kTileCols][kGroupCols];    // the tile's operand rows of the products, this group's columns
  float coef[2][kTileRows][kTileCols];     // P and / or dS of every (row, column) pair of the tile
};

// tile[r * pitch + c] = rows[row0 + r][col0 + c] for r < rows_valid, c < width; 0 elsewhere in the
// (tile_rows x kChunk) tile.
template <typename T>
__device__ __forceinline__ void stage_chunk(float* tile, int pitch, int tile_rows, const Rows<const T>& rows,
                                            int64_t row0, int64_t rows_valid, int64_t col0, int width) {
  for (int idx = threadIdx.x; idx < tile_rows * kChunk; idx += kThreads) {
    const int r = idx / kChunk;
    const int c = idx % kChunk;
    tile[r * pitch + c] = (r < rows_valid && c < width) ? to_float(rows.base[(row0 + r) * rows.stride + col0 + c])
                                                        : 0.0f;
  }
}

// acc[r] += sum_c row_side[row0 + warp row r][c] * col_side[col0 + lane][c] over the common width, in the
// accumulator type A (float, or double: the products of floats are exact in double). Every thread of the
// block must call it (it synchronises the block).
template <typename T, typename A>
__device__ void accumulate_dots(A (&acc)[kRowsPerWarp], SharedTiles& sm, const Rows<const T>& row_side,
                                int64_t row0, int64_t rows_valid, const Rows<const T>& col_side, int64_t col0,
                                int64_t cols_valid) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  for (int64_t c0 = 0; c0 < row_side.width; c0 += kChunk) {
    const int width = static_cast<int>(min64(kChunk, row_side.width - c0));
    __syncthreads();  // the previous chunk is consumed
    stage_chunk(&sm.row_chunk[0][0], kChunk, kTileRows, row_side, row0, rows_valid, c0, width);
    stage_chunk(&sm.col_chunk[0][0], kChunk + 1, kTileCols, col_side, col0, cols_valid, c0, width);
    __syncthreads();
    const float* mine = sm.col_chunk[lane];
#pragma unroll 4
    for (int c = 0; c < width; ++c) {
      const float x = mine[c];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        acc[r] = fused_multiply_add(A(sm.row_chunk[warp * kRowsPerWarp + r][c]), A(x), acc[r]);
      }
    }
  }
}

// sm.operand[r][c] = column col0 + c of the concatenation of `parts` in row row0 + r, for r < rows_valid and
// c < cols; 0 elsewhere in those columns (the products then need no masks).
template <typename T, int N>
__device__ __forceinline__ void stage_operand(SharedTiles& sm, const Rows<const T> (&parts)[N], int64_t row0,
                                              int64_t rows_valid, int64_t col0, int cols) {
  for (int idx = threadIdx.x; idx < kTileCols * cols; idx += kThreads) {
    const int r = idx / cols;
    const int c = idx % cols;
    float value = 0.0f;
    if (r < rows_valid) {
      int64_t col = col0 + c;
#pragma unroll
      for (int p = 0; p < N; ++p) {
        if (col >= 0 && col < parts[p].width) value = to_float(parts[p].base[(row0 + r) * parts[p].stride + col]);
        col -= parts[p].width;
      }
    }
    sm.operand[r][c] = value;
  }
}

// Column `col` of the concatenation of `parts`, row `row`, = value.
template <typename T, int N>
__device__ __forceinline__ void store_column(const Rows<T> (&parts)[N], int64_t row, int64_t col, T value) {
#pragma unroll
  for (int p = 0; p < N; ++p) {
    if (col >= 0 && col < parts[p].width) parts[p].base[row * parts[p].stride + col] = value;
    col -= parts[p].width;
  }
}

// acc[r][s] += sum_{t < cols_valid} coef[warp row r][t] * sm.operand[t][32 s + lane] (one coefficient tile).
__device__ __forceinline__ void accumulate_products(float (&acc)[kRowsPerWarp][kGroupSlices], const SharedTiles& sm,
                                                    const float (&coef)[kTileRows][kTileCols], int64_t cols_valid,
                                                    int slices) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  for (int t = 0; t < cols_valid; ++t) {
    float w[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) w[r] = coef[warp * kRowsPerWarp + r][t];
#pragma unroll
    for (int s = 0; s < kGroupSlices; ++s) {
      if (s < slices) {
        const float x = sm.operand[t][s * kWarpSize + lane];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[r][s] = fmaf(w[r], x, acc[r][s]);
      }
    }
  }
}

// Decodes blockIdx.x = ((outer * tiles) + tile) * groups + group (the group varies fastest, then the tile,
// so that the blocks sharing a head's keys and values run together).
struct BlockIndex {
  int64_t group, tile, outer;
};

__device__ __forceinline__ BlockIndex block_index(int64_t tiles, int64_t groups) {
  int64_t id = blockIdx.x;
  BlockIndex index;
  index.group = id % groups;
  id /= groups;
  index.tile = id % tiles;
  index.outer = id / tiles;
  return index;
}

// The query tile a block of forward_kernel or dq_kernel owns: the tile of kTileRows query rows from i0 of query
// head h (kv head hk) in sequence b, the rows of it inside the sequence and the keys [0, key_end) some row of it
// sees. Tiles are numbered from the last: under a causal mask later query tiles see more keys, and starting
// them first shortens the tail of the grid. rows_valid and key_end mean something only when i0 < seq.q_len.
struct QueryTile {
  BlockIndex index;
  int64_t i0, b, h, hk;
  Sequence seq;
  int64_t rows_valid, key_end;
};

__device__ __forceinline__ QueryTile query_tile(const CircuitAttentionShape& shape, int64_t tiles, int64_t groups) {
  QueryTile t;
  t.index = block_index(tiles, groups);
  t.i0 = (tiles - 1 - t.index.tile) * kTileRows;
  t.b = t.index.outer / shape.heads;
  t.h = t.index.outer % shape.heads;
  t.hk = t.h / (shape.heads / shape.kv_heads);
  t.seq = sequence_of(shape, t.b);
  t.rows_valid = min64(kTileRows, t.seq.q_len - t.i0);
  t.key_end = visible_key_end(shape, t.seq, t.i0 + t.rows_valid);
  return t;
}

// ---- forward ----

template <typename T>
__global__ void __launch_bounds__(kThreads)
forward_kernel(CircuitAttentionShape shape, CircuitAttentionTensors ts, int64_t tiles, int64_t groups) {
  using S = Stat<T>;
  __shared__ SharedTiles sm;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const auto [index, i0, b, h, hk, seq, rows_valid, key_end] = query_tile(shape, tiles, groups);
  if (i0 >= seq.q_len) return;  // uniform over the block
  const int64_t D = shape.head_dim, R = shape.rank_qk, Rv = shape.rank_v;

  const Rows<const T> q = sequence_rows<const T>(ts.q, b, h, seq.q_first, D);
  const Rows<const T> q_c = sequence_rows<const T>(ts.q_c, b, h, seq.q_first, R);
  const Rows<const T> k = sequence_rows<const T>(ts.k, b, hk, seq.k_first, D);
  const Rows<const T> k_c = sequence_rows<const T>(ts.k_c, b, hk, seq.k_first, R);
  const Rows<const T> values[2] = {sequence_rows<const T>(ts.v, b, hk, seq.k_first, D),
                                   sequence_rows<const T>(ts.v_c, b, hk, seq.k_first, Rv)};
  const ColumnGroup group = column_group(index.group, D + Rv);

  S row_max[kRowsPerWarp], row_sum[kRowsPerWarp];
  float acc[kRowsPerWarp][kGroupSlices];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    row_max[r] = minus_infinity<S>();
    row_sum[r] = S(0);
#pragma unroll
    for (int s = 0; s < kGroupSlices; ++s) acc[r][s] = 0.0f;
  }

  for (int64_t n0 = 0; n0 < key_end; n0 += kTileCols) {
    const int64_t keys_valid = min64(kTileCols, key_end - n0);
    float dot_qk[kRowsPerWarp] = {}, dot_c[kRowsPerWarp] = {};
    accumulate_dots(dot_qk, sm, q, i0, rows_valid, k, n0, keys_valid);
    accumulate_dots(dot_c, sm, q_c, i0, rows_valid, k_c, n0, keys_valid);
    __syncthreads();  // the previous tile's products are done with sm.coef and sm.operand

    // Online softmax; this lane holds key n0 + lane of every row of its warp.
    float rescale[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const bool visible = sees(shape, seq, i0 + warp * kRowsPerWarp + r, n0 + lane);
      const S score = visible ? S(logit(shape.scale, dot_qk[r], dot_c[r])) : minus_infinity<S>();
      const S new_max = stat_max(row_max[r], warp_max(score));
      S p = S(0), alpha = S(1);
      if (new_max != minus_infinity<S>()) {  // uniform over the warp; -inf - -inf would be NaN
        p = visible ? stat_exp(score - new_max) : S(0);
        alpha = stat_exp(row_max[r] - new_max);
      }
      row_sum[r] = row_sum[r] * alpha + warp_sum(p);
      row_max[r] = new_max;
      sm.coef[0][warp * kRowsPerWarp + r][lane] = static_cast<float>(p);
      rescale[r] = static_cast<float>(alpha);
    }
    stage_operand(sm, values, n0, keys_valid, group.col0, group.slices * kWarpSize);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int s = 0; s < kGroupSlices; ++s) acc[r][s] *= rescale[r];
    }
    accumulate_products(acc, sm, sm.coef[0], keys_valid, group.slices);
  }

  const Rows<T> outs[2] = {sequence_rows<T>(ts.out, b, h, seq.q_first, D),
                           sequence_rows<T>(ts.out_c, b, h, seq.q_first, Rv)};
  const Rows<S> lse = sequence_rows<S>(ts.lse, b, h, seq.q_first, 1);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    if (i >= seq.q_len) continue;
    const bool sees_a_key = row_sum[r] > S(0);
#pragma unroll
    for (int s = 0; s < kGroupSlices; ++s) {
      const int c = s * kWarpSize + lane;
      if (s < group.slices && c < group.cols) {
        const S value = sees_a_key ? S(acc[r][s]) / row_sum[r] : S(0);
        store_column(outs, i, group.col0 + c, stat_to<T>(value));
      }
    }
    if (index.group == 0 && lane == 0) {
      lse.base[i * lse.stride] = sees_a_key ? row_max[r] + stat_log(row_sum[r]) : minus_infinity<S>();
    }
  }
}

// ---- backward ----

// One warp per query row: delta = rowsum(dO * out) + rowsum(dOc * out_c), products and sum in the stat dtype.
template <typename T>
__global__ void __launch_bounds__(kThreads)
delta_kernel(CircuitAttentionShape shape, CircuitAttentionTensors ts, CircuitAttentionGrads gs) {
  using S = Stat<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row_id = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t i = row_id % shape.seqlen_q;
  const int64_t bh = row_id / shape.seqlen_q;
  if (bh >= shape.batch * shape.heads) return;  // uniform over the warp; this kernel has no block barrier
  const int64_t b = bh / shape.heads;
  const int64_t h = bh % shape.heads;
  const Sequence seq = sequence_of(shape, b);
  if (i >= seq.q_len) return;
  const int64_t D = shape.head_dim, Rv = shape.rank_v;
  const Rows<const T> grad_outs[2] = {sequence_rows<const T>(gs.grad_out, b, h, seq.q_first, D),
                                      sequence_rows<const T>(gs.grad_out_c, b, h, seq.q_first, Rv)};
  const Rows<const T> outs[2] = {sequence_rows<const T>(ts.out, b, h, seq.q_first, D),
                                 sequence_rows<const T>(ts.out_c, b, h, seq.q_first, Rv)};
  S sum = S(0);
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    for (int64_t c = lane; c < outs[p].width; c += kWarpSize) {
      const float grad = to_float(grad_outs[p].base[i * grad_outs[p].stride + c]);
      sum += S(grad) * S(to_float(outs[p].base[i * outs[p].stride + c]));
    }
  }
  sum = warp_sum(sum);
  const Rows<S> delta = sequence_rows<S>(gs.delta, b, h, seq.q_first, 1);
  if (lane == 0) delta.base[i * delta.stride] = sum;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
dq_kernel(CircuitAttentionShape shape, CircuitAttentionTensors ts, CircuitAttentionGrads gs, int64_t tiles,
          int64_t groups) {
  using S = Stat<T>;
  __shared__ SharedTiles sm;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const auto [index, i0, b, h, hk, seq, rows_valid, key_end] = query_tile(shape, tiles, groups);
  if (i0 >= seq.q_len) return;  // uniform over the block
  const int64_t D = shape.head_dim, R = shape.rank_qk, Rv = shape.rank_v;

  const Rows<const T> q = sequence_rows<const T>(ts.q, b, h, seq.q_first, D);
  const Rows<const T> q_c = sequence_rows<const T>(ts.q_c, b, h, seq.q_first, R);
  const Rows<const T> grad_out = sequence_rows<const T>(gs.grad_out, b, h, seq.q_first, D);
  const Rows<const T> grad_out_c = sequence_rows<const T>(gs.grad_out_c, b, h, seq.q_first, Rv);
  const Rows<const T> keys[2] = {sequence_rows<const T>(ts.k, b, hk, seq.k_first, D),
                                 sequence_rows<const T>(ts.k_c, b, hk, seq.k_first, R)};
  const Rows<const T> v = sequence_rows<const T>(ts.v, b, hk, seq.k_first, D);
  const Rows<const T> v_c = sequence_rows<const T>(ts.v_c, b, hk, seq.k_first, Rv);
  const Rows<const S> lse = sequence_rows<const S>(ts.lse, b, h, seq.q_first, 1);
  const Rows<const S> delta = sequence_rows<const S>(gs.delta, b, h, seq.q_first, 1);
  const ColumnGroup group = column_group(index.group, D + R);

  S row_lse[kRowsPerWarp], row_delta[kRowsPerWarp];
  float acc[kRowsPerWarp][kGroupSlices];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    row_lse[r] = i < seq.q_len ? lse.base[i * lse.stride] : S(0);
    row_delta[r] = i < seq.q_len ? delta.base[i * delta.stride] : S(0);
#pragma unroll
    for (int s = 0; s < kGroupSlices; ++s) acc[r][s] = 0.0f;
  }

  for (int64_t n0 = 0; n0 < key_end; n0 += kTileCols) {
    const int64_t keys_valid = min64(kTileCols, key_end - n0);
    float dot_qk[kRowsPerWarp] = {}, dot_c[kRowsPerWarp] = {};
    S dot_dp[kRowsPerWarp] = {};
    accumulate_dots(dot_qk, sm, q, i0, rows_valid, keys[0], n0, keys_valid);
    accumulate_dots(dot_c, sm, q_c, i0, rows_valid, keys[1], n0, keys_valid);
    accumulate_dots(dot_dp, sm, grad_out, i0, rows_valid, v, n0, keys_valid);
    accumulate_dots(dot_dp, sm, grad_out_c, i0, rows_valid, v_c, n0, keys_valid);
    __syncthreads();  // the previous tile's products are done with sm.coef and sm.operand
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      // A visible pair belongs to a row that sees a key, so its lse is finite.
      const bool visible = sees(shape, seq, i0 + warp * kRowsPerWarp + r, n0 + lane);
      const S p = visible ? stat_exp(S(logit(shape.scale, dot_qk[r], dot_c[r])) - row_lse[r]) : S(0);
      sm.coef[0][warp * kRowsPerWarp + r][lane] = static_cast<float>(p * (dot_dp[r] - row_delta[r]));
    }
    stage_operand(sm, keys, n0, keys_valid, group.col0, group.slices * kWarpSize);
    __syncthreads();
    accumulate_products(acc, sm, sm.coef[0], keys_valid, group.slices);
  }

  const Rows<T> grads[2] = {sequence_rows<T>(gs.dq, b, h, seq.q_first, D),
                            sequence_rows<T>(gs.dq_c, b, h, seq.q_first, R)};
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    if (i >= seq.q_len) continue;
#pragma unroll
    for (int s = 0; s < kGroupSlices; ++s) {
      const int64_t col = group.col0 + s * kWarpSize + lane;
      if (s < group.slices && col < group.col0 + group.cols) {
        const S factor = col < D ? S(shape.scale) : S(1);  // dq = scale dS k, dq_c = dS k_c
        store_column(grads, i, col, stat_to<T>(factor * S(acc[r][s])));
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
dkdv_kernel(CircuitAttentionShape shape, CircuitAttentionTensors ts, CircuitAttentionGrads gs, int64_t tiles,
            int64_t groups) {
  using S = Stat<T>;
  __shared__ SharedTiles sm;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const BlockIndex index = block_index(tiles, groups);
  const int64_t j0 = index.tile * kTileRows;
  const int64_t b = index.outer / shape.kv_heads;
  const int64_t hk = index.outer % shape.kv_heads;
  const int64_t group_size = shape.heads / shape.kv_heads;
  const Sequence seq = sequence_of(shape, b);
  if (j0 >= seq.k_len) return;  // uniform over the block
  const int64_t keys_valid = min64(kTileRows, seq.k_len - j0);
  const int64_t query_begin = first_query_seeing(shape, seq, j0);
  const int64_t D = shape.head_dim, R = shape.rank_qk, Rv = shape.rank_v;

  const Rows<const T> k = sequence_rows<const T>(ts.k, b, hk, seq.k_first, D);
  const Rows<const T> k_c = sequence_rows<const T>(ts.k_c, b, hk, seq.k_first, R);
  const Rows<const T> v = sequence_rows<const T>(ts.v, b, hk, seq.k_first, D);
  const Rows<const T> v_c = sequence_rows<const T>(ts.v_c, b, hk, seq.k_first, Rv);
  const ColumnGroup group = column_group(index.group, 2 * D + R + Rv);

  // Columns of [dk | dk_c] take dS, columns of [dv | dv_c] take P.
  bool takes_p[kGroupSlices];
  float acc[kRowsPerWarp][kGroupSlices];
#pragma unroll
  for (int s = 0; s < kGroupSlices; ++s) {
    takes_p[s] = group.col0 + s * kWarpSize + lane >= D + R;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[r][s] = 0.0f;
  }

  for (int64_t h = hk * group_size; h < (hk + 1) * group_size; ++h) {
    const Rows<const T> q = sequence_rows<const T>(ts.q, b, h, seq.q_first, D);
    const Rows<const T> q_c = sequence_rows<const T>(ts.q_c, b, h, seq.q_first, R);
    const Rows<const T> grad_out = sequence_rows<const T>(gs.grad_out, b, h, seq.q_first, D);
    const Rows<const T> grad_out_c = sequence_rows<const T>(gs.grad_out_c, b, h, seq.q_first, Rv);
    const Rows<const T> operands[4] = {q, q_c, grad_out, grad_out_c};
    const Rows<const S> lse = sequence_rows<const S>(ts.lse, b, h, seq.q_first, 1);
    const Rows<const S> delta = sequence_rows<const S>(gs.delta, b, h, seq.q_first, 1);

    for (int64_t m0 = query_begin; m0 < seq.q_len; m0 += kTileCols) {
      const int64_t queries_valid = min64(kTileCols, seq.q_len - m0);
      float dot_qk[kRowsPerWarp] = {}, dot_c[kRowsPerWarp] = {};
      S dot_dp[kRowsPerWarp] = {};
      accumulate_dots(dot_qk, sm, k, j0, keys_valid, q, m0, queries_valid);
      accumulate_dots(dot_c, sm, k_c, j0, keys_valid, q_c, m0, queries_valid);
      accumulate_dots(dot_dp, sm, v, j0, keys_valid, grad_out, m0, queries_valid);
      accumulate_dots(dot_dp, sm, v_c, j0, keys_valid, grad_out_c, m0, queries_valid);
      __syncthreads();  // the previous tile's products are done with sm.coef and sm.operand

      // This lane holds query m0 + lane; a visible pair belongs to a query that sees a key (finite lse).
      const int64_t i = m0 + lane;
      const S query_lse = i < seq.q_len ? lse.base[i * lse.stride] : S(0);
      const S query_delta = i < seq.q_len ? delta.base[i * delta.stride] : S(0);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const bool visible = sees(shape, seq, i, j0 + warp * kRowsPerWarp + r);
        const S p = visible ? stat_exp(S(logit(shape.scale, dot_qk[r], dot_c[r])) - query_lse) : S(0);
        sm.coef[0][warp * kRowsPerWarp + r][lane] = static_cast<float>(p * (dot_dp[r] - query_delta));
        sm.coef[1][warp * kRowsPerWarp + r][lane] = static_cast<float>(p);
      }
      stage_operand(sm, operands, m0, queries_valid, group.col0, group.slices * kWarpSize);
      __syncthreads();

      for (int t = 0; t < queries_valid; ++t) {
        float ds[kRowsPerWarp], p[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          ds[r] = sm.coef[0][warp * kRowsPerWarp + r][t];
          p[r] = sm.coef[1][warp * kRowsPerWarp + r][t];
        }
#pragma unroll
        for (int s = 0; s < kGroupSlices; ++s) {
          if (s < group.slices) {
            const float x = sm.operand[t][s * kWarpSize + lane];
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) acc[r][s] = fmaf(takes_p[s] ? p[r] : ds[r], x, acc[r][s]);
          }
        }
      }
    }
  }

  const Rows<T> grads[4] = {sequence_rows<T>(gs.dk, b, hk, seq.k_first, D),
                            sequence_rows<T>(gs.dk_c, b, hk, seq.k_first, R),
                            sequence_rows<T>(gs.dv, b, hk, seq.k_first, D),
                            sequence_rows<T>(gs.dv_c, b, hk, seq.k_first, Rv)};
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t j = j0 + warp * kRowsPerWarp + r;
    if (j >= seq.k_len) continue;
#pragma unroll
    for (int s = 0; s < kGroupSlices; ++s) {
      const int64_t col = group.col0 + s * kWarpSize + lane;
      if (s < group.slices && col < group.col0 + group.cols) {
        const S factor = col < D ? S(shape.scale) : S(1);  // dk = scale dS^T q; the others are unscaled
        store_column(grads, j, col, stat_to<T>(factor * S(acc[r][s])));
      }
    }
  }
}

// ---- launchers ----

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Column groups of a `width`-wide result; at least one, so that the forward always writes lse.
int64_t column_groups(int64_t width) { return width > kGroupCols ? ceil_div(width, kGroupCols) : 1; }

bool valid_shape(const CircuitAttentionShape& shape) {
  if (shape.batch < 0 || shape.heads < 0 || shape.kv_heads < 1 || shape.heads % shape.kv_heads != 0) return false;
  if (shape.seqlen_q < 0 || shape.seqlen_k < 0) return false;
  if (shape.head_dim < 0 || shape.rank_qk < 0 || shape.rank_v < 0) return false;
  return (shape.cu_seqlens_q == nullptr) == (shape.cu_seqlens_k == nullptr);
}

// A 1-D grid of `blocks` blocks, or false when it does not fit.
bool grid_of(int64_t blocks, dim3* grid) {
  if (blocks > kMaxGridX) return false;
  *grid = dim3(static_cast<unsigned>(blocks));
  return true;
}

template <typename T>
cudaError_t launch_forward(const CircuitAttentionShape& shape, const CircuitAttentionTensors& ts, cudaStream_t stream) {
  const int64_t tiles = ceil_div(shape.seqlen_q, kTileRows);
  const int64_t groups = column_groups(shape.head_dim + shape.rank_v);
  const int64_t blocks = tiles * shape.batch * shape.heads * groups;
  if (blocks == 0) return cudaSuccess;
  dim3 grid;
  if (!grid_of(blocks, &grid)) return cudaErrorInvalidValue;
  forward_kernel<T><<<grid, kThreads, 0, stream>>>(shape, ts, tiles, groups);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const CircuitAttentionShape& shape, const CircuitAttentionTensors& ts,
                            const CircuitAttentionGrads& gs, cudaStream_t stream) {
  const int64_t query_tiles = ceil_div(shape.seqlen_q, kTileRows);
  const int64_t dq_groups = column_groups(shape.head_dim + shape.rank_qk);
  const int64_t dq_blocks = query_tiles * shape.batch * shape.heads * dq_groups;
  const int64_t key_tiles = ceil_div(shape.seqlen_k, kTileRows);
  const int64_t dkdv_groups = column_groups(2 * shape.head_dim + shape.rank_qk + shape.rank_v);
  const int64_t dkdv_blocks = key_tiles * shape.batch * shape.kv_heads * dkdv_groups;
  const int64_t delta_blocks = ceil_div(shape.batch * shape.heads * shape.seqlen_q, kWarps);
  dim3 dq_grid, dkdv_grid, delta_grid;
  if (!grid_of(dq_blocks, &dq_grid) || !grid_of(dkdv_blocks, &dkdv_grid) || !grid_of(delta_blocks, &delta_grid)) {
    return cudaErrorInvalidValue;
  }
  if (delta_blocks > 0) {
    delta_kernel<T><<<delta_grid, kThreads, 0, stream>>>(shape, ts, gs);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  if (dq_blocks > 0) {
    dq_kernel<T><<<dq_grid, kThreads, 0, stream>>>(shape, ts, gs, query_tiles, dq_groups);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  if (dkdv_blocks > 0) {
    dkdv_kernel<T><<<dkdv_grid, kThreads, 0, stream>>>(shape, ts, gs, key_tiles, dkdv_groups);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t circuit_attention_forward(ScalarKind kind, const CircuitAttentionShape& shape,
                                      const CircuitAttentionTensors& tensors, cudaStream_t stream) {
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  return with_element_type(kind, [&](auto element) {
    using T = typename decltype(element)::type;
    return launch_forward<T>(shape, tensors, stream);
  });
}

cudaError_t circuit_attention_backward(ScalarKind kind, const CircuitAttentionShape& shape,
                                       const CircuitAttentionTensors& tensors, const CircuitAttentionGrads& grads,
                                       cudaStream_t stream) {
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  return with_element_type(kind, [&](auto element) {
    using T = typename decltype(element)::type;
    return launch_backward<T>(shape, tensors, grads, stream);
  });
}

}  // namespace cuda_backend
}  // namespace recursive_kernels
