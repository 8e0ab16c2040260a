// lookahead_qproj on CPU (docs/ops.md §1): q = RoPE(RMSNorm?(x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ)).
//
// T (the lookahead rows, ~32) is small and W is large, so every W row is read from memory once:
// the work items are query heads (D rows of W each). Two ways to get a head's q[o][t] in fp32:
// - T > kGemvMaxRows (lanes): x is converted to fp32 and transposed once (xt[h][t], the T rows in
//   the vector lanes, padded to kLaneQuantum, shared by all threads); the micro-kernel of
//   gemm_tile.h broadcasts W[o][h] against xt[h][:], accumulating q[o][t] for kTileRows rows of W
//   and all T rows of x at once (fp32 W is read in place, half-precision W is converted in chunks
//   just before use).
// - T <= kGemvMaxRows (GEMV, e.g. LAQ's one-row calls): the lanes would be mostly padding (16 lanes
//   for 1 row), so x stays in rows (fp32, [T][H]) and each W row is streamed once as dot products
//   with those rows, vectorised along h (dot_rows).
// The head's [D, T] block then gets bias, LoRA, RMSNorm and RoPE and is rounded once to x's dtype.
// A row's result depends on which way it was computed (the sums are ordered differently), not on
// the other rows of the call.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/gemm_tile.h"
#include "cpu/kernels.h"
#include "cpu/numeric.h"

namespace lookaheadkv::cpu::LOOKAHEADKV_ISA {
namespace {

constexpr int64_t kConvertChunk = 256;  // columns of half-precision W converted at a time
// Up to this many rows of x the GEMV path is used: the lanes kernel costs the same for any T <= 16
// (16 lanes), the GEMV path grows with T (docs/tuning.md).
constexpr int64_t kGemvMaxRows = 4;
constexpr int kDotLanes = 32;  // partial sums per (row of M, row of x) in dot_rows

// dst[r][0, ld) = src row r (fp32), zero padded; rows in [nrows, total_rows) are zero.
template <class Elem>
void load_padded(const Elem* src, int64_t row_stride, int64_t nrows, int64_t cols, float* dst, int64_t ld,
                 int64_t total_rows) {
  for (int64_t r = 0; r < total_rows; ++r) {
    float* out = dst + r * ld;
    int64_t c = 0;
    if (r < nrows) {
      const Elem* in = src + r * row_stride;
      for (; c < cols; ++c) out[c] = to_float(in[c]);
    }
    for (; c < ld; ++c) out[c] = 0.0f;
  }
}

// out[o*ldo + t] = Σ_k M[o][k]·x[t][k] for o < rows, t < NT: each row of M (any element type,
// converted as it is read) is streamed once against the NT fp32 rows of x (row stride ldx),
// vectorised along k into kDotLanes partial sums per (o, t) that are then added pairwise.
template <int NT, class MElem>
void dot_rows(int64_t rows, const MElem* m, int64_t m_row, int64_t K, const float* x, int64_t ldx, float* out,
              int64_t ldo) {
  for (int64_t o = 0; o < rows; ++o) {
    const MElem* mrow = m + o * m_row;
    float acc[NT][kDotLanes] = {};
    int64_t k0 = 0;
    const auto step = [&](int j) {
      const float mv = to_float(mrow[k0 + j]);
      for (int t = 0; t < NT; ++t) acc[t][j] += mv * x[t * ldx + k0 + j];
    };
    for (; k0 + kDotLanes <= K; k0 += kDotLanes) {
#pragma omp simd
      for (int j = 0; j < kDotLanes; ++j) step(j);
    }
    for (int j = 0; j < K - k0; ++j) step(j);
    for (int t = 0; t < NT; ++t) {
      for (int w = kDotLanes / 2; w > 0; w /= 2)
        for (int j = 0; j < w; ++j) acc[t][j] += acc[t][j + w];
      out[o * ldo + t] = acc[t][0];
    }
  }
}

// dot_rows for the T (1..kGemvMaxRows) rows of x of a GEMV call.
template <class MElem>
void gemv(int64_t rows, const MElem* m, int64_t m_row, int64_t K, const float* x, int64_t ldx, int64_t T, float* out,
          int64_t ldo) {
  static_assert(kGemvMaxRows == 4, "dispatch below covers 1..4 rows");
  switch (T) {
    case 1:
      dot_rows<1>(rows, m, m_row, K, x, ldx, out, ldo);
      break;
    case 2:
      dot_rows<2>(rows, m, m_row, K, x, ldx, out, ldo);
      break;
    case 3:
      dot_rows<3>(rows, m, m_row, K, x, ldx, out, ldo);
      break;
    case 4:
      dot_rows<4>(rows, m, m_row, K, x, ldx, out, ldo);
      break;
  }
}

// x in fp32 for the whole call: transposed, xt[h][t] with zero lanes t >= T (lanes path), or as
// rows [T][H] (GEMV path). Called inside the parallel region.
template <class Elem>
void load_x(const QProjArgs& a, bool use_gemv, int64_t Tp, float* xt) {
  if (use_gemv) {
#pragma omp single
    load_padded(static_cast<const Elem*>(a.x), a.x_row_stride, a.T, a.hidden, xt, a.hidden, a.T);
  } else {
#pragma omp for schedule(static)
    for (int64_t h = 0; h < a.hidden; ++h) {
      const Elem* col = static_cast<const Elem*>(a.x) + h;
      float* dst = xt + h * Tp;
      for (int64_t t = 0; t < Tp; ++t) dst[t] = t < a.T ? to_float(col[t * a.x_row_stride]) : 0.0f;
    }
  }
}

// xa[r][t] = A[r]·x[t], the LoRA down-projection: one work item (A is a few rows); the other
// threads wait at the barrier. Called inside the parallel region.
inline void lora_down(const QProjArgs& a, bool use_gemv, int64_t rank_p, int64_t Tp, const float* xt, float* wbuf,
                      float* xa) {
#pragma omp single
  {
    if (use_gemv) {
      gemv(a.rank, a.lora_a, a.hidden, a.hidden, xt, a.hidden, a.T, xa, Tp);
    } else {
      load_padded(a.lora_a, a.hidden, a.rank, a.hidden, wbuf, a.hidden, rank_p);
      gemm_lanes<false>(rank_p, Tp, a.hidden, wbuf, a.hidden, 1, xt, Tp, xa, Tp, nullptr);
    }
  }
}

// qbuf[o][t] = W[f0 + o]·x[t] for the D rows of one head, in fp32.
template <class Elem>
void head_product(const QProjArgs& a, bool use_gemv, int64_t Tp, const Elem* w_head, const float* xt, float* wbuf,
                  const float* ones, float* qbuf) {
  const int64_t D = a.head_dim, H = a.hidden;
  if (use_gemv) {
    gemv(D, w_head, a.w_row_stride, H, xt, H, a.T, qbuf, Tp);
  } else if constexpr (std::is_same_v<Elem, float>) {
    // fp32 W is read in place by the micro-kernel, so its memory traffic overlaps the FMAs; only a
    // partial last tile of rows goes through a zero-padded copy.
    const int64_t full = D / kTileRows * kTileRows;
    gemm_lanes<false>(full, Tp, H, w_head, a.w_row_stride, 1, xt, Tp, qbuf, Tp, nullptr);
    if (full < D) {
      load_padded(w_head + full * a.w_row_stride, a.w_row_stride, D - full, H, wbuf, H, kTileRows);
      gemm_lanes<false>(kTileRows, Tp, H, wbuf, H, 1, xt, Tp, qbuf + full * Tp, Tp, nullptr);
    }
  } else {
    // Half-precision W is converted to fp32 kConvertChunk columns at a time, right before its use
    // (docs/tuning.md). Chunks after the first accumulate onto q.
    for (int64_t o0 = 0; o0 < D; o0 += kTileRows) {
      for (int64_t h0 = 0; h0 < H; h0 += kConvertChunk) {
        const int64_t len = std::min(kConvertChunk, H - h0);
        load_padded(w_head + o0 * a.w_row_stride + h0, a.w_row_stride, std::min<int64_t>(kTileRows, D - o0), len, wbuf,
                    kConvertChunk, kTileRows);
        if (h0 == 0)
          gemm_lanes<false>(kTileRows, Tp, len, wbuf, kConvertChunk, 1, xt, Tp, qbuf + o0 * Tp, Tp, nullptr);
        else
          gemm_lanes<true>(kTileRows, Tp, len, wbuf, kConvertChunk, 1, xt + h0 * Tp, Tp, qbuf + o0 * Tp, Tp, ones);
      }
    }
  }
}

// Row t of one head: bias, LoRA up-projection, RMSNorm, RoPE (rotate_half layout), rounded once to
// x's dtype into out[t][head].
template <class Elem>
void finish_row(const QProjArgs& a, int64_t head, int64_t t, int64_t Tp, const float* qbuf, const float* xa, float* q) {
  const int64_t D = a.head_dim, f0 = head * D, rank = a.lora_a ? a.rank : 0;
  for (int64_t d = 0; d < D; ++d) q[d] = qbuf[d * Tp + t];
  if (a.bias)
    for (int64_t d = 0; d < D; ++d) q[d] += a.bias[f0 + d];
  for (int64_t d = 0; d < D && rank > 0; ++d) {
    const float* brow = a.lora_b + (f0 + d) * rank;
    float lora = 0.0f;
    for (int64_t r = 0; r < rank; ++r) lora += xa[r * Tp + t] * brow[r];
    q[d] += a.lora_scale * lora;
  }
  if (a.norm_weight) {
    float sq = 0.0f;
    for (int64_t d = 0; d < D; ++d) sq += q[d] * q[d];
    const float inv_rms = 1.0f / std::sqrt(sq / float(D) + a.eps);
    for (int64_t d = 0; d < D; ++d) q[d] = q[d] * inv_rms * a.norm_weight[d];
  }
  // rot = cat(-q[D/2:], q[:D/2])
  const int64_t half = D / 2;
  const float* c = a.cos + t * D;
  const float* s = a.sin + t * D;
  Elem* out = static_cast<Elem*>(a.out) + (t * a.num_heads + head) * D;
  for (int64_t d = 0; d < half; ++d) {
    out[d] = from_float<Elem>(q[d] * c[d] - q[d + half] * s[d]);
    out[d + half] = from_float<Elem>(q[d + half] * c[d + half] + q[d] * s[d + half]);
  }
}

template <class Elem>
void run(const QProjArgs& a, int num_threads) {
  const int64_t T = a.T, D = a.head_dim, H = a.hidden;
  const int64_t Tp = round_up(T, kLaneQuantum);
  const int64_t Dp = round_up(D, kTileRows);
  const int64_t rank = a.lora_a ? a.rank : 0;
  const int64_t rank_p = round_up(rank, kTileRows);
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const bool use_gemv = T <= kGemvMaxRows;

  FloatBuffer xt = alloc_floats(H * Tp);
  FloatBuffer xa = alloc_floats(rank_p * Tp);  // (x·Aᵀ) transposed: xa[r][t]
  // wbuf: rows of A or of W ([rank_p or kTileRows][H]), or a chunk of W ([kTileRows][kConvertChunk])
  const int64_t wbuf_floats = round_up(std::max({rank_p * H, kTileRows * H, kTileRows * kConvertChunk}), 16);
  const int64_t scratch_floats = wbuf_floats + round_up(Dp * Tp, 16) + round_up(D, 16) + Tp;
  FloatBuffer scratch = alloc_floats(scratch_floats * threads);

#pragma omp parallel num_threads(threads)
  {
    float* wbuf = scratch.get() + scratch_floats * omp_get_thread_num();  // rows of W or A in fp32
    float* qbuf = wbuf + wbuf_floats;                                     // [Dp][Tp] the head, q[o][t]
    float* q = qbuf + round_up(Dp * Tp, 16);                              // [D] one row of the head
    float* ones = q + round_up(D, 16);                                    // [Tp] rescale factors of 1
    std::fill(ones, ones + Tp, 1.0f);

    load_x<Elem>(a, use_gemv, Tp, xt.get());
    if (rank > 0) lora_down(a, use_gemv, rank_p, Tp, xt.get(), wbuf, xa.get());

#pragma omp for schedule(dynamic, 1)
    for (int64_t head = 0; head < a.num_heads; ++head) {
      const Elem* w_head = static_cast<const Elem*>(a.weight) + head * D * a.w_row_stride;
      head_product<Elem>(a, use_gemv, Tp, w_head, xt.get(), wbuf, ones, qbuf);
      for (int64_t t = 0; t < T; ++t) finish_row<Elem>(a, head, t, Tp, qbuf, xa.get(), q);
    }
  }
}

}  // namespace

void lookahead_qproj(const QProjArgs& args, int num_threads) {
  dispatch_dtype(args.dtype, [&](auto tag) { run<decltype(tag)>(args, num_threads); });
}

}  // namespace lookaheadkv::cpu::LOOKAHEADKV_ISA
