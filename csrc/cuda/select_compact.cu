// select_compact (docs/ops.md §4): per (batch, KV head) row keep the sinks, the unscored tail and
// the best-scoring candidates, in position order, and gather their K/V rows; paged_select_compact
// (§6): the same selection per (sequence, KV head), the kept rows moved in place.
//
// Order: scores become orderable uint32 keys (-0.0 -> +0.0, NaN -> 0 = below -inf, larger score
// -> larger key). A radix select (4 passes of 8 bits, from the top) finds the key tau of the
// pick-th best candidate and how many candidates equal to tau to take (`take_eq`, lowest positions
// first). A candidate j is then kept iff key > tau, or key == tau and fewer than take_eq equal
// keys precede it, and its output slot has the closed form
//   slot(j) = min(j, sinks) + #{greater before j} + min(#{equal before j}, take_eq) + max(0, j - S)
// (every kept position, sink, candidate or tail, lands at the count of kept positions before it),
// so compaction needs one block scan of (greater, equal) counts per tile, in position order.
//   row kernel: one 512-thread block per row runs the 4 passes on a shared-memory histogram over
//     its candidates (held in registers when they fit one tile of 8192, re-read per pass
//     otherwise), then compacts tile by tile. Dense rows with <= 8192 candidates and N <= 32768
//     use it, and every paged row (its sizes are known on the device only).
//   long dense rows: 4 histogram launches over 4096-candidate tiles (shared-memory histograms
//     merged by integer atomics; the last block to arrive picks the digit, so no extra launch), one
//     launch counting (greater, equal) per tile, one compaction launch (each tile sums the counts
//     of the tiles before it). Integer counts are exact, so `kept` is bit-identical to the reference.
// Gather (dense): each warp copies its kept rows one at a time, lanes moving 16-byte vectors when
// the rows are 16-byte aligned (element-wise otherwise), into contiguous outputs.
// Move (paged): after the row's kept positions are written, rounds of consecutive slots are staged
// through shared memory (see move_kept_rows for why no move reads an overwritten slot).
#include "device.cuh"

namespace lookaheadkv {
namespace cuda {
namespace {

constexpr int kItems = 16;                    // positions per thread per tile
constexpr int kTileThreads = 256;             // long-row blocks
constexpr int kTile = kTileThreads * kItems;  // 4096 positions
constexpr int kRowThreads = 512;              // short-row blocks (one per row)
constexpr int kRowCapacity = kRowThreads * kItems;
constexpr uint32_t kNoKey = 0xffffffffu;  // tau when nothing is picked (no key reaches it)

struct RowState {  // long path, per row; zeroed before the first histogram pass
  uint32_t hist[256];
  uint32_t prefix, take_eq, arrivals, unused;
};

// paged_select_compact's K/V entries and index tensors (block table row b, slot j, head h at
// k + table[b][j / block_size]·k_sblk + (j % block_size)·k_sn + h·k_sh bytes).
struct PagedRows {
  const int32_t* block_table;  // [B][max_blocks]
  const int32_t* seq_lens;
  const int32_t* num_scored;
  const int32_t* budgets;
  int32_t* new_lens;
  int32_t* kept;  // [B][Hkv][capacity]
  int64_t max_blocks, num_blocks, num_sink;
  int64_t k_sblk, v_sblk;  // bytes
  int block_size, capacity, score_width;
};

struct Geometry {
  const float* scores;
  int64_t s_sb, s_sh, s_ss;  // elements
  const unsigned char* k;
  int64_t k_sb, k_sh, k_sn;  // bytes
  const unsigned char* v;
  int64_t v_sb, v_sh, v_sn;       // bytes
  int Hkv, N, S, M, sinks, pick;  // sinks = min(num_sink, S); pick = M - sinks - (N - S)
  int row_bytes, elem_size, D;
  bool k_vec, v_vec, keep_all;
  unsigned char* k_out;
  unsigned char* v_out;
  int64_t* kept;
  PagedRows paged;
};

// One (batch row or sequence, KV head) of the selection.
struct Row {
  const float* scores;  // its scores, s_ss apart
  int64_t s_ss;
  int N, S, M, sinks, pick;
  bool keep_all;
};

__device__ __forceinline__ Row dense_row(const Geometry& g, int row) {
  const int b = row / g.Hkv, h = row % g.Hkv;
  return {g.scores + b * g.s_sb + h * g.s_sh, g.s_ss, g.N, g.S, g.M, g.sinks, g.pick, g.keep_all};
}

__device__ __forceinline__ uint32_t order_key(float f) {
  if (f != f) return 0u;
  uint32_t u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint32_t candidate_key(const Row& r, int pos) { return order_key(r.scores[pos * r.s_ss]); }

// The histogram bin (8 bits at `shift`) of the pick-th largest key, given the keys matching the
// digits chosen so far: walking bins from the top, the first whose running count reaches
// `remaining`. Returns the digit and the rank left inside that bin. All threads must call.
template <int THREADS>
__device__ __forceinline__ void select_digit(const uint32_t* hist, uint32_t remaining, uint32_t* scratch,
                                             uint32_t& digit, uint32_t& remaining_in_bin) {
  static_assert(THREADS >= 256, "one thread per bin");
  const uint32_t count = threadIdx.x < 256 ? hist[255 - threadIdx.x] : 0u;
  uint32_t total;
  const uint32_t above = block_exclusive_scan<THREADS>(count, scratch, total);
  uint32_t* result = scratch + THREADS / 32 + 1;
  if (threadIdx.x < 256 && above < remaining && above + count >= remaining) {
    result[0] = 255 - threadIdx.x;
    result[1] = remaining - above;
  }
  __syncthreads();
  digit = result[0];
  remaining_in_bin = result[1];
  __syncthreads();
}

__device__ __forceinline__ void copy_row(const unsigned char* src, unsigned char* dst, const Geometry& g, bool vec) {
  const int lane = threadIdx.x & 31;
  if (vec) {
    for (int off = lane * 16; off < g.row_bytes; off += 32 * 16) {
      *reinterpret_cast<uint4*>(dst + off) = __ldg(reinterpret_cast<const uint4*>(src + off));
    }
  } else if (g.elem_size == 4) {
    for (int e = lane; e < g.D; e += 32)
      reinterpret_cast<uint32_t*>(dst)[e] = reinterpret_cast<const uint32_t*>(src)[e];
  } else {
    for (int e = lane; e < g.D; e += 32)
      reinterpret_cast<uint16_t*>(dst)[e] = reinterpret_cast<const uint16_t*>(src)[e];
  }
}

// Keep/slot for positions [tile_begin, tile_begin + THREADS*kItems) of `row`; thread i owns the
// kItems consecutive positions from tile_begin + i*kItems. before_gt/before_eq count the greater /
// equal candidates before the tile; returns the tile's (greater | equal << 16) totals. Dense: the
// kept rows are gathered into the outputs here. Paged: only the kept positions are recorded (int32,
// rows of `capacity`); the rows move once the whole row's positions are known.
template <int THREADS, bool kPaged>
__device__ __forceinline__ uint32_t compact_tile(const Geometry& g, const Row& r, int row, int tile_begin, uint32_t tau,
                                                 uint32_t take_eq, uint32_t before_gt, uint32_t before_eq,
                                                 uint32_t* scratch) {
  const int first = tile_begin + threadIdx.x * kItems;
  uint32_t gt_bits = 0, eq_bits = 0;
  if (!r.keep_all) {
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const int pos = first + it;
      if (pos >= r.sinks && pos < r.S) {
        const uint32_t key = candidate_key(r, pos);
        gt_bits |= static_cast<uint32_t>(key > tau) << it;
        eq_bits |= static_cast<uint32_t>(key == tau) << it;
      }
    }
  }
  uint32_t tile_total;
  const uint32_t excl = block_exclusive_scan<THREADS>(__popc(gt_bits) | (__popc(eq_bits) << 16), scratch, tile_total);
  uint32_t gt_before = before_gt + (excl & 0xffffu), eq_before = before_eq + (excl >> 16);

  int slot[kItems];
#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const int pos = first + it;
    int s = -1;
    if (pos < r.N) {
      if (r.keep_all || pos < r.sinks) {
        s = pos;
      } else if (pos >= r.S) {
        s = r.M - (r.N - pos);
      } else {
        const bool gt = (gt_bits >> it) & 1u, eq = (eq_bits >> it) & 1u;
        if (gt || (eq && eq_before < take_eq)) s = r.sinks + static_cast<int>(gt_before + min(eq_before, take_eq));
        gt_before += gt;
        eq_before += eq;
      }
    }
    slot[it] = s;
  }

  if constexpr (kPaged) {
    int32_t* kept = g.paged.kept + static_cast<int64_t>(row) * g.paged.capacity;
#pragma unroll
    for (int it = 0; it < kItems; ++it)
      if (slot[it] >= 0) kept[slot[it]] = first + it;
  } else {
    const int row_b = row / g.Hkv, row_h = row % g.Hkv;
    const unsigned char* kr = g.k + row_b * g.k_sb + row_h * g.k_sh;
    const unsigned char* vr = g.v + row_b * g.v_sb + row_h * g.v_sh;
    const int64_t out_row = static_cast<int64_t>(row) * g.M;
    const int warp_first = tile_begin + (threadIdx.x & ~31) * kItems;
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      if (slot[it] >= 0) g.kept[out_row + slot[it]] = first + it;
      uint32_t pending = __ballot_sync(0xffffffffu, slot[it] >= 0);
      while (pending) {
        const int src_lane = __ffs(pending) - 1;
        pending &= pending - 1;
        const int pos = warp_first + src_lane * kItems + it;
        const int64_t s = __shfl_sync(0xffffffffu, slot[it], src_lane);
        copy_row(kr + pos * g.k_sn, g.k_out + (out_row + s) * g.row_bytes, g, g.k_vec);
        copy_row(vr + pos * g.v_sn, g.v_out + (out_row + s) * g.row_bytes, g, g.v_vec);
      }
    }
  }
  return tile_total;
}

// The selection of paged row `row` = (sequence b, head h) from the sequence's index data, which is
// checked here (every head's block reaches the same verdict): lengths, budget and every block id
// the sequence uses. All threads must call; false when the sequence is invalid.
__device__ __forceinline__ bool paged_row(const Geometry& g, int row, Row& r, int* flag) {
  const PagedRows& pg = g.paged;
  const int b = row / g.Hkv, h = row % g.Hkv;
  const int N = pg.seq_lens[b], S = pg.num_scored[b], budget = pg.budgets[b];
  const int sinks = static_cast<int>(S < pg.num_sink ? S : pg.num_sink);
  bool ok = N >= 1 && N <= pg.capacity && S >= 1 && S <= N && S <= pg.score_width && budget >= 1;
  ok = ok && (budget >= N || budget >= sinks + (N - S));  // the always-kept positions fit
  const int used_blocks = ok ? (N + pg.block_size - 1) / pg.block_size : 0;
  ok = block_ids_in_range(pg.block_table + b * pg.max_blocks, used_blocks, pg.num_blocks, flag) && ok;
  r.scores = g.scores + b * g.s_sb + h * g.s_sh;
  r.s_ss = g.s_ss;
  r.N = N;
  r.S = S;
  r.keep_all = budget >= N;
  r.M = r.keep_all ? N : budget;
  r.sinks = sinks;
  r.pick = r.keep_all ? 0 : r.M - sinks - (N - S);
  return ok;
}

constexpr int kStageBytes = 32 * 1024;  // shared memory staging one round of moves

// One unit of a K/V row: 16 bytes (rows 16-byte aligned) or one 4- or 2-byte element. Plain loads:
// this kernel writes the caches it reads.
__device__ __forceinline__ void copy_unit(unsigned char* dst, const unsigned char* src, int unit) {
  if (unit == 16) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  } else if (unit == 4) {
    *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(src);
  } else {
    *reinterpret_cast<uint16_t*>(dst) = *reinterpret_cast<const uint16_t*>(src);
  }
}

// Moves the kept rows of paged row `row` (sequence b, head h), K and V, to slots [0, M) in place:
// slot m receives slot kept[m] (the row's kept positions, already written). Why no move reads an
// overwritten slot: kept ascends, so kept[m] >= m. The moves run in rounds of consecutive slots
// [m0, m1); a round first reads all its sources into shared memory, then (after a barrier) writes
// all its destinations. A round writes slots in [m0, m1); every later round reads slots kept[m] >=
// m >= m1, never one written before, and every earlier round finished its reads before this round
// started (barrier). Within a round the reads complete before any write. Slots map to distinct
// cache entries (the caller's blocks are the sequence's own) and each head owns its entries.
__device__ __forceinline__ void move_kept_rows(const Geometry& g, const Row& r, int row) {
  __shared__ __align__(16) unsigned char stage[kStageBytes];
  const PagedRows& pg = g.paged;
  const int b = row / g.Hkv, h = row % g.Hkv;
  const int32_t* kept = pg.kept + static_cast<int64_t>(row) * pg.capacity;
  const int32_t* table = pg.block_table + b * pg.max_blocks;
  // The caches are the op's in-place (mutable) arguments.
  unsigned char* k = const_cast<unsigned char*>(g.k);
  unsigned char* v = const_cast<unsigned char*>(g.v);
  const auto entry = [&](bool value, int j) {
    const int64_t block = table[j / pg.block_size], slot = j % pg.block_size;
    return value ? v + block * pg.v_sblk + slot * g.v_sn + h * g.v_sh
                 : k + block * pg.k_sblk + slot * g.k_sn + h * g.k_sh;
  };
  const int unit = g.k_vec && g.v_vec ? 16 : g.elem_size;
  const int units = g.row_bytes / unit;  // per row
  const int slots = kStageBytes / (2 * g.row_bytes);
  for (int m0 = r.sinks; m0 < r.M; m0 += slots) {  // the sinks stay where they are
    const int count = min(slots, r.M - m0) * 2 * units;
    for (int u = threadIdx.x; u < count; u += kRowThreads) {
      const int m = m0 + u / (2 * units), w = u % units;
      const bool value = (u / units) & 1;
      const int src = kept[m];
      if (src != m) copy_unit(stage + u * unit, entry(value, src) + w * unit, unit);
    }
    __syncthreads();
    for (int u = threadIdx.x; u < count; u += kRowThreads) {
      const int m = m0 + u / (2 * units), w = u % units;
      const bool value = (u / units) & 1;
      if (kept[m] != m) copy_unit(entry(value, m) + w * unit, stage + u * unit, unit);
    }
    __syncthreads();
  }
}

// The whole selection and compaction of one row in one block: a dense row with few candidates, or
// any paged row (then also the in-place move, the -1 tail of `kept` and the new length).
template <bool kPaged>
__global__ void __launch_bounds__(kRowThreads) select_row_kernel(const Geometry g) {
  __shared__ uint32_t hist[256];
  __shared__ uint32_t scratch[kRowThreads / 32 + 3];
  const int row = blockIdx.x;
  Row r;
  if constexpr (kPaged) {
    __shared__ int flag;
    const bool valid = paged_row(g, row, r, &flag);
    int32_t* kept = g.paged.kept + static_cast<int64_t>(row) * g.paged.capacity;
    for (int m = valid ? r.M + static_cast<int>(threadIdx.x) : static_cast<int>(threadIdx.x); m < g.paged.capacity;
         m += kRowThreads)
      kept[m] = -1;
    if (threadIdx.x == 0 && row % g.Hkv == 0) g.paged.new_lens[row / g.Hkv] = valid ? r.M : -1;
    if (!valid) return;  // neither read nor written
  } else {
    r = dense_row(g, row);
  }
  const int candidates = r.S - r.sinks;
  const bool cached = candidates <= kRowCapacity;  // keys stay in registers across the passes
  uint32_t key[kItems];
  const auto load_keys = [&](int tile) {
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const int c = tile + threadIdx.x * kItems + it;
      key[it] = c < candidates ? candidate_key(r, r.sinks + c) : 0u;
    }
  };
  load_keys(0);
  uint32_t tau = kNoKey, take_eq = 0;
  if (r.pick > 0) {
    uint32_t prefix = 0, remaining = static_cast<uint32_t>(r.pick);
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = 24 - 8 * pass;
      const uint32_t high = pass == 0 ? 0u : (0xffffffffu << (shift + 8));
      if (threadIdx.x < 256) hist[threadIdx.x] = 0;
      __syncthreads();
      for (int tile = 0; tile < candidates; tile += kRowCapacity) {
        if (!cached) load_keys(tile);
#pragma unroll
        for (int it = 0; it < kItems; ++it) {
          const int c = tile + threadIdx.x * kItems + it;
          if (c < candidates && (key[it] & high) == prefix) atomicAdd(&hist[(key[it] >> shift) & 0xffu], 1u);
        }
      }
      __syncthreads();
      uint32_t digit;
      select_digit<kRowThreads>(hist, remaining, scratch, digit, remaining);
      prefix |= digit << shift;
    }
    tau = prefix;
    take_eq = remaining;
  }
  uint32_t before_gt = 0, before_eq = 0;
  for (int tile = 0; tile < r.N; tile += kRowThreads * kItems) {
    const uint32_t totals =
        compact_tile<kRowThreads, kPaged>(g, r, row, tile, tau, take_eq, before_gt, before_eq, scratch);
    before_gt += totals & 0xffffu;
    before_eq += totals >> 16;
  }
  if constexpr (kPaged) {
    if (r.keep_all) return;  // untouched, bit for bit
    __syncthreads();         // the row's kept positions visible to every thread
    move_kept_rows(g, r, row);
  }
}

// Long rows, one radix pass: histogram of the candidates in this block's tile whose higher digits
// match the prefix; the last block of the row to finish picks the digit for the next pass.
__global__ void __launch_bounds__(kTileThreads) select_hist_kernel(const Geometry g, RowState* states, int pass) {
  __shared__ uint32_t hist[256];
  __shared__ uint32_t scratch[kTileThreads / 32 + 3];
  __shared__ bool last;
  const int row = blockIdx.y;
  RowState* state = states + row;
  const uint32_t prefix = pass == 0 ? 0u : state->prefix;
  const uint32_t remaining = pass == 0 ? static_cast<uint32_t>(g.pick) : state->take_eq;
  const int shift = 24 - 8 * pass;
  const uint32_t high = pass == 0 ? 0u : (0xffffffffu << (shift + 8));
  const Row r = dense_row(g, row);
  const int candidates = g.S - g.sinks;

  hist[threadIdx.x] = 0;
  __syncthreads();
#pragma unroll 4
  for (int it = 0; it < kItems; ++it) {
    const int c = blockIdx.x * kTile + it * kTileThreads + threadIdx.x;  // coalesced
    if (c < candidates) {
      const uint32_t key = candidate_key(r, g.sinks + c);
      if ((key & high) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
    }
  }
  __syncthreads();
  if (hist[threadIdx.x] != 0) atomicAdd(&state->hist[threadIdx.x], hist[threadIdx.x]);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&state->arrivals, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  hist[threadIdx.x] = __ldcg(&state->hist[threadIdx.x]);
  state->hist[threadIdx.x] = 0;  // ready for the next pass
  __syncthreads();
  uint32_t digit, remaining_in_bin;
  select_digit<kTileThreads>(hist, remaining, scratch, digit, remaining_in_bin);
  if (threadIdx.x == 0) {
    state->prefix = prefix | (digit << shift);
    state->take_eq = remaining_in_bin;
    state->arrivals = 0;
  }
}

__device__ __forceinline__ void threshold(const Geometry& g, const RowState* state, uint32_t& tau, uint32_t& take_eq) {
  tau = g.pick > 0 ? state->prefix : kNoKey;
  take_eq = g.pick > 0 ? state->take_eq : 0u;
}

// Long rows: (greater, equal) candidate counts of each 4096-position tile.
__global__ void __launch_bounds__(kTileThreads)
    select_count_kernel(const Geometry g, const RowState* states, uint32_t* tile_counts) {
  __shared__ uint32_t scratch[kTileThreads / 32 + 1];
  const int row = blockIdx.y;
  uint32_t tau, take_eq;
  threshold(g, states + row, tau, take_eq);
  const Row r = dense_row(g, row);
  uint32_t counts = 0;
#pragma unroll 4
  for (int it = 0; it < kItems; ++it) {
    const int pos = blockIdx.x * kTile + it * kTileThreads + threadIdx.x;
    if (pos >= g.sinks && pos < g.S) {
      const uint32_t key = candidate_key(r, pos);
      counts += (key > tau ? 1u : 0u) | (key == tau ? 1u << 16 : 0u);
    }
  }
  uint32_t total;
  block_exclusive_scan<kTileThreads>(counts, scratch, total);
  if (threadIdx.x == 0) tile_counts[static_cast<int64_t>(row) * gridDim.x + blockIdx.x] = total;
}

// Long rows (and budget >= N): compaction and gather of one tile.
__global__ void __launch_bounds__(kTileThreads)
    select_compact_kernel(const Geometry g, const RowState* states, const uint32_t* tile_counts) {
  __shared__ uint32_t scratch[kTileThreads / 32 + 1];
  const int row = blockIdx.y;
  uint32_t tau = kNoKey, take_eq = 0, before_gt = 0, before_eq = 0;
  if (!g.keep_all) {
    threshold(g, states + row, tau, take_eq);
    const uint32_t* counts = tile_counts + static_cast<int64_t>(row) * gridDim.x;
    for (unsigned t = 0; t < blockIdx.x; ++t) {
      before_gt += counts[t] & 0xffffu;
      before_eq += counts[t] >> 16;
    }
  }
  compact_tile<kTileThreads, false>(g, dense_row(g, row), row, blockIdx.x * kTile, tau, take_eq, before_gt, before_eq,
                                    scratch);
}

struct Layout {
  int64_t rows, tiles;
  size_t states_offset, counts_offset, bytes;
};

Layout make_layout(int64_t B, int64_t Hkv, int64_t N) {
  Layout l;
  l.rows = B * Hkv;
  l.tiles = ceil_div(N, kTile);
  WorkspaceLayout ws;
  l.states_offset = ws.take(sizeof(RowState) * l.rows);
  l.counts_offset = ws.take(sizeof(uint32_t) * l.rows * l.tiles);
  l.bytes = ws.bytes;
  return l;
}

void check_sizes(int64_t B, int64_t Hkv, int64_t N, int64_t S, int64_t budget, int64_t num_sink) {
  check_arg(B >= 1 && Hkv >= 1 && N >= 1 && S >= 1 && S <= N, "select_compact: need B, Hkv >= 1 and 1 <= S <= N");
  check_arg(budget >= 1 && num_sink >= 0, "select_compact: budget must be >= 1 and num_sink >= 0");
  check_arg(N < (int64_t{1} << 30) && B * Hkv <= 65535, "select_compact: N must be < 2^30 and B*Hkv <= 65535");
  const int64_t protected_count = std::min(num_sink, S) + (N - S);
  check_arg(budget >= N || budget >= protected_count, "select_compact: budget is below the always-kept positions");
}

}  // namespace

size_t select_workspace_bytes(int64_t B, int64_t Hkv, int64_t N, int64_t S, int64_t budget, int64_t num_sink) {
  check_sizes(B, Hkv, N, S, budget, num_sink);
  return make_layout(B, Hkv, N).bytes;
}

void select_compact(const SelectArgs& a, void* workspace, Stream stream) {
  check_sizes(a.B, a.Hkv, a.N, a.S, a.budget, a.num_sink);
  check_arg(a.elem_size == 2 || a.elem_size == 4, "select_compact: element size must be 2 or 4 bytes");
  check_arg(a.D >= 1 && a.D * a.elem_size <= (int64_t{1} << 20), "select_compact: bad head_dim");
  const Layout l = make_layout(a.B, a.Hkv, a.N);
  char* ws = static_cast<char*>(workspace);
  RowState* states = reinterpret_cast<RowState*>(ws + l.states_offset);
  uint32_t* tile_counts = reinterpret_cast<uint32_t*>(ws + l.counts_offset);

  Geometry g{};
  g.scores = a.scores;
  g.s_sb = a.s_sb;
  g.s_sh = a.s_sh;
  g.s_ss = a.s_ss;
  const int64_t es = a.elem_size;
  g.k = static_cast<const unsigned char*>(a.k);
  g.k_sb = a.k_sb * es;
  g.k_sh = a.k_sh * es;
  g.k_sn = a.k_sn * es;
  g.v = static_cast<const unsigned char*>(a.v);
  g.v_sb = a.v_sb * es;
  g.v_sh = a.v_sh * es;
  g.v_sn = a.v_sn * es;
  g.Hkv = static_cast<int>(a.Hkv);
  g.N = static_cast<int>(a.N);
  g.S = static_cast<int>(a.S);
  g.keep_all = a.budget >= a.N;
  g.M = static_cast<int>(std::min(a.budget, a.N));
  g.sinks = static_cast<int>(std::min(a.num_sink, a.S));
  g.pick = g.keep_all ? 0 : g.M - g.sinks - (g.N - g.S);
  g.D = static_cast<int>(a.D);
  g.elem_size = static_cast<int>(es);
  g.row_bytes = static_cast<int>(a.D * es);
  const bool row_vec = g.row_bytes % 16 == 0 && aligned16(a.k_out) && aligned16(a.v_out);
  g.k_vec = row_vec && rows_aligned16(a.k, 1, {{a.B, g.k_sb}, {a.Hkv, g.k_sh}, {a.N, g.k_sn}});
  g.v_vec = row_vec && rows_aligned16(a.v, 1, {{a.B, g.v_sb}, {a.Hkv, g.v_sh}, {a.N, g.v_sn}});
  g.k_out = static_cast<unsigned char*>(a.k_out);
  g.v_out = static_cast<unsigned char*>(a.v_out);
  g.kept = a.kept;

  const unsigned rows = static_cast<unsigned>(l.rows), tiles = static_cast<unsigned>(l.tiles);
  // One block per row when its candidates fit the block's registers and it has few positions to
  // compact (the block compacts all N of them, tile after tile).
  if (!g.keep_all && g.S - g.sinks <= kRowCapacity && g.N <= 4 * kRowCapacity) {
    launch("select_row_kernel", select_row_kernel<false>, rows, kRowThreads, 0, stream, g);
    return;
  }
  if (!g.keep_all) {
    if (g.pick > 0) {
      memset_async(states, 0, sizeof(RowState) * l.rows, stream);
      const unsigned cand_tiles = static_cast<unsigned>(ceil_div(g.S - g.sinks, kTile));
      for (int pass = 0; pass < 4; ++pass) {
        launch("select_hist_kernel", select_hist_kernel, dim3(cand_tiles, rows), kTileThreads, 0, stream, g, states,
               pass);
      }
    }
    launch("select_count_kernel", select_count_kernel, dim3(tiles, rows), kTileThreads, 0, stream, g, states,
           tile_counts);
  }
  launch("select_compact_kernel", select_compact_kernel, dim3(tiles, rows), kTileThreads, 0, stream, g, states,
         tile_counts);
}

size_t paged_select_workspace_bytes(int64_t B, int64_t Hkv, int64_t capacity) {
  check_arg(B >= 1 && Hkv >= 1 && capacity >= 1 && capacity < (int64_t{1} << 30),
            "paged_select_compact: need B, Hkv >= 1 and 1 <= capacity < 2^30");
  return 0;  // one block per (sequence, head) does everything in shared memory
}

void paged_select_compact(const PagedSelectArgs& a, void* /*workspace: none needed*/, Stream stream) {
  const int64_t capacity = a.max_blocks * a.block_size;
  paged_select_workspace_bytes(a.B, a.Hkv, capacity);
  check_arg(a.elem_size == 2 || a.elem_size == 4, "paged_select_compact: element size must be 2 or 4 bytes");
  check_arg(a.D >= 1 && 2 * a.D * a.elem_size <= kStageBytes, "paged_select_compact: head_dim too large");
  check_arg(a.B * a.Hkv < (int64_t{1} << 31) && a.score_width >= 1 && a.num_blocks >= 1 && a.num_sink >= 0,
            "paged_select_compact: bad sizes");

  Geometry g{};
  g.scores = a.scores;
  g.s_sb = a.s_sb;
  g.s_sh = a.s_sh;
  g.s_ss = a.s_ss;
  const int64_t es = a.elem_size;
  g.k = static_cast<const unsigned char*>(a.k);
  g.k_sh = a.k_sh * es;
  g.k_sn = a.k_sn * es;
  g.v = static_cast<const unsigned char*>(a.v);
  g.v_sh = a.v_sh * es;
  g.v_sn = a.v_sn * es;
  g.Hkv = static_cast<int>(a.Hkv);
  g.D = static_cast<int>(a.D);
  g.elem_size = static_cast<int>(es);
  g.row_bytes = static_cast<int>(a.D * es);
  PagedRows& pg = g.paged;
  pg.block_table = a.block_table;
  pg.seq_lens = a.seq_lens;
  pg.num_scored = a.num_scored;
  pg.budgets = a.budgets;
  pg.new_lens = a.new_lens;
  pg.kept = a.kept;
  pg.max_blocks = a.max_blocks;
  pg.num_blocks = a.num_blocks;
  pg.num_sink = a.num_sink;
  pg.k_sblk = a.k_sblk * es;
  pg.v_sblk = a.v_sblk * es;
  pg.block_size = static_cast<int>(a.block_size);
  pg.capacity = static_cast<int>(capacity);
  pg.score_width = static_cast<int>(std::min<int64_t>(a.score_width, capacity));
  const bool row_vec = g.row_bytes % 16 == 0;
  g.k_vec = row_vec && rows_aligned16(a.k, 1, {{a.num_blocks, pg.k_sblk}, {a.block_size, g.k_sn}, {a.Hkv, g.k_sh}});
  g.v_vec = row_vec && rows_aligned16(a.v, 1, {{a.num_blocks, pg.v_sblk}, {a.block_size, g.v_sn}, {a.Hkv, g.v_sh}});
  launch("select_row_kernel<paged>", select_row_kernel<true>, static_cast<unsigned>(a.B * a.Hkv), kRowThreads, 0,
         stream, g);
}

}  // namespace cuda
}  // namespace lookaheadkv
