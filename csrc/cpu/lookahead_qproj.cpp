// lookahead_qproj on CPU (docs/ops.md §1): q = RoPE(RMSNorm?(x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ)).
//
// T (the lookahead rows, ~32) is small and W is large, so every W row is read from memory once:
// the work items are query heads (D rows of W each). A head converts kORows rows of W at a time to
// fp32 and dots them with all T rows of x (converted to fp32 once, shared) in a register-blocked
// kTRows × kORows tile of 16-lane partial sums along hidden. The head's [T, D] fp32 block then gets
// bias, LoRA, RMSNorm and RoPE and is rounded once to x's dtype.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/kernels.h"
#include "cpu/numeric.h"

namespace lookaheadkv::cpu {
namespace {

constexpr int kTRows = 4;   // x rows per tile
constexpr int kORows = 6;   // W rows per tile
constexpr int kLanes = 16;  // partial sums per dot product (hidden is padded to a multiple)

inline float tree_sum16(const float* v) {
  float a[8];
  for (int u = 0; u < 8; ++u) a[u] = v[u] + v[u + 8];
  for (int u = 0; u < 4; ++u) a[u] += a[u + 4];
  return (a[0] + a[2]) + (a[1] + a[3]);
}

// out[t][o] = x[t]·w[o] over hp (a multiple of kLanes) for t < kTRows, o < kORows.
inline void dot_tile(int64_t hp, const float* x, const float* w, float (&out)[kTRows][kORows]) {
  float acc[kTRows][kORows][kLanes] = {};
  for (int64_t h0 = 0; h0 < hp; h0 += kLanes)
    for (int t = 0; t < kTRows; ++t)
      for (int o = 0; o < kORows; ++o)
        for (int u = 0; u < kLanes; ++u) acc[t][o][u] += x[t * hp + h0 + u] * w[o * hp + h0 + u];
  for (int t = 0; t < kTRows; ++t)
    for (int o = 0; o < kORows; ++o) out[t][o] = tree_sum16(acc[t][o]);
}

// dst[r][0, hp) = src row r in fp32, zero padded; rows past nrows are zero.
template <class Elem>
void load_padded(const Elem* src, int64_t row_stride, int64_t nrows, int64_t cols, float* dst, int64_t hp, int64_t total_rows) {
  for (int64_t r = 0; r < total_rows; ++r) {
    float* out = dst + r * hp;
    int64_t c = 0;
    if (r < nrows) {
      const Elem* in = src + r * row_stride;
      for (; c < cols; ++c) out[c] = to_float(in[c]);
    }
    for (; c < hp; ++c) out[c] = 0.0f;
  }
}

template <class Elem>
void run(const QProjArgs& a) {
  const int64_t T = a.T, D = a.head_dim, H = a.hidden;
  const int64_t Tp = round_up(T, kTRows), hp = round_up(H, kLanes);
  const int64_t Dp = round_up(D, kORows);
  const int64_t rank = a.lora_a ? a.rank : 0;
  const int64_t rank_p = round_up(rank, kORows);
  const int threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();

  FloatBuffer xf = alloc_floats(Tp * hp);          // x in fp32, shared
  FloatBuffer af = alloc_floats(rank_p * hp);      // lora_a, padded rows
  FloatBuffer xa = alloc_floats(Tp * rank_p);      // x·Aᵀ
  const int64_t scratch_floats = round_up(kORows * hp + Tp * Dp, 16);
  FloatBuffer scratch = alloc_floats(scratch_floats * threads);

#pragma omp parallel num_threads(threads)
  {
    float* wbuf = scratch.get() + scratch_floats * omp_get_thread_num();  // [kORows][hp]
    float* qbuf = wbuf + kORows * hp;                                      // [Tp][Dp] the head, fp32

#pragma omp for schedule(static)
    for (int64_t t = 0; t < Tp; ++t)  // rows past T are zero padding of the last tile
      load_padded(static_cast<const Elem*>(a.x) + std::min(t, T - 1) * a.x_row, a.x_row, t < T ? 1 : 0, H,
                  xf.get() + t * hp, hp, 1);

    if (rank > 0) {
#pragma omp single
      load_padded(a.lora_a, H, rank, H, af.get(), hp, rank_p);
      // implicit barrier: af is complete
#pragma omp for schedule(static)
      for (int64_t t0 = 0; t0 < Tp; t0 += kTRows) {
        for (int64_t r0 = 0; r0 < rank_p; r0 += kORows) {
          float tile[kTRows][kORows];
          dot_tile(hp, xf.get() + t0 * hp, af.get() + r0 * hp, tile);
          for (int t = 0; t < kTRows; ++t)
            for (int o = 0; o < kORows; ++o) xa[(t0 + t) * rank_p + r0 + o] = tile[t][o];
        }
      }
    }

#pragma omp for schedule(dynamic, 1)
    for (int64_t head = 0; head < a.num_heads; ++head) {
      const int64_t f0 = head * D;  // first output feature of the head
      for (int64_t o0 = 0; o0 < D; o0 += kORows) {
        load_padded(static_cast<const Elem*>(a.weight) + (f0 + o0) * a.w_row, a.w_row, std::min<int64_t>(kORows, D - o0), H,
                    wbuf, hp, kORows);
        for (int64_t t0 = 0; t0 < Tp; t0 += kTRows) {
          float tile[kTRows][kORows];
          dot_tile(hp, xf.get() + t0 * hp, wbuf, tile);
          for (int t = 0; t < kTRows; ++t)
            for (int o = 0; o < kORows; ++o) qbuf[(t0 + t) * Dp + o0 + o] = tile[t][o];
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        float* q = qbuf + t * Dp;
        if (a.bias)
          for (int64_t d = 0; d < D; ++d) q[d] += a.bias[f0 + d];
        for (int64_t d = 0; d < D && rank > 0; ++d) {
          const float* brow = a.lora_b + (f0 + d) * rank;
          float lora = 0.0f;
          for (int64_t r = 0; r < rank; ++r) lora += xa[t * rank_p + r] * brow[r];
          q[d] += a.lora_scale * lora;
        }
        if (a.norm_weight) {
          float sq = 0.0f;
          for (int64_t d = 0; d < D; ++d) sq += q[d] * q[d];
          const float inv_rms = 1.0f / std::sqrt(sq / float(D) + a.eps);
          for (int64_t d = 0; d < D; ++d) q[d] = q[d] * inv_rms * a.norm_weight[d];
        }
        // RoPE, rotate_half layout: rot = cat(-q[D/2:], q[:D/2])
        const int64_t half = D / 2;
        const float* c = a.cos + t * D;
        const float* s = a.sin + t * D;
        Elem* out = static_cast<Elem*>(a.out) + (t * a.num_heads + head) * D;
        for (int64_t d = 0; d < half; ++d) {
          out[d] = from_float<Elem>(q[d] * c[d] - q[d + half] * s[d]);
          out[d + half] = from_float<Elem>(q[d + half] * c[d + half] + q[d] * s[d + half]);
        }
      }
    }
  }
}

}  // namespace

void lookahead_qproj(const QProjArgs& args) {
  dispatch_dtype(args.dtype, [&](auto tag) { run<decltype(tag)>(args); });
}

}  // namespace lookaheadkv::cpu
