// attention_scores and lookahead_attention on CPU (docs/ops.md §2-3): one fused computation whose
// extra memory is bounded (kStoredLogitsBytes of logits, kPartialBudgetBytes of partial outputs, a
// few hundred KiB per thread).
//
// Layout. The R = (Hq/Hkv)·Tq query rows of one KV head ("group") are packed together, transposed
// and pre-scaled: Qt[d][r], rows in the vector lanes. A block of kKeyBlock keys is converted to
// fp32 once and the micro-kernel (gemm_tile.h) broadcasts K[j][d] against Qt[d][:], giving the
// logits Lt[j][r] of every row of the group: K is read once per pass for all query heads of its
// group, and the per-row softmax reductions over keys are plain vertical vector operations.
//
// Pass 1 (softmax statistics, and the attention output). The keys are cut into chunks of a
// number of blocks that depends on the shapes only, so results do not depend on the thread count.
// Each (batch, group, chunk) work item runs an online softmax over its blocks, giving per row the
// chunk max m_c and sum l_c, and for lookahead_attention the unnormalised partial output
// o_c = Σ e^{L-m_c}·v (a flash-decoding split: P·V reuses pass 1's probabilities, no recompute).
// The chunks of a group are then combined in chunk order (deterministic):
//     m = max m_c,  l = Σ l_c·e^{m_c-m},  out = Σ o_c·e^{m_c-m} / l.
// Pass 2 (scores). Per (batch, group, chunk of [0, S)): the logits again, P = e^{L-m}/l, the mean
// (or max) over the Tq rows of each head, the GQA reduce -> raw[j]. Pass 1 stores the logits of the
// scored keys and pass 2 reads them back instead of a second Q·Kᵀ. The groups go through passes 1-2
// in waves whose stored logits fit kStoredLogitsBytes (S·R floats per group: 3 MiB for SmolLM2 at
// 8K, 16 MiB for Llama-3.1-8B at 32K, 32 rows); a group larger than that recomputes its logits,
// keeping the extra memory O(R·(D + kKeyBlock)) per thread. The values are the same either way
// (one GEMM code path).
// Pass 3. Pooling along j (after the GQA reduce).
//
// Both ops run exactly the same code for passes 1 (statistics) and 2, so lookahead_attention's
// scores equal attention_scores' bit for bit.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/gemm_tile.h"
#include "cpu/kernels.h"
#include "cpu/numeric.h"

namespace lookaheadkv::cpu::LOOKAHEADKV_ISA {
namespace {

constexpr int64_t kKeyBlock = 16 * kTileRows;               // keys per block: 96, whole micro-tiles
constexpr int64_t kMinChunkBlocks = 16;                     // blocks per pass-1 work item (at least)
constexpr int64_t kPartialBudgetBytes = int64_t(16) << 20;  // cap on lookahead_attention's partial outputs
// Cap on pass 1's stored logits. Below glibc's largest dynamic mmap threshold (32 MiB): from the
// second call on, the buffer comes from the heap instead of fresh pages, whose faults cost more
// than the saved GEMM (docs/tuning.md).
constexpr int64_t kStoredLogitsBytes = int64_t(24) << 20;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Geometry {
  int64_t G;             // query heads per KV head
  int64_t R;             // query rows of a group: G·Tq, row r = head_in_group·Tq + query
  int64_t Rp;            // R padded to the lane quantum
  int64_t BG;            // batch × KV heads
  int64_t Dv;            // head dim padded to whole micro-tiles (rows of the P·V product)
  int64_t nblocks;       // key blocks over [0, N)
  int64_t chunk_blocks;  // blocks per work item
  int64_t nchunks;       // pass-1 chunks over [0, N)
  int64_t score_blocks;  // key blocks over [0, S)
  int64_t score_chunks;  // pass-2 chunks over [0, S)
  bool store_logits;     // pass 1 keeps the logits of the score blocks for pass 2
  int64_t wave;          // groups per wave of passes 1-2
};

Geometry geometry(const AttentionArgs& a) {
  Geometry g{};
  g.G = a.Hq / a.Hkv;
  g.R = g.G * a.Tq;
  g.Rp = round_up(g.R, kLaneQuantum);
  g.BG = a.B * a.Hkv;
  g.Dv = round_up(a.D, kTileRows);
  g.nblocks = (a.N + kKeyBlock - 1) / kKeyBlock;
  // The partial outputs take BG·nchunks·Dv·Rp floats: bound them by growing the chunks. The rule
  // is the same for both ops, because the chunking decides the rounding of m and l.
  const int64_t chunk_bytes = g.BG * g.Dv * g.Rp * int64_t(sizeof(float));
  const int64_t max_chunks = std::max<int64_t>(1, kPartialBudgetBytes / chunk_bytes);
  g.chunk_blocks = std::max(kMinChunkBlocks, (g.nblocks + max_chunks - 1) / max_chunks);
  g.nchunks = (g.nblocks + g.chunk_blocks - 1) / g.chunk_blocks;
  g.score_blocks = (a.S + kKeyBlock - 1) / kKeyBlock;
  g.score_chunks = (g.score_blocks + g.chunk_blocks - 1) / g.chunk_blocks;
  const int64_t group_logits_bytes = g.score_blocks * kKeyBlock * g.Rp * int64_t(sizeof(float));
  g.store_logits = group_logits_bytes <= kStoredLogitsBytes;
  g.wave = g.store_logits ? std::min(g.BG, kStoredLogitsBytes / group_logits_bytes) : g.BG;
  return g;
}

// Per-thread working set, a few hundred KiB: stays in L2.
struct Scratch {
  float* kf;     // [kKeyBlock][D]  the block's keys in fp32 (zero rows past N)
  float* vf;     // [kKeyBlock][Dv] the block's values in fp32 (lookahead_attention)
  float* lt;     // [kKeyBlock][Rp] logits, then probabilities
  float* alpha;  // [Rp] online-softmax rescale of the earlier partial sums
  float* shift;  // [Rp] the exponent shift of the current block

  static int64_t floats(const AttentionArgs& a, const Geometry& g) {
    return round_up(kKeyBlock * a.D, 16) + kKeyBlock * g.Dv + kKeyBlock * g.Rp + 2 * g.Rp;
  }
  Scratch(float* base, const AttentionArgs& a, const Geometry& g)
      : kf(base),
        vf(kf + round_up(kKeyBlock * a.D, 16)),
        lt(vf + kKeyBlock * g.Dv),
        alpha(lt + kKeyBlock * g.Rp),
        shift(alpha + g.Rp) {}
};

// Rows j of one (batch, KV head) of K or V: dense at base + j·token_stride, or paged (blocks not
// null) at base + blocks[j / block_size]·block_stride + (j % block_size)·token_stride.
template <class T>
struct RowSource {
  const T* base;
  int64_t token_stride;
  const int32_t* blocks;
  int64_t block_size, block_stride;

  const T* row(int64_t j) const {
    if (blocks == nullptr) return base + j * token_stride;
    return base + blocks[j / block_size] * block_stride + (j % block_size) * token_stride;
  }
};

template <class T>
RowSource<T> key_rows(const AttentionArgs& a, int64_t b, int64_t h) {
  const T* base = static_cast<const T*>(a.k) + h * a.k_sh;
  if (a.k_blocks == nullptr) return {base + b * a.k_sb, a.k_sn, nullptr, 0, 0};
  return {base, a.k_sn, a.k_blocks + b * a.blocks_stride, a.block_size, a.k_sblk};
}

template <class T>
RowSource<T> value_rows(const AttentionArgs& a, int64_t b, int64_t h) {
  const T* base = static_cast<const T*>(a.v) + h * a.v_sh;
  if (a.k_blocks == nullptr) return {base + b * a.v_sb, a.v_sn, nullptr, 0, 0};
  return {base, a.v_sn, a.k_blocks + b * a.blocks_stride, a.block_size, a.v_sblk};
}

// dst[r][c] = row j0 + r (fp32) for r < nrows, c < D; zero elsewhere in [total_rows][ld]. Paged rows
// are walked a block's run at a time (one table lookup per block, not per row).
template <class T>
void load_rows(const RowSource<T>& src, int64_t j0, int64_t nrows, int64_t D, float* dst, int64_t ld,
               int64_t total_rows) {
  int64_t r = 0;
  while (r < nrows) {
    const int64_t j = j0 + r;
    const int64_t run = src.blocks == nullptr ? nrows - r : std::min(nrows - r, src.block_size - j % src.block_size);
    const T* in = src.row(j);
    for (int64_t i = 0; i < run; ++i, ++r) {
      float* out = dst + r * ld;
      const T* row = in + i * src.token_stride;
      for (int64_t c = 0; c < D; ++c) out[c] = to_float(row[c]);
      std::fill(out + D, out + ld, 0.0f);
    }
  }
  for (; r < total_rows; ++r) std::fill(dst + r * ld, dst + (r + 1) * ld, 0.0f);
}

// Sets to `hidden` the entries of the keys a row may not see: key position p is visible to query
// i (at position N-Tq+i) iff p <= N-Tq+i; positions >= N are block padding. Logits get -inf
// (pass 1), probabilities 0 (pass 2: exactly 0 even in a NaN row, as the contract says).
void mask_block(float* lt, int64_t rp, int64_t j0, const int32_t* lane_query, int64_t N, int64_t Tq, float hidden) {
  const int64_t first_hidden = N - Tq + 1;  // the first position query 0 does not see
  if (j0 + kKeyBlock <= first_hidden) return;
  for (int64_t j = 0; j < kKeyBlock; ++j) {
    float* row = lt + j * rp;
    const int64_t pos = j0 + j;
    if (pos >= N) {
      for (int64_t r = 0; r < rp; ++r) row[r] = hidden;
    } else if (pos >= first_hidden) {
      const int32_t limit = int32_t(pos - (N - Tq));  // queries i < limit do not see pos
      for (int64_t r = 0; r < rp; ++r) row[r] = lane_query[r] < limit ? hidden : row[r];
    }
  }
}

// One online-softmax step over a block, for every row: m (running max) and l (running sum) are
// updated in place, lt is overwritten with P = e^{L - m_new}, alpha = e^{m_old - m_new} rescales
// earlier partial sums. A row that has seen only -inf so far keeps m = -inf and l = 0 (the shift
// 0 makes its P exactly 0 instead of NaN). NaN logits make l NaN (torch's softmax row of NaNs).
// Not inlined: both ops must run the very same instructions here.
__attribute__((noinline)) void softmax_block(float* lt, int64_t rp, float* m, float* l, float* alpha, float* shift) {
  for (int64_t r = 0; r < rp; ++r) shift[r] = m[r];
  for (int64_t j = 0; j < kKeyBlock; ++j) {
    const float* row = lt + j * rp;
    for (int64_t r = 0; r < rp; ++r) shift[r] = row[r] > shift[r] ? row[r] : shift[r];
  }
  for (int64_t r = 0; r < rp; ++r) {
    const float m_new = shift[r];
    const float s = m_new == kNegInf ? 0.0f : m_new;
    alpha[r] = exp_nonpositive(m[r] - s);
    m[r] = m_new;
    shift[r] = s;
    l[r] *= alpha[r];
  }
  for (int64_t j = 0; j < kKeyBlock; ++j) {
    float* row = lt + j * rp;
    for (int64_t r = 0; r < rp; ++r) {
      const float p = exp_nonpositive(row[r] - shift[r]);
      row[r] = p;
      l[r] += p;
    }
  }
}

// Logits Lt[j][r] of block j0 for every row of the group (hidden keys not masked yet).
template <class T>
void block_logits(const RowSource<T>& keys, int64_t j0, const AttentionArgs& a, const Geometry& g, const float* qt,
                  Scratch& s) {
  load_rows(keys, j0, std::min(kKeyBlock, a.N - j0), a.D, s.kf, a.D, kKeyBlock);
  gemm_lanes<false>(kKeyBlock, g.Rp, a.D, s.kf, a.D, 1, qt, g.Rp, s.lt, g.Rp, nullptr);
}

// The stored logits of block blk of a group, in the group's [score_blocks][kKeyBlock][Rp].
inline float* stored_block(float* logits, const Geometry& g, int64_t blk) { return logits + blk * kKeyBlock * g.Rp; }

// Pass 1 work item: chunk c of group bg -> m_c, l_c [Rp], (when o_c) o_c [Dv][Rp] and (when logits,
// the group's store) the unmasked logits of its score blocks.
template <class T>
void stats_chunk(const AttentionArgs& a, const Geometry& g, const float* qt, const int32_t* lane_query, int64_t bg,
                 int64_t c, Scratch& s, float* m_c, float* l_c, float* o_c, float* logits) {
  const int64_t b = bg / a.Hkv, h = bg % a.Hkv;
  const RowSource<T> keys = key_rows<T>(a, b, h);
  const RowSource<T> values = o_c ? value_rows<T>(a, b, h) : RowSource<T>{};
  std::fill(m_c, m_c + g.Rp, kNegInf);
  std::fill(l_c, l_c + g.Rp, 0.0f);
  if (o_c) std::fill(o_c, o_c + g.Dv * g.Rp, 0.0f);
  const int64_t blk_end = std::min(g.nblocks, (c + 1) * g.chunk_blocks);
  for (int64_t blk = c * g.chunk_blocks; blk < blk_end; ++blk) {
    const int64_t j0 = blk * kKeyBlock;
    block_logits(keys, j0, a, g, qt, s);
    if (logits && blk < g.score_blocks) std::copy_n(s.lt, kKeyBlock * g.Rp, stored_block(logits, g, blk));
    mask_block(s.lt, g.Rp, j0, lane_query, a.N, a.Tq, kNegInf);
    softmax_block(s.lt, g.Rp, m_c, l_c, s.alpha, s.shift);
    if (o_c) {
      load_rows(values, j0, std::min(kKeyBlock, a.N - j0), a.D, s.vf, g.Dv, kKeyBlock);
      // o_c[d][r] = o_c[d][r]·alpha[r] + Σ_j V[j][d]·P[j][r]
      gemm_lanes<true>(g.Dv, g.Rp, kKeyBlock, s.vf, 1, g.Dv, s.lt, g.Rp, o_c, g.Rp, s.alpha);
    }
  }
}

// Combines the chunks of group bg into the final shift (max, 0 for an all -inf row) and 1/l of
// every row, and for lookahead_attention writes out = Σ_c o_c·e^{m_c - shift} / l.
template <class T>
void combine_group(const AttentionArgs& a, const Geometry& g, int64_t bg, const float* part_m, const float* part_l,
                   float* part_o, float* shift, float* inv_l) {
  const int64_t Rp = g.Rp;
  float* m = shift;
  std::fill(m, m + Rp, kNegInf);
  for (int64_t c = 0; c < g.nchunks; ++c) {
    const float* mc = part_m + c * Rp;
    for (int64_t r = 0; r < Rp; ++r) m[r] = mc[r] > m[r] ? mc[r] : m[r];
  }
  for (int64_t r = 0; r < Rp; ++r) m[r] = m[r] == kNegInf ? 0.0f : m[r];
  std::fill(inv_l, inv_l + Rp, 0.0f);
  float* l = inv_l;
  for (int64_t c = 0; c < g.nchunks; ++c) {
    const float* mc = part_m + c * Rp;
    const float* lc = part_l + c * Rp;
    for (int64_t r = 0; r < Rp; ++r) l[r] += lc[r] * exp_nonpositive(mc[r] - shift[r]);
  }
  for (int64_t r = 0; r < Rp; ++r) inv_l[r] = 1.0f / l[r];
  if (part_o == nullptr) return;

  // Accumulate every chunk into chunk 0's partial, in chunk order.
  const int64_t osize = g.Dv * Rp;
  float* acc = part_o;
  for (int64_t c = 0; c < g.nchunks; ++c) {
    const float* mc = part_m + c * Rp;
    const float* oc = part_o + c * osize;
    float weight[kLaneQuantum];
    for (int64_t r0 = 0; r0 < Rp; r0 += kLaneQuantum) {
      for (int64_t u = 0; u < kLaneQuantum; ++u)
        weight[u] = exp_nonpositive(mc[r0 + u] - shift[r0 + u]) * inv_l[r0 + u];
      for (int64_t d = 0; d < a.D; ++d)
        for (int64_t u = 0; u < kLaneQuantum; ++u)
          acc[d * Rp + r0 + u] =
              c == 0 ? oc[d * Rp + r0 + u] * weight[u] : acc[d * Rp + r0 + u] + oc[d * Rp + r0 + u] * weight[u];
    }
  }
  const int64_t b = bg / a.Hkv, h = bg % a.Hkv;
  T* out = static_cast<T*>(a.out);
  for (int64_t r = 0; r < g.R; ++r) {
    const int64_t head = h * g.G + r / a.Tq, query = r % a.Tq;
    T* dst = out + b * a.out_sb + head * a.out_sh + query * a.out_st;
    for (int64_t d = 0; d < a.D; ++d) dst[d] = from_float<T>(acc[d * Rp + r]);
  }
}

// Sum of n consecutive floats with 16 independent partial sums and a fixed tree (vectorises
// without reassociation, and is deterministic).
inline float lane_sum(const float* x, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int u = 0; u < 16; ++u) acc[u] += x[i + u];
  for (int u = 0; i + u < n; ++u) acc[u] += x[i + u];
  for (int u = 0; u < 8; ++u) acc[u] += acc[u + 8];
  for (int u = 0; u < 4; ++u) acc[u] += acc[u + 4];
  for (int u = 0; u < 2; ++u) acc[u] += acc[u + 2];
  return acc[0] + acc[1];
}

// Max of n >= 1 consecutive floats, NaN if any is NaN, with 8 partial maxima. The compare-select is
// what x86 max instructions do, so it vectorises (nan_max's "or NaN" test does not); NaN is carried by a separate sum
// of x·0, which is 0 for every finite x and NaN once any x is NaN (inputs here are probabilities: no infinities). Max
// is order-free, so this equals a plain left-to-right max.
inline float lane_max(const float* x, int64_t n) {
  constexpr int kLanes = 8;
  float acc[kLanes], poison[kLanes] = {};
  for (int u = 0; u < kLanes; ++u) acc[u] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int u = 0; u < kLanes; ++u) {
      acc[u] = x[i + u] > acc[u] ? x[i + u] : acc[u];
      poison[u] += x[i + u] * 0.0f;
    }
  for (int u = 0; i + u < n; ++u) {
    acc[u] = x[i + u] > acc[u] ? x[i + u] : acc[u];
    poison[u] += x[i + u] * 0.0f;
  }
  float m = acc[0], p = poison[0];
  for (int u = 1; u < kLanes; ++u) {
    m = acc[u] > m ? acc[u] : m;
    p += poison[u];
  }
  return m + p;
}

// Pass 2 work item: raw scores of the keys of chunk c (within [0, S)) of group bg.
template <class T>
void score_chunk(const AttentionArgs& a, const Geometry& g, const float* qt, const int32_t* lane_query, int64_t bg,
                 int64_t c, Scratch& s, const float* shift, const float* inv_l, float* logits, float* raw) {
  const int64_t b = bg / a.Hkv, h = bg % a.Hkv;
  const RowSource<T> keys = key_rows<T>(a, b, h);
  const int64_t blk_end = std::min(g.score_blocks, (c + 1) * g.chunk_blocks);
  const float inv_heads = 1.0f / float(g.G);
  for (int64_t blk = c * g.chunk_blocks; blk < blk_end; ++blk) {
    const int64_t j0 = blk * kKeyBlock;
    const int64_t nscored = std::min(kKeyBlock, a.S - j0);
    float* lt = s.lt;
    if (logits)
      lt = stored_block(logits, g, blk);  // probabilities overwrite them: each block is read once
    else
      block_logits(keys, j0, a, g, qt, s);
    for (int64_t j = 0; j < nscored; ++j) {
      float* row = lt + j * g.Rp;
      for (int64_t r = 0; r < g.Rp; ++r) row[r] = exp_nonpositive(row[r] - shift[r]) * inv_l[r];
    }
    mask_block(lt, g.Rp, j0, lane_query, a.N, a.Tq, 0.0f);
    for (int64_t j = 0; j < nscored; ++j) {
      const float* row = lt + j * g.Rp;
      float reduced = 0.0f;
      for (int64_t hg = 0; hg < g.G; ++hg) {
        const float* head = row + hg * a.Tq;
        const float per_head =
            (a.query_reduce == Reduce::kMax) ? lane_max(head, a.Tq) : lane_sum(head, a.Tq) / float(a.Tq);
        reduced = hg == 0 ? per_head : (a.gqa_reduce == Reduce::kMax) ? nan_max(reduced, per_head) : reduced + per_head;
      }
      raw[j0 + j] = (a.gqa_reduce == Reduce::kMax) ? reduced : reduced * inv_heads;
    }
  }
}

// scores[j] = pool of raw over [j - k/2, j + k/2] ∩ [0, S): max ignores the padding (NaN wins,
// as in torch's max_pool1d), avg divides by k (count_include_pad).
void pool_row(const float* raw, float* scores, int64_t S, int64_t kernel, bool pool_max) {
  const int64_t half = kernel / 2;
  for (int64_t j = 0; j < S; ++j) {
    const int64_t lo = std::max<int64_t>(0, j - half), hi = std::min(S - 1, j + half);
    float acc = raw[lo];
    for (int64_t t = lo + 1; t <= hi; ++t) acc = pool_max ? nan_max(acc, raw[t]) : acc + raw[t];
    scores[j] = pool_max ? acc : acc / float(kernel);
  }
}

template <class T>
void run(const AttentionArgs& a, int num_threads) {
  const Geometry g = geometry(a);
  const bool with_out = a.out != nullptr;
  const bool pooled = a.pool_kernel > 1;
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();

  FloatBuffer qt = alloc_floats(g.BG * a.D * g.Rp);
  FloatBuffer part_m = alloc_floats(g.BG * g.nchunks * g.Rp);
  FloatBuffer part_l = alloc_floats(g.BG * g.nchunks * g.Rp);
  FloatBuffer part_o = with_out ? alloc_floats(g.BG * g.nchunks * g.Dv * g.Rp) : nullptr;
  FloatBuffer shift = alloc_floats(g.BG * g.Rp);
  FloatBuffer inv_l = alloc_floats(g.BG * g.Rp);
  FloatBuffer raw = pooled ? alloc_floats(g.BG * a.S) : nullptr;
  const int64_t group_logits = g.score_blocks * kKeyBlock * g.Rp;
  FloatBuffer logits = g.store_logits ? alloc_floats(g.wave * group_logits) : nullptr;
  float* raw_scores = pooled ? raw.get() : a.scores;
  const int64_t raw_row = pooled ? a.S : a.scores_row;
  const int64_t scratch_floats = round_up(Scratch::floats(a, g), 16);
  FloatBuffer scratch = alloc_floats(scratch_floats * threads);
  std::unique_ptr<int32_t[]> lane_query(new int32_t[g.Rp]);
  for (int64_t r = 0; r < g.Rp; ++r) lane_query[r] = int32_t(r < g.R ? r % a.Tq : a.Tq - 1);

#pragma omp parallel num_threads(threads)
  {
    Scratch s(scratch.get() + scratch_floats * omp_get_thread_num(), a, g);

    // Qt[bg][d][r] = scale · q[b, group head, query, d]
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < g.BG; ++bg) {
      const int64_t b = bg / a.Hkv, h = bg % a.Hkv;
      float* dst = qt.get() + bg * a.D * g.Rp;
      std::fill(dst, dst + a.D * g.Rp, 0.0f);
      for (int64_t r = 0; r < g.R; ++r) {
        const T* src = static_cast<const T*>(a.q) + b * a.q_sb + (h * g.G + r / a.Tq) * a.q_sh + (r % a.Tq) * a.q_st;
        for (int64_t d = 0; d < a.D; ++d) dst[d * g.Rp + r] = to_float(src[d]) * a.scale;
      }
    }

    // Every thread runs every wave; the work-shared loops end in barriers.
    for (int64_t bg0 = 0; bg0 < g.BG; bg0 += g.wave) {
      const int64_t groups = std::min(g.wave, g.BG - bg0);
      const auto group_store = [&](int64_t bg) {
        return g.store_logits ? logits.get() + (bg - bg0) * group_logits : nullptr;
      };

#pragma omp for schedule(dynamic, 1)
      for (int64_t item = bg0 * g.nchunks; item < (bg0 + groups) * g.nchunks; ++item) {
        const int64_t bg = item / g.nchunks, c = item % g.nchunks;
        stats_chunk<T>(a, g, qt.get() + bg * a.D * g.Rp, lane_query.get(), bg, c, s, part_m.get() + item * g.Rp,
                       part_l.get() + item * g.Rp, with_out ? part_o.get() + item * g.Dv * g.Rp : nullptr,
                       group_store(bg));
      }

#pragma omp for schedule(static)
      for (int64_t bg = bg0; bg < bg0 + groups; ++bg)
        combine_group<T>(a, g, bg, part_m.get() + bg * g.nchunks * g.Rp, part_l.get() + bg * g.nchunks * g.Rp,
                         with_out ? part_o.get() + bg * g.nchunks * g.Dv * g.Rp : nullptr, shift.get() + bg * g.Rp,
                         inv_l.get() + bg * g.Rp);

#pragma omp for schedule(dynamic, 1)
      for (int64_t item = bg0 * g.score_chunks; item < (bg0 + groups) * g.score_chunks; ++item) {
        const int64_t bg = item / g.score_chunks, c = item % g.score_chunks;
        score_chunk<T>(a, g, qt.get() + bg * a.D * g.Rp, lane_query.get(), bg, c, s, shift.get() + bg * g.Rp,
                       inv_l.get() + bg * g.Rp, group_store(bg), raw_scores + bg * raw_row);
      }
    }

    if (pooled) {
#pragma omp for schedule(static)
      for (int64_t bg = 0; bg < g.BG; ++bg)
        pool_row(raw.get() + bg * a.S, a.scores + bg * a.scores_row, a.S, a.pool_kernel, a.pool_type == PoolType::kMax);
    }
  }
}

}  // namespace

void attention(const AttentionArgs& args, int num_threads) {
  dispatch_dtype(args.dtype, [&](auto tag) { run<decltype(tag)>(args, num_threads); });
}

// One sequence at a time through the dense computation, its keys read through its block table.
void paged_attention(const PagedAttentionArgs& p, int num_threads) {
  const AttentionArgs& all = p.a;
  const int64_t elem = all.dtype == DType::kFloat32 ? 4 : 2;
  std::fill(all.scores, all.scores + all.B * all.Hkv * all.scores_row, kNegInf);
  for (int64_t b = 0; b < all.B; ++b) {
    AttentionArgs a = all;
    a.B = 1;
    a.N = p.seq_lens[b];
    a.S = p.num_scored[b];
    a.Tq = p.q_offsets[b + 1] - p.q_offsets[b];
    a.q = static_cast<const char*>(all.q) + p.q_offsets[b] * all.q_st * elem;
    if (a.out != nullptr) a.out = static_cast<char*>(all.out) + p.q_offsets[b] * all.out_st * elem;
    a.scores = all.scores + b * all.Hkv * all.scores_row;
    a.k_blocks = all.k_blocks + b * all.blocks_stride;
    attention(a, num_threads);
  }
}

}  // namespace lookaheadkv::cpu::LOOKAHEADKV_ISA
