// select_compact on CPU (docs/ops.md §4). Per (batch, KV head) row:
//   1. every candidate position in [sink, S) gets an order-preserving uint32 key (larger score ->
//      larger key; -0.0 == +0.0; NaN -> 0, below -inf);
//   2. a radix select (8 bits per round, from the top byte) finds the threshold key of the
//      n_pick-th best candidate, and how many candidates equal to it are still to be taken;
//   3. one ascending scan keeps the keys above the threshold plus the earliest ones equal to it
//      (ties -> lower position first), between the sinks [0, sink) and the tail [S, N);
//   4. the kept K and V rows are copied (one memcpy per row) into the contiguous outputs.
// This is exactly the order "larger score first, then lower position", so `kept` is bit-identical
// to the reference. Rows run in parallel; each needs O(S) scratch.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu/kernels.h"
#include "cpu/numeric.h"

namespace lookaheadkv::cpu {
namespace {

inline uint32_t score_key(float f) {
  const uint32_t u = float_bits(f == 0.0f ? 0.0f : f);  // -0.0 -> +0.0
  const uint32_t key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return f != f ? 0u : key;
}

struct Threshold {
  uint32_t key;        // the n_pick-th largest key
  int64_t equal_quota;  // how many candidates equal to `key` are kept (the earliest ones)
};

// Radix select of the n_pick-th largest of keys[0, n), 1 <= n_pick <= n. `work` holds n keys.
Threshold radix_select(const uint32_t* keys, int64_t n, int64_t n_pick, uint32_t* work) {
  uint32_t prefix = 0;
  int64_t remaining = n_pick;  // still to take among the keys that match the prefix
  const uint32_t* src = keys;
  int64_t count = n;
  for (int shift = 24; shift >= 0; shift -= 8) {
    int64_t hist[256] = {};
    for (int64_t i = 0; i < count; ++i) ++hist[(src[i] >> shift) & 0xFFu];
    int bin = 255;
    for (; bin > 0 && hist[bin] < remaining; --bin) remaining -= hist[bin];
    prefix |= uint32_t(bin) << shift;
    if (shift == 0) break;
    // Keep only the keys in the chosen bin for the next, finer round.
    int64_t kept = 0;
    for (int64_t i = 0; i < count; ++i) {
      work[kept] = src[i];
      kept += int64_t(((src[i] >> shift) & 0xFFu) == uint32_t(bin));
    }
    src = work;
    count = kept;
  }
  return {prefix, remaining};
}

struct Row {
  const float* scores;
  const char* k;
  const char* v;
  char* k_out;
  char* v_out;
  int64_t* kept;
};

void select_row(const SelectArgs& a, const Row& row, uint32_t* keys, uint32_t* work) {
  const int64_t N = a.N, S = a.S;
  const int64_t row_bytes = a.D * a.element_size;
  const int64_t k_row = a.k_n * a.element_size, v_row = a.v_n * a.element_size;
  int64_t m = 0;
  if (a.budget >= N) {
    for (; m < N; ++m) row.kept[m] = m;
  } else {
    const int64_t sink = std::min(a.num_sink, S);
    const int64_t n_cand = S - sink;
    const int64_t n_pick = a.budget - sink - (N - S);
    for (; m < sink; ++m) row.kept[m] = m;
    if (n_pick > 0) {
      for (int64_t j = 0; j < n_cand; ++j) keys[j] = score_key(row.scores[(sink + j) * a.s_s]);
      const Threshold t = radix_select(keys, n_cand, n_pick, work);
      int64_t quota = t.equal_quota;
      const int64_t picks_end = sink + n_pick;  // kept[m] below is written only while m < picks_end <= M
      for (int64_t j = 0; j < n_cand && m < picks_end; ++j) {
        const bool equal = keys[j] == t.key;
        const bool take = keys[j] > t.key || (equal && quota > 0);
        quota -= int64_t(equal && take);
        row.kept[m] = sink + j;
        m += int64_t(take);
      }
    }
    for (int64_t p = S; p < N; ++p) row.kept[m++] = p;
  }
  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(row.k_out + i * row_bytes, row.k + row.kept[i] * k_row, size_t(row_bytes));
    std::memcpy(row.v_out + i * row_bytes, row.v + row.kept[i] * v_row, size_t(row_bytes));
  }
}

}  // namespace

void select_compact(const SelectArgs& a) {
  const int64_t rows = a.B * a.Hkv;
  const int64_t M = std::min(a.budget, a.N);
  const int threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
  const int64_t n_scratch = std::max<int64_t>(a.S, 1);
  std::unique_ptr<uint32_t[]> scratch(new uint32_t[size_t(2 * n_scratch * threads)]);
  const int64_t out_row_bytes = M * a.D * a.element_size;

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t rg = 0; rg < rows; ++rg) {
    const int64_t b = rg / a.Hkv, h = rg % a.Hkv;
    const Row row{
        a.scores + b * a.s_b + h * a.s_h,
        static_cast<const char*>(a.k) + (b * a.k_b + h * a.k_h) * a.element_size,
        static_cast<const char*>(a.v) + (b * a.v_b + h * a.v_h) * a.element_size,
        static_cast<char*>(a.k_out) + rg * out_row_bytes,
        static_cast<char*>(a.v_out) + rg * out_row_bytes,
        a.kept + rg * M,
    };
    uint32_t* keys = scratch.get() + 2 * n_scratch * omp_get_thread_num();
    select_row(a, row, keys, keys + n_scratch);
  }
}

}  // namespace lookaheadkv::cpu
