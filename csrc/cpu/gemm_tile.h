// The register-blocked fp32 GEMM micro-kernel of the attention kernels:
//     C[u][w] (+)= sum_k A(u, k) · B[k][w]      for u < kRows, w < width
// A element (u, k) sits at a[u*a_row + k*a_k] and is broadcast; B rows and C rows are contiguous
// along w, the vector dimension. Plain loops with compile-time tile sizes: GCC/Clang keep the
// kRows × W accumulators in vector registers (6 × 64 floats = 24 zmm with AVX-512).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu/numeric.h"

namespace lookaheadkv::cpu::LOOKAHEADKV_ISA {

constexpr int kTileRows = 6;          // broadcast rows per micro-tile
constexpr int64_t kLaneQuantum = 16;  // the vector dimension is padded to a multiple of this

// When kScaleInit, the accumulators start from C[u][w] * c_scale[w] (online-softmax rescale),
// otherwise from 0. A may be stored in any element type with a to_float (numeric.h): reading it
// in place lets its memory traffic overlap the FMAs instead of stalling a separate conversion.
template <int W, bool kScaleInit, class AElem>
inline void micro_tile(int64_t K, const AElem* a, int64_t a_row, int64_t a_k, const float* b, int64_t ldb, float* c,
                       int64_t ldc, const float* c_scale) {
  float acc[kTileRows][W];
  for (int u = 0; u < kTileRows; ++u)
    for (int w = 0; w < W; ++w) acc[u][w] = kScaleInit ? c[u * ldc + w] * c_scale[w] : 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float* brow = b + k * ldb;
    for (int u = 0; u < kTileRows; ++u) {
      const float av = to_float(a[u * a_row + k * a_k]);
      // Vectorise along w, never k. Without the pragma GCC 12 fully unrolls the u and w loops when
      // W = 16 (96 statements) and vectorises the k loop instead, shuffling the accumulators every
      // step (an order of magnitude slower; docs/tuning.md).
#pragma omp simd
      for (int w = 0; w < W; ++w) acc[u][w] += av * brow[w];
    }
  }
  for (int u = 0; u < kTileRows; ++u)
    for (int w = 0; w < W; ++w) c[u * ldc + w] = acc[u][w];
}

// C[rows][width] (+)= A · B over K; rows is a multiple of kTileRows, width of kLaneQuantum.
// Every element of C is one sequence of FMAs over k in order, whatever tile it falls in, so a
// value never depends on the shape of the call that produced it.
template <bool kScaleInit, class AElem>
inline void gemm_lanes(int64_t rows, int64_t width, int64_t K, const AElem* a, int64_t a_row, int64_t a_k,
                       const float* b, int64_t ldb, float* c, int64_t ldc, const float* c_scale) {
  int64_t w0 = 0;
  const auto sweep = [&](auto width_tag) {
    constexpr int W = decltype(width_tag)::value;
    for (int64_t u0 = 0; u0 < rows; u0 += kTileRows)
      micro_tile<W, kScaleInit>(K, a + u0 * a_row, a_row, a_k, b + w0, ldb, c + u0 * ldc + w0, ldc,
                                kScaleInit ? c_scale + w0 : nullptr);
    w0 += W;
  };
  while (width - w0 >= 64) sweep(std::integral_constant<int, 64>{});
  if (width - w0 >= 32) sweep(std::integral_constant<int, 32>{});
  if (width - w0 >= 16) sweep(std::integral_constant<int, 16>{});
}

}  // namespace lookaheadkv::cpu::LOOKAHEADKV_ISA
