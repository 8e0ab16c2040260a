// select_compact on CPU (docs/ops.md §4). Per (batch, KV head) row:
//   1. every candidate position in [sink, S) gets an order-preserving uint32 key (larger score ->
//      larger key; -0.0 == +0.0; NaN -> 0, below -inf);
//   2. a radix select (digits of 11, 11 and 10 bits from the top) finds the threshold key of the
//      n_pick-th best candidate, and how many candidates equal to it are still to be taken; for
//      sparse selections (the usual budgets) it runs only on the keys above a sampled lower bound,
//      collected with their positions in the one pass over the scores;
//   3. an ascending scan keeps the keys above the threshold plus the earliest ones equal to it
//      (ties -> lower position first), between the sinks [0, sink) and the tail [S, N);
//   4. the kept K and V rows are copied (one memcpy per row) into the contiguous outputs.
// This is exactly the order "larger score first, then lower position", so `kept` is bit-identical
// to the reference. Rows run in parallel; each needs O(S) scratch.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>

#include "cpu/kernels.h"
#include "cpu/numeric.h"

namespace lookaheadkv::cpu::LOOKAHEADKV_ISA {
namespace {

// Integer-only and branch-free (a branch on the sign would mispredict on every other score).
inline uint32_t score_key(float f) {
  uint32_t u = float_bits(f);
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  u &= 0u - uint32_t(magnitude != 0);                                   // -0.0 -> +0.0
  const uint32_t key = u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);  // negative: ~u, else u | sign
  return key & (0u - uint32_t(magnitude <= 0x7F800000u));               // NaN -> 0
}

struct Digit {
  int shift;
  int bits;
};
constexpr Digit kDigits[] = {{21, 11}, {10, 11}, {0, 10}};
constexpr int kMaxBins = 1 << 11;
constexpr int kSubHistograms = 4;  // interleaved counters: repeated bins do not serialise on one counter

// Per-thread scratch of one row.
struct RowScratch {
  uint32_t* keys;       // [S] the candidates' keys
  uint32_t* pass_keys;  // [S] the keys above the sampled bound (sparse path)
  uint32_t* pass_pos;   // [S] and their candidate indices
  uint32_t* work;       // [S] radix select's compaction
  uint32_t* hist;       // [kSubHistograms][kMaxBins]

  static int64_t words(int64_t S) { return 4 * S + kSubHistograms * kMaxBins; }
  RowScratch(uint32_t* base, int64_t S)
      : keys(base), pass_keys(base + S), pass_pos(base + 2 * S), work(base + 3 * S), hist(base + 4 * S) {}
};

struct Threshold {
  uint32_t key;         // the n_pick-th largest key
  int64_t equal_quota;  // how many candidates equal to `key` are kept (the earliest ones)
};

// Fills hist with the counts of digit d of src[0, count), in kSubHistograms interleaved copies.
void histogram(const uint32_t* src, int64_t count, Digit d, uint32_t* hist) {
  std::fill(hist, hist + kSubHistograms * kMaxBins, 0u);
  const uint32_t mask = (1u << d.bits) - 1u;
  int64_t i = 0;
  for (; i + kSubHistograms <= count; i += kSubHistograms)
    for (int s = 0; s < kSubHistograms; ++s) ++hist[s * kMaxBins + ((src[i + s] >> d.shift) & mask)];
  for (; i < count; ++i) ++hist[(src[i] >> d.shift) & mask];
}

// Radix select of the n_pick-th largest of keys[0, n), 1 <= n_pick <= n.
Threshold radix_select(const uint32_t* keys, int64_t n, int64_t n_pick, RowScratch& s) {
  uint32_t prefix = 0;
  int64_t remaining = n_pick;  // still to take among the keys that match the prefix
  const uint32_t* src = keys;
  int64_t count = n;
  for (const Digit d : kDigits) {
    histogram(src, count, d, s.hist);
    uint32_t bin = (1u << d.bits) - 1u;
    for (;; --bin) {  // from the top bin down to the one holding the n_pick-th key
      int64_t in_bin = 0;
      for (int sub = 0; sub < kSubHistograms; ++sub) in_bin += s.hist[sub * kMaxBins + bin];
      if (in_bin >= remaining || bin == 0) break;
      remaining -= in_bin;
    }
    prefix |= bin << d.shift;
    if (d.shift == 0) break;
    // Keep only the keys in the chosen bin for the next, finer digit (in place in s.work). The
    // branch is predictable: the bin usually holds few of the keys (or nearly all of them).
    int64_t kept = 0;
    const uint32_t mask = (1u << d.bits) - 1u;
    for (int64_t i = 0; i < count; ++i) {
      const uint32_t key = src[i];
      if (((key >> d.shift) & mask) == bin) s.work[kept++] = key;
    }
    src = s.work;
    count = kept;
  }
  return {prefix, remaining};
}

constexpr int64_t kSampleStride = 32;
constexpr int64_t kScanBlock = 16;

struct Row {
  const float* scores;
  const char* k;
  const char* v;
  char* k_out;
  char* v_out;
  int64_t* kept;
};

// Calls f(i), in ascending order, for every i < count with keys[i] >= lo. Blocks of kScanBlock
// keys below lo are skipped after one vector test (most blocks, for a selective lo).
template <class F>
void for_each_at_least(const uint32_t* keys, int64_t count, uint32_t lo, const F& f) {
  for (int64_t i0 = 0; i0 < count; i0 += kScanBlock) {
    const int64_t i1 = std::min(count, i0 + kScanBlock);
    if (i1 - i0 == kScanBlock) {
      int hits = 0;
      for (int64_t u = 0; u < kScanBlock; ++u) hits += int(keys[i0 + u] >= lo);
      if (hits == 0) continue;
    }
    for (int64_t i = i0; i < i1; ++i)
      if (keys[i] >= lo) f(i);
  }
}

// Appends to kept, ascending, position(i) for the candidates i < count (in position order) whose
// key is above t.key, and for the first t.equal_quota of those equal to it. Returns the new m.
template <class Position>
int64_t emit_selected(const uint32_t* keys, int64_t count, const Threshold& t, const Position& position, int64_t* kept,
                      int64_t m) {
  int64_t quota = t.equal_quota;
  for_each_at_least(keys, count, t.key, [&](int64_t i) {
    if (keys[i] > t.key || quota-- > 0) kept[m++] = position(i);
  });
  return m;
}

// kept[0, m) for a row: sinks, the selected candidates in ascending order, the tail. Returns m.
int64_t kept_positions(const SelectArgs& a, const Row& row, RowScratch& s) {
  const int64_t N = a.N, S = a.S;
  if (a.budget >= N) {
    for (int64_t p = 0; p < N; ++p) row.kept[p] = p;
    return N;
  }
  const int64_t sink = std::min(a.num_sink, S);
  const int64_t n_cand = S - sink;
  const int64_t n_pick = a.budget - sink - (N - S);
  int64_t m = 0;
  for (; m < sink; ++m) row.kept[m] = m;
  if (n_pick > 0) {
    const float* cand = row.scores + sink * a.s_ss;
    for (int64_t i = 0; i < n_cand; ++i) s.keys[i] = score_key(cand[i * a.s_ss]);
    bool selected = false;
    if (n_pick * 2 * kSampleStride <= n_cand) {
      // Sparse selection (the usual budgets): an order statistic of every kSampleStride-th key
      // is a lower bound lo that about 2·n_pick keys pass; the threshold is selected among those
      // (kept with their indices). If fewer than n_pick pass (an unlucky sample), all keys are used.
      const int64_t samples = n_cand / kSampleStride;
      for (int64_t i = 0; i < samples; ++i) s.work[i] = s.keys[i * kSampleStride];
      const int64_t rank = std::min(samples, 2 * n_pick / kSampleStride + 16);  // 1-based, from the top
      std::nth_element(s.work, s.work + (rank - 1), s.work + samples, std::greater<uint32_t>());
      const uint32_t lo = s.work[rank - 1];
      int64_t passing = 0;
      for_each_at_least(s.keys, n_cand, lo, [&](int64_t i) {
        s.pass_keys[passing] = s.keys[i];
        s.pass_pos[passing++] = uint32_t(i);
      });
      if (passing >= n_pick) {
        const Threshold t = radix_select(s.pass_keys, passing, n_pick, s);
        m = emit_selected(
            s.pass_keys, passing, t, [&](int64_t i) { return sink + int64_t(s.pass_pos[i]); }, row.kept, m);
        selected = true;
      }
    }
    if (!selected) {
      const Threshold t = radix_select(s.keys, n_cand, n_pick, s);
      m = emit_selected(s.keys, n_cand, t, [&](int64_t i) { return sink + i; }, row.kept, m);
    }
  }
  for (int64_t p = S; p < N; ++p) row.kept[m++] = p;
  return m;
}

void select_row(const SelectArgs& a, const Row& row, RowScratch& s) {
  const int64_t m = kept_positions(a, row, s);
  const int64_t row_bytes = a.D * a.elem_size;
  const int64_t k_row = a.k_sn * a.elem_size, v_row = a.v_sn * a.elem_size;
  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(row.k_out + i * row_bytes, row.k + row.kept[i] * k_row, size_t(row_bytes));
    std::memcpy(row.v_out + i * row_bytes, row.v + row.kept[i] * v_row, size_t(row_bytes));
  }
}

}  // namespace

void select_compact(const SelectArgs& a, int num_threads) {
  const int64_t rows = a.B * a.Hkv;
  const int64_t M = std::min(a.budget, a.N);
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t scratch_words = round_up(RowScratch::words(a.S), 16);
  std::unique_ptr<uint32_t[]> scratch(new uint32_t[size_t(scratch_words * threads)]);
  const int64_t out_row_bytes = M * a.D * a.elem_size;

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t rg = 0; rg < rows; ++rg) {
    const int64_t b = rg / a.Hkv, h = rg % a.Hkv;
    const Row row{
        a.scores + b * a.s_sb + h * a.s_sh,
        static_cast<const char*>(a.k) + (b * a.k_sb + h * a.k_sh) * a.elem_size,
        static_cast<const char*>(a.v) + (b * a.v_sb + h * a.v_sh) * a.elem_size,
        static_cast<char*>(a.k_out) + rg * out_row_bytes,
        static_cast<char*>(a.v_out) + rg * out_row_bytes,
        a.kept + rg * M,
    };
    RowScratch s(scratch.get() + scratch_words * omp_get_thread_num(), a.S);
    select_row(a, row, s);
  }
}

// Per (sequence, KV head): the kept positions of the dense rule, then each kept row moved to its
// slot, in increasing slot order. kept[m] >= m and ascending, so the move to slot m reads a slot no
// earlier move wrote (those are < m <= kept[m]) and later moves never read slot m (their sources are
// > kept[m] >= m): the compaction is in place without a copy (docs/ops.md §6). Slots map to distinct
// cache entries (the caller checks that the sequence's blocks are its own), and each (sequence,
// head) owns its entries, so rows run in parallel.
void paged_select_compact(const PagedSelectArgs& p, int num_threads) {
  const int64_t capacity = p.max_blocks * p.block_size;
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t scratch_words = round_up(RowScratch::words(p.score_width), 16);
  std::unique_ptr<uint32_t[]> scratch(new uint32_t[size_t(scratch_words * threads)]);
  std::unique_ptr<int64_t[]> positions(new int64_t[size_t(capacity * threads)]);
  const int64_t row_bytes = p.D * p.elem_size;

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t rg = 0; rg < p.B * p.Hkv; ++rg) {
    const int64_t b = rg / p.Hkv, h = rg % p.Hkv;
    const int64_t N = p.seq_lens[b];
    SelectArgs a{};
    a.s_ss = p.s_ss;
    a.N = N;
    a.S = p.num_scored[b];
    a.budget = p.budgets[b];
    a.num_sink = p.num_sink;
    int64_t* kept = positions.get() + capacity * omp_get_thread_num();
    const Row row{p.scores + b * p.s_sb + h * p.s_sh, nullptr, nullptr, nullptr, nullptr, kept};
    RowScratch s(scratch.get() + scratch_words * omp_get_thread_num(), a.S);
    const int64_t m_end = kept_positions(a, row, s);
    const int32_t* blocks = p.block_table + b * p.max_blocks;
    const auto entry = [&](char* cache, int64_t block_stride, int64_t token_stride, int64_t head_stride, int64_t j) {
      const int64_t offset =
          blocks[j / p.block_size] * block_stride + (j % p.block_size) * token_stride + h * head_stride;
      return cache + offset * p.elem_size;
    };
    if (a.budget < N) {
      for (int64_t m = 0; m < m_end; ++m) {
        if (kept[m] == m) continue;
        std::memcpy(entry(static_cast<char*>(p.k), p.k_sblk, p.k_sn, p.k_sh, m),
                    entry(static_cast<char*>(p.k), p.k_sblk, p.k_sn, p.k_sh, kept[m]), size_t(row_bytes));
        std::memcpy(entry(static_cast<char*>(p.v), p.v_sblk, p.v_sn, p.v_sh, m),
                    entry(static_cast<char*>(p.v), p.v_sblk, p.v_sn, p.v_sh, kept[m]), size_t(row_bytes));
      }
    }
    int32_t* out = p.kept + rg * capacity;
    for (int64_t m = 0; m < m_end; ++m) out[m] = int32_t(kept[m]);
    std::fill(out + m_end, out + capacity, -1);
    if (h == 0) p.new_lens[b] = int32_t(m_end);
  }
}

}  // namespace lookaheadkv::cpu::LOOKAHEADKV_ISA
