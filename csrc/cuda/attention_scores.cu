// attention_scores and lookahead_attention (docs/ops.md §2-3), and their paged forms (§5): one code
// path, the attention output P·V is a template mode of the same kernel, and a dense batch row is a
// sequence whose keys are rows of one strided tensor.
//
// Rows: the query rows of one KV head's GQA group are packed into the M dimension, each query head
// padded to a multiple of 16 rows (one m16 tile never spans two heads), so every K/V tile loaded
// into shared memory serves the whole group. A block holds up to kWarps m16 tiles (one per warp):
// whole heads when a head has <= kWarps tiles, else one segment of one head.
// Keys: the key axis is split into chunks, one block per (chunk, row block, batch x KV head), at
// most two blocks per multiprocessor (one wave); K/V tiles stream through shared memory with
// cp.async (double buffered; an element-wise fallback serves rows that are not 16-byte aligned).
// Each warp loads its own query rows the same way.
// Two passes, fp32 accumulation:
//   1. stats: per query row and chunk the max and sum of 2^(logit·log2e) over its visible keys
//      (online over the chunk's tiles) -> workspace.
//   2. main: each block combines every chunk's stats of its rows in chunk order (identical in every
//      block, no atomics), recomputes the logits, P = softmax, sums P over each head's rows per key
//      (fixed warp order) -> per-head column sums in the workspace (column maxima under
//      query_reduce = max, NaN-propagating); with the output it also accumulates P·V per chunk ->
//      workspace.
//   3. finalize: GQA reduce (mean/max over the group's heads of column sum / Tq, or of the column
//      max over the segments of a head under query_reduce = max) and pooling fused:
//      a block computes the reduced scores of its 256 keys plus a halo of pool_kernel/2 keys on each
//      side into shared memory, then pools.
//   4. (lookahead_attention) out = sum of the chunks' P·V in chunk order, rounded to q's dtype.
// bf16/fp16 run on tensor cores (mma.sync m16n8k16, ldmatrix); fp32 runs FMAs that compute exactly
// the elements of the same fragments, so masking, softmax and reductions are shared code.
// Scores are bit-identical with and without the output: the column sums depend only on the rows
// of a block and on pass 1, never on the key chunking of pass 2, and the arithmetic is pinned with
// explicit round-to-nearest intrinsics (no contraction differences between the two instantiations).
//
// Paged: K/V rows are read through the block table; each sequence's N_b, S_b, Tq_b and first query
// row come from the index tensors, read on the device only. A first kernel checks them (every block
// id a sequence uses, every length and query offset) into per-sequence descriptors and maps the
// grid's rows to (sequence, row-block unit); a sequence with invalid data is never read, its scores
// and output rows become NaN. The grids depend on sizes only: chunks cover the table's capacity (a
// chunk past a sequence's keys exits, or writes zero partial outputs), grid rows cover what any
// split of total_q query rows over B sequences can need (rows no sequence owns exit at once).
#include <cmath>

#include "device.cuh"

namespace lookaheadkv {
namespace cuda {
namespace {

enum Mode : int { kStats = 0, kScores = 1, kScoresOut = 2 };

template <typename T, int D_PAD>
struct Cfg {
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  // fp32 tiles are twice as large; the row block and key tile shrink so that every configuration
  // fits the 163 KiB of shared memory an sm_80 block may use.
  static constexpr int kWarps = (!kTensorCores && D_PAD == 256) ? 4 : 8;
  static constexpr int kKeyTile =
      kTensorCores ? (D_PAD == 256 ? 32 : 64) : (D_PAD == 64 ? 64 : (D_PAD == 128 ? 32 : 16));
  // Keys per compute step: the S/P fragments of a step are live next to the P·V accumulators, so
  // the output pass steps 16 keys at a time from D = 128 (2 blocks per multiprocessor at <= 128
  // registers) and every pass at D = 256.
  static constexpr int sub_keys(int mode) { return (D_PAD == 256 || (D_PAD == 128 && mode == kScoresOut)) ? 16 : 32; }
  static constexpr int kStride = D_PAD + 16 / static_cast<int>(sizeof(T));  // +16 bytes per smem row
  static constexpr int kRows = kWarps * 16;
  static constexpr int kThreads = kWarps * 32;
  // Two blocks per multiprocessor (<= 128 registers) for the tensor-core tiles up to D = 128; the
  // D = 256 and fp32 fragments need more registers than that.
  static constexpr int kMinBlocks = (kTensorCores && D_PAD <= 128) ? 2 : 1;

  static constexpr size_t q_bytes() { return sizeof(T) * kRows * kStride; }
  static constexpr size_t tile_bytes() { return sizeof(T) * kKeyTile * kStride; }
  static constexpr size_t colsum_bytes() { return sizeof(float) * kWarps * kKeyTile; }
  static constexpr size_t smem_bytes(Mode mode) {
    return q_bytes() + tile_bytes() * 2 * (mode == kScoresOut ? 2 : 1) + colsum_bytes() + 2 * sizeof(float) * kRows;
  }
};

// A paged sequence as checked on the device (paged_sequences_kernel).
struct SeqDesc {
  int32_t N, S, Tq;
  int32_t q_row0;  // its first row in q and out (q_offsets[b])
  int32_t seg0;    // its first segment slot in the column sums
  int32_t valid;   // index data in range (q_offsets' well-formedness is the separate flag)
};

// A paged grid row: sequence b's row-block unit `unit` (b < 0: no work).
struct UnitRef {
  int32_t b, unit;
};

struct Params {
  const void* q;
  int64_t q_sb, q_sh, q_st;
  const void* k;
  int64_t k_sb, k_sh, k_sn, k_sblk;
  const void* v;
  int64_t v_sb, v_sh, v_sn, v_sblk;
  const int32_t* blocks;  // paged: block table [B][blocks_stride]; null for dense K/V
  int64_t blocks_stride;
  int block_size;
  const SeqDesc* seqs;     // paged: per-sequence sizes; null for dense (N, S, Tq below)
  const UnitRef* units;    // paged: what each grid row (blockIdx.y) runs; null for dense
  const int* offsets_bad;  // paged: nonzero when q_offsets is malformed (no sequence's rows are known)
  int B, Hq, Hkv, G, Tq, N, D, S;
  int segment_rows;          // query rows of one head a block holds: 16 · warps
  float scale_log2;          // scale · log2(e): logits in base-2 units
  int chunk_keys;            // this pass's key chunks
  int stats_chunk_keys;      // the stats pass's chunk width
  int stats_chunks;          // the stats pass's chunk count (its workspace stride)
  bool q_vec, k_vec, v_vec;  // rows 16-byte aligned: cp.async
  bool query_max;            // query_reduce: column max instead of column sum
  float* ws_stats;           // [query rows][Hq][stats_chunks][2]: (max, sum)
  float* ws_col;             // [segment slots][Hq][col_stride]: column sums (maxima) of P
  int64_t col_stride;
  float* ws_out;  // [chunks][out's elements], each chunk laid out as out: P·V per chunk
  int64_t out_sb, out_sh, out_st, out_elems;
};

// One sequence's sizes as the kernels see them. Dense: the call's N, S, Tq for every batch row.
struct Sequence {
  int N, S, Tq;
  int q_row0;       // first query row in q and out, after the batch stride (dense: 0)
  int ws_row0;      // first query row in the workspace's stats
  int seg0, nseg;   // its segment slots in the column sums: a head's rows in blocks of segment_rows
  bool valid;       // the sequence is read and written
  bool rows_known;  // its query rows are well-defined (they get NaN outputs when it is invalid)
};

__device__ __forceinline__ Sequence sequence(const Params& p, int b) {
  if (p.seqs == nullptr) {
    const int nseg = (p.Tq + p.segment_rows - 1) / p.segment_rows;
    return {p.N, p.S, p.Tq, 0, b * p.Tq, b * nseg, nseg, true, true};
  }
  const SeqDesc d = p.seqs[b];
  const bool rows_known = *p.offsets_bad == 0;
  const int nseg = (d.Tq + p.segment_rows - 1) / p.segment_rows;
  return {d.N, d.S, d.Tq, d.q_row0, d.q_row0, d.seg0, nseg, rows_known && d.valid != 0, rows_known};
}

// How a group's query rows split into row-block units, from Tq alone: whole heads per unit when a
// head has <= warps m16 tiles, else one segment of warps tiles of one head per unit.
struct RowGeometry {
  int mtiles_per_head, heads_per_block, nseg, units;
};

__host__ __device__ __forceinline__ RowGeometry row_geometry(int Tq, int G, int warps) {
  RowGeometry r;
  r.mtiles_per_head = (Tq + 15) / 16;
  if (r.mtiles_per_head <= warps) {
    const int fit = warps / r.mtiles_per_head;
    r.heads_per_block = fit < G ? fit : G;
    r.nseg = 1;
    r.units = (G + r.heads_per_block - 1) / r.heads_per_block;
  } else {
    r.heads_per_block = 1;
    r.nseg = (r.mtiles_per_head + warps - 1) / warps;
    r.units = G * r.nseg;
  }
  return r;
}

// Combines two partial column reductions of P over query rows: a sum (query_reduce = mean) or a
// NaN-propagating max (query_reduce = max; P >= 0, so the zeros of hidden keys and padding rows
// never win).
__device__ __forceinline__ float reduce_rows(float a, float b, bool query_max) {
  return query_max ? nan_max(a, b) : __fadd_rn(a, b);
}

// Which query rows warp `warp` of row-block unit `unit` owns.
struct WarpRows {
  bool active;
  int head;   // within the GQA group
  int mtile;  // m16 tile within the head
  int seg;    // segment of the head
};

template <int kWarps>
__device__ __forceinline__ WarpRows warp_rows(const RowGeometry& geo, int G, int unit, int warp) {
  WarpRows r;
  if (geo.nseg == 1) {
    const int slot = warp / geo.mtiles_per_head;
    r.head = unit * geo.heads_per_block + slot;
    r.mtile = warp % geo.mtiles_per_head;
    r.seg = 0;
    r.active = slot < geo.heads_per_block && r.head < G;
  } else {
    r.head = unit / geo.nseg;
    r.seg = unit % geo.nseg;
    r.mtile = r.seg * kWarps + warp;
    r.active = r.mtile < geo.mtiles_per_head;
  }
  return r;
}

// ---- per-warp tile products: S = Q·Kᵀ (16 x KS keys) and O += P·V (16 x D_PAD) -----------------
// Fragments follow mma.sync m16n8k16: s[nt][e] is row g + 8*(e/2), key nt*8 + 2t + e%2 (g = lane/4,
// t = lane%4); o[dt][e] is row g + 8*(e/2), dim dt*8 + 2t + e%2.

template <typename T, int D_PAD>
struct TileMath {  // bf16 / fp16: tensor cores
  using C = Cfg<T, D_PAD>;
  static constexpr int kStride = C::kStride;

  template <int KS>
  __device__ __forceinline__ static void qk(const T* sq, const T* sk, float (&s)[KS / 8][4]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int nt = 0; nt < KS / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D_PAD / 16; ++ks) {
      uint32_t a[4];
      ldmatrix_x4(a, sq + (lane % 16) * kStride + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < KS / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, sk + (np * 16 + lane % 8 + (lane / 16) * 8) * kStride + ks * 16 + ((lane / 8) % 2) * 8);
        mma_16816<T>(s[2 * np], a, b[0], b[1]);
        mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);
      }
    }
  }

  // P (fp32 C fragments of two adjacent key tiles) becomes the A fragment of the next mma, rounded
  // to T; V^T fragments come from ldmatrix.trans of the [key][dim] tile.
  template <int KS>
  __device__ __forceinline__ static void pv(const float (&p)[KS / 8][4], const T* sv, float (&o)[D_PAD / 8][4]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < KS / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                             pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                             pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D_PAD / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sv + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kStride + dp * 16 + (lane / 16) * 8);
        mma_16816<T>(o[2 * dp], a, b[0], b[1]);
        mma_16816<T>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
  }
};

template <int D_PAD>
struct TileMath<float, D_PAD> {  // fp32: FMAs producing the same fragment elements
  using C = Cfg<float, D_PAD>;
  static constexpr int kStride = C::kStride;

  template <int KS>
  __device__ __forceinline__ static void qk(const float* sq, const float* sk, float (&s)[KS / 8][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < KS / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll 4
    for (int d = 0; d < D_PAD; d += 4) {
      const float4 qa = *reinterpret_cast<const float4*>(sq + g * kStride + d);
      const float4 qb = *reinterpret_cast<const float4*>(sq + (g + 8) * kStride + d);
#pragma unroll
      for (int nt = 0; nt < KS / 8; ++nt)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const float4 kv = *reinterpret_cast<const float4*>(sk + (nt * 8 + 2 * t + u) * kStride + d);
          s[nt][u] = fmaf(qa.w, kv.w, fmaf(qa.z, kv.z, fmaf(qa.y, kv.y, fmaf(qa.x, kv.x, s[nt][u]))));
          s[nt][2 + u] = fmaf(qb.w, kv.w, fmaf(qb.z, kv.z, fmaf(qb.y, kv.y, fmaf(qb.x, kv.x, s[nt][2 + u]))));
        }
    }
  }

  // Row g's P values are spread over the 4 lanes of its quad: each key's value is broadcast from
  // the lane that holds it.
  template <int KS>
  __device__ __forceinline__ static void pv(const float (&p)[KS / 8][4], const float* sv, float (&o)[D_PAD / 8][4]) {
    const int lane = threadIdx.x & 31, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < KS / 8; ++nt)
#pragma unroll
      for (int tt = 0; tt < 4; ++tt)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int src = (lane & ~3) | tt;
          const float pa = __shfl_sync(0xffffffffu, p[nt][u], src);
          const float pb = __shfl_sync(0xffffffffu, p[nt][2 + u], src);
          const float* vr = sv + (nt * 8 + 2 * tt + u) * kStride + 2 * t;
#pragma unroll
          for (int dt = 0; dt < D_PAD / 8; ++dt) {
            const float2 vv = *reinterpret_cast<const float2*>(vr + dt * 8);
            o[dt][0] = fmaf(pa, vv.x, o[dt][0]);
            o[dt][1] = fmaf(pa, vv.y, o[dt][1]);
            o[dt][2] = fmaf(pb, vv.x, o[dt][2]);
            o[dt][3] = fmaf(pb, vv.y, o[dt][3]);
          }
        }
  }
};

// Rows j of one (sequence, head) of q, K or V: dense at base + j·token_stride, or paged (blocks
// not null: the sequence's block table row) at base + blocks[j / block_size]·block_stride +
// (j % block_size)·token_stride. Only rows below the sequence's length are addressed.
template <typename T>
struct RowSource {
  const T* base;
  int64_t token_stride;
  const int32_t* blocks;
  int block_size;
  int64_t block_stride;

  __device__ __forceinline__ const T* row(int j) const {
    if (blocks == nullptr) return base + static_cast<int64_t>(j) * token_stride;
    return base + static_cast<int64_t>(blocks[j / block_size]) * block_stride +
           static_cast<int64_t>(j % block_size) * token_stride;
  }
};

// Rows first..first+ROWS-1 of `src` -> shared memory rows of C::kStride, copied by THREADS threads
// (tid = this thread's index among them); rows >= limit are zero-filled and not read. 16-byte
// cp.async when `vec` (rows 16-byte aligned), element-wise otherwise. Columns D..D_PAD stay zero
// from the kernel's initial clear (never written).
template <typename T, int D_PAD, int ROWS, int THREADS>
__device__ __forceinline__ void load_rows(T* dst, const RowSource<T>& src, int first, int limit, int D, bool vec,
                                          int tid) {
  using C = Cfg<T, D_PAD>;
  if (vec) {
    constexpr int kPer = 16 / sizeof(T);
    const int per_row = D / kPer;
    for (int c = tid; c < ROWS * per_row; c += THREADS) {
      const int r = c / per_row, col = (c % per_row) * kPer, row = first + r;
      const bool in = row < limit;
      cp_async16(dst + r * C::kStride + col, in ? src.row(row) + col : src.base, in);
    }
  } else {
    for (int e = tid; e < ROWS * D; e += THREADS) {
      const int r = e / D, d = e % D, row = first + r;
      dst[r * C::kStride + d] = row < limit ? src.row(row)[d] : from_float<T>(0.f);
    }
  }
}

// This chunk's partial output of every query row of KV head kvh's group set to `value`: zero for a
// chunk past the sequence's keys, NaN for a sequence with invalid index data.
__device__ __forceinline__ void fill_partial_out(const Params& p, const Sequence& seq, int chunk, int b, int kvh,
                                                 float value) {
  const int per_head = seq.Tq * p.D;
  float* dst = p.ws_out + chunk * p.out_elems + b * p.out_sb + seq.q_row0 * p.out_st + kvh * p.G * p.out_sh;
  for (int e = threadIdx.x; e < p.G * per_head; e += blockDim.x) {
    const int head = e / per_head, i = (e % per_head) / p.D, d = e % p.D;
    dst[head * p.out_sh + i * p.out_st + d] = value;
  }
}

// Which block of the grid this is: batch row (sequence) b, KV head kvh and row-block unit. False
// when the block has no work (paged: malformed q_offsets, or a grid row no sequence owns).
__device__ __forceinline__ bool block_work(const Params& p, int& b, int& kvh, int& unit) {
  if (p.units == nullptr) {
    b = blockIdx.z / p.Hkv;
    kvh = blockIdx.z % p.Hkv;
    unit = blockIdx.y;
    return true;
  }
  if (*p.offsets_bad != 0) return false;  // no row is known: the output combine writes NaN
  const UnitRef ref = p.units[blockIdx.y];
  if (ref.b < 0 || ref.b >= p.B) return false;  // a grid row between two sequences' units
  b = ref.b;
  kvh = blockIdx.z;
  unit = ref.unit;
  return true;
}

// Every warp's rows, and how the warps group into heads (head slots of warps_per_slot warps), into
// shared memory: they depend on the sequence's Tq, and recomputing them where they are needed
// costs registers.
template <int kWarps>
__device__ __forceinline__ void describe_warps(const Params& p, const Sequence& seq, int unit, WarpRows* warp_table,
                                               int& head_slots, int& warps_per_slot) {
  if (threadIdx.x < kWarps) {
    const RowGeometry geo = row_geometry(seq.Tq, p.G, kWarps);
    warp_table[threadIdx.x] = warp_rows<kWarps>(geo, p.G, unit, threadIdx.x);
    if (threadIdx.x == 0) {
      head_slots = geo.nseg == 1 ? geo.heads_per_block : 1;
      warps_per_slot = geo.nseg == 1 ? geo.mtiles_per_head : kWarps;
    }
  }
}

// Clears Q and the K/V stages: padding rows and dims must read as zeros.
template <typename T, int D_PAD, bool kOut>
__device__ __forceinline__ void clear_tiles(unsigned char* smem_raw) {
  using C = Cfg<T, D_PAD>;
  const size_t clear_bytes = C::q_bytes() + C::tile_bytes() * 2 * (kOut ? 2 : 1);
  uint4* z = reinterpret_cast<uint4*>(smem_raw);
  for (size_t i = threadIdx.x; i < clear_bytes / 16; i += C::kThreads) z[i] = make_uint4(0, 0, 0, 0);
}

// The warp's 16 query rows -> its Q tile (cp.async: committed with the first K/V tile).
template <typename T, int D_PAD>
__device__ __forceinline__ void load_query_tile(T* tile, const Params& p, const Sequence& seq, int b, int kvh,
                                                const WarpRows& wr, int lane) {
  const RowSource<T> queries{
      static_cast<const T*>(p.q) + b * p.q_sb + (kvh * p.G + wr.head) * p.q_sh + seq.q_row0 * p.q_st, p.q_st, nullptr,
      0, 0};
  load_rows<T, D_PAD, 16, 32>(tile, queries, wr.mtile * 16, seq.Tq, p.D, p.q_vec, lane);
}

// Softmax statistics of this block's rows (max m and reciprocal sum il per row): the sequence's
// stats chunks combined in chunk order, so every block of the main pass sees the same values.
template <typename T, int D_PAD>
__device__ __forceinline__ void combine_row_stats(const Params& p, const Sequence& seq, int kvh,
                                                  const WarpRows* warp_table, float* row_m, float* row_il) {
  if (threadIdx.x < Cfg<T, D_PAD>::kRows) {
    const int row = threadIdx.x;
    const WarpRows rr = warp_table[row / 16];
    const int i = rr.mtile * 16 + row % 16;
    float m = 0.f, il = 0.f;
    if (rr.active && i < seq.Tq) {
      const int hq = kvh * p.G + rr.head;
      const int stats_chunks = (seq.N + p.stats_chunk_keys - 1) / p.stats_chunk_keys;
      const float* st = p.ws_stats + (static_cast<int64_t>(seq.ws_row0 + i) * p.Hq + hq) * p.stats_chunks * 2;
      m = -INFINITY;
      for (int c = 0; c < stats_chunks; ++c) m = fmaxf(m, st[2 * c]);
      float l = 0.f;
      for (int c = 0; c < stats_chunks; ++c) l = __fadd_rn(l, __fmul_rn(st[2 * c + 1], exp2f(__fsub_rn(st[2 * c], m))));
      // l >= 1 whenever it is finite (the row max contributes 2^0), so the fast reciprocal is
      // accurate to ~1 ulp here; the IEEE one would add a slow-path call to the kernel.
      il = __fdividef(1.f, l);
    }
    row_m[row] = m;
    row_il[row] = il;
  }
}

// The last key each of this thread's two rows (g, g+8) sees; -1 for padding rows.
__device__ __forceinline__ void last_visible_keys(const Sequence& seq, const WarpRows& wr, int g,
                                                  int (&last_visible)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = wr.mtile * 16 + g + 8 * h;
    last_visible[h] = (wr.active && i < seq.Tq) ? seq.N - seq.Tq + i : -1;
  }
}

template <int D_PAD>
__device__ __forceinline__ void clear_output(float (&o)[D_PAD / 8][4]) {
#pragma unroll
  for (int dt = 0; dt < D_PAD / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
}

// Key rows first..first+kKeyTile-1 -> one stage of the K (and, with the output, V) tiles. Rows
// past the sequence's keys are zero-filled.
template <typename T, int D_PAD, bool kOut>
__device__ __forceinline__ void load_kv_tile(T* k_tile, T* v_tile, const RowSource<T>& keys, const RowSource<T>& values,
                                             int first, const Params& p, const Sequence& seq) {
  using C = Cfg<T, D_PAD>;
  load_rows<T, D_PAD, C::kKeyTile, C::kThreads>(k_tile, keys, first, seq.N, p.D, p.k_vec, threadIdx.x);
  if constexpr (kOut) {
    load_rows<T, D_PAD, C::kKeyTile, C::kThreads>(v_tile, values, first, seq.N, p.D, p.v_vec, threadIdx.x);
  }
}

// Stats pass: folds the logits s of keys kb.. into the running max and sum of 2^logit of this
// thread's two rows (online softmax). Hidden keys' logits become -inf.
template <int KS>
__device__ __forceinline__ void update_row_stats(float (&s)[KS / 8][4], int kb, int t, const int (&last_visible)[2],
                                                 float scale_log2, float (&m_run)[2], float (&l_run)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < KS / 8; ++nt)
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int key = kb + nt * 8 + 2 * t + u;
        float& x = s[nt][2 * h + u];
        x = key <= last_visible[h] ? __fmul_rn(x, scale_log2) : -INFINITY;
        mx = fmaxf(mx, x);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_run[h], mx);
    // Rows with nothing visible yet keep a zero reference, so -inf - -inf never makes a NaN (a NaN
    // logit still turns the sum into NaN, as softmax does).
    const float m_ref = m_new == -INFINITY ? 0.f : m_new;
    float l = __fmul_rn(l_run[h], exp2f(__fsub_rn(m_run[h], m_ref)));
#pragma unroll
    for (int nt = 0; nt < KS / 8; ++nt)
#pragma unroll
      for (int u = 0; u < 2; ++u) l = __fadd_rn(l, exp2f(__fsub_rn(s[nt][2 * h + u], m_ref)));
    l_run[h] = l;
    m_run[h] = m_new;
  }
}

// Main pass: the logits s of keys kb.. -> probabilities P with the combined statistics of this
// thread's rows (row, row + 8 of the block); hidden keys get 0.
template <int KS>
__device__ __forceinline__ void softmax_probabilities(float (&s)[KS / 8][4], int kb, int row, int t,
                                                      const int (&last_visible)[2], float scale_log2,
                                                      const float* row_m, const float* row_il) {
  float m[2], il[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    m[h] = row_m[row + 8 * h];
    il[h] = row_il[row + 8 * h];
  }
#pragma unroll
  for (int nt = 0; nt < KS / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = kb + nt * 8 + 2 * t + (e & 1);
      float& x = s[nt][e];
      x = key <= last_visible[e >> 1] ? __fmul_rn(exp2f(__fsub_rn(__fmul_rn(x, scale_log2), m[e >> 1])), il[e >> 1])
                                      : 0.f;
    }
}

// Column sums (maxima) of P over the warp's 16 rows -> colsum[col0..col0+KS): the pair (g, g+8)
// in-thread, then across the 8 g.
template <int KS>
__device__ __forceinline__ void store_column_partials(const float (&s)[KS / 8][4], float* colsum, int col0, int g,
                                                      int t, bool query_max) {
#pragma unroll
  for (int nt = 0; nt < KS / 8; ++nt)
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      float c = reduce_rows(s[nt][u], s[nt][2 + u], query_max);
      c = reduce_rows(c, __shfl_xor_sync(0xffffffffu, c, 4), query_max);
      c = reduce_rows(c, __shfl_xor_sync(0xffffffffu, c, 8), query_max);
      c = reduce_rows(c, __shfl_xor_sync(0xffffffffu, c, 16), query_max);
      if (g == 0) colsum[col0 + nt * 8 + 2 * t + u] = c;
    }
}

// Per head of the block: its warps' column sums (maxima) of the tile at key0, reduced in warp
// order -> the head's segment row of the column sums in the workspace.
template <typename T, int D_PAD>
__device__ __forceinline__ void write_column_scores(const Params& p, const Sequence& seq, int kvh, int key0,
                                                    const WarpRows* warp_table, const int& head_slots,
                                                    const int& warps_per_slot, const float* colsum) {
  using C = Cfg<T, D_PAD>;
  constexpr int KT = C::kKeyTile;
  for (int idx = threadIdx.x; idx < head_slots * KT; idx += C::kThreads) {
    const int slot = idx / KT, col = idx % KT, key = key0 + col;
    const WarpRows first = warp_table[slot * warps_per_slot];
    if (!first.active || key >= seq.S) continue;
    float sum = 0.f;
    for (int w = 0; w < warps_per_slot; ++w) {
      if (warp_table[slot * warps_per_slot + w].active) {
        sum = reduce_rows(sum, colsum[(slot * warps_per_slot + w) * KT + col], p.query_max);
      }
    }
    const int hq = kvh * p.G + first.head;
    p.ws_col[(static_cast<int64_t>(seq.seg0 + first.seg) * p.Hq + hq) * p.col_stride + key] = sum;
  }
}

// Stats pass: this chunk's (max, sum) of this thread's two rows -> the workspace. The quad's four
// partial sums are added first; the running max is already the quad's.
__device__ __forceinline__ void write_row_stats(const Params& p, const Sequence& seq, int chunk, int kvh,
                                                const WarpRows& wr, int g, int t, const float (&m_run)[2],
                                                const float (&l_run)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l = __fadd_rn(l, __shfl_xor_sync(0xffffffffu, l, 1));
    l = __fadd_rn(l, __shfl_xor_sync(0xffffffffu, l, 2));
    const int i = wr.mtile * 16 + g + 8 * h;
    if (wr.active && t == 0 && i < seq.Tq) {
      const int hq = kvh * p.G + wr.head;
      float* st = p.ws_stats + ((static_cast<int64_t>(seq.ws_row0 + i) * p.Hq + hq) * p.stats_chunks + chunk) * 2;
      st[0] = m_run[h];
      st[1] = l;
    }
  }
}

// Output mode: this chunk's P·V of the warp's rows -> the chunk's partial output in the workspace.
template <int D_PAD>
__device__ __forceinline__ void write_partial_out(const Params& p, const Sequence& seq, int chunk, int b, int kvh,
                                                  const WarpRows& wr, int g, int t, const float (&o)[D_PAD / 8][4]) {
  const int hq = kvh * p.G + wr.head;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = wr.mtile * 16 + g + 8 * h;
    if (i >= seq.Tq) continue;
    float* dst = p.ws_out + chunk * p.out_elems + b * p.out_sb + (seq.q_row0 + i) * p.out_st + hq * p.out_sh;
#pragma unroll
    for (int dt = 0; dt < D_PAD / 8; ++dt)
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int d = dt * 8 + 2 * t + u;
        if (d < p.D) dst[d] = o[dt][2 * h + u];
      }
  }
}

template <typename T, int D_PAD, int MODE>
__global__ void __launch_bounds__(Cfg<T, D_PAD>::kThreads, Cfg<T, D_PAD>::kMinBlocks) attention_kernel(const Params p) {
  using C = Cfg<T, D_PAD>;
  using M = TileMath<T, D_PAD>;
  constexpr int KT = C::kKeyTile, KS = C::sub_keys(MODE), kStride = C::kStride;
  constexpr bool kOut = MODE == kScoresOut;

  unsigned char* smem_raw = dynamic_smem<unsigned char>();
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw + C::q_bytes());  // 2 stages
  T* sV = sK + 2 * KT * kStride;                          // 2 stages (output mode only)
  float* colsum = reinterpret_cast<float*>(smem_raw + C::q_bytes() + C::tile_bytes() * 2 * (kOut ? 2 : 1));
  float* row_m = colsum + C::kWarps * KT;
  float* row_il = row_m + C::kRows;

  const int chunk = blockIdx.x;
  int b, kvh, unit;
  if (!block_work(p, b, kvh, unit)) return;
  const Sequence seq = sequence(p, b);
  if (!seq.valid) {
    if constexpr (kOut) {
      if (chunk == 0 && unit == 0 && seq.rows_known) fill_partial_out(p, seq, chunk, b, kvh, NAN);
    }
    return;
  }
  const int chunk_begin = chunk * p.chunk_keys;
  const int chunk_end = min(chunk_begin + p.chunk_keys, MODE == kScores ? seq.S : seq.N);
  if (chunk_begin >= chunk_end) {  // past the sequence's keys: the later passes skip this chunk
    if constexpr (kOut) {
      if (unit == 0) fill_partial_out(p, seq, chunk, b, kvh, 0.f);
    }
    return;
  }
  const int ntiles = (chunk_end - chunk_begin + KT - 1) / KT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  __shared__ WarpRows warp_table[C::kWarps];
  __shared__ int head_slots, warps_per_slot;
  describe_warps<C::kWarps>(p, seq, unit, warp_table, head_slots, warps_per_slot);
  const int32_t* blocks = p.blocks == nullptr ? nullptr : p.blocks + b * p.blocks_stride;
  const RowSource<T> keys{static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh, p.k_sn, blocks, p.block_size,
                          p.k_sblk};
  const RowSource<T> values{kOut ? static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh : nullptr, p.v_sn, blocks,
                            p.block_size, p.v_sblk};

  clear_tiles<T, D_PAD, kOut>(smem_raw);
  __syncthreads();
  const WarpRows wr = warp_table[warp];

  if (wr.active) load_query_tile<T, D_PAD>(sQ + warp * 16 * kStride, p, seq, b, kvh, wr, lane);
  if constexpr (MODE != kStats) combine_row_stats<T, D_PAD>(p, seq, kvh, warp_table, row_m, row_il);

  int last_visible[2];
  last_visible_keys(seq, wr, g, last_visible);

  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // stats pass
  float o[D_PAD / 8][4];                                           // output mode
  if constexpr (kOut) clear_output<D_PAD>(o);

  load_kv_tile<T, D_PAD, kOut>(sK, sV, keys, values, chunk_begin, p, seq);
  cp_async_commit();

  for (int it = 0; it < ntiles; ++it) {
    const int key0 = chunk_begin + it * KT;
    const int stage = it & 1;
    if (it + 1 < ntiles) {
      load_kv_tile<T, D_PAD, kOut>(sK + (stage ^ 1) * KT * kStride, sV + (stage ^ 1) * KT * kStride, keys, values,
                                   key0 + KT, p, seq);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile `it` (and, on the first pass, Q and the row stats) visible to all

    if (wr.active) {
      const T* tq = sQ + warp * 16 * kStride;
      const T* tk = sK + stage * KT * kStride;
#pragma unroll 1
      for (int sub = 0; sub < KT / KS; ++sub) {
        const int kb = key0 + sub * KS;
        float s[KS / 8][4];
        M::template qk<KS>(tq, tk + sub * KS * kStride, s);
        if constexpr (MODE == kStats) {
          update_row_stats<KS>(s, kb, t, last_visible, p.scale_log2, m_run, l_run);
        } else {
          softmax_probabilities<KS>(s, kb, warp * 16 + g, t, last_visible, p.scale_log2, row_m, row_il);
          store_column_partials<KS>(s, colsum, warp * KT + sub * KS, g, t, p.query_max);
          if constexpr (kOut) M::template pv<KS>(s, sV + stage * KT * kStride + sub * KS * kStride, o);
        }
      }
    }
    __syncthreads();  // tile buffers free for the next prefetch; column sums complete

    if constexpr (MODE != kStats) {
      write_column_scores<T, D_PAD>(p, seq, kvh, key0, warp_table, head_slots, warps_per_slot, colsum);
    }
  }

  if constexpr (MODE == kStats) write_row_stats(p, seq, chunk, kvh, wr, g, t, m_run, l_run);
  if constexpr (kOut) {
    if (wr.active) write_partial_out<D_PAD>(p, seq, chunk, b, kvh, wr, g, t, o);
  }
}

constexpr int kFinalTile = 256;

struct FinalizeArgs {
  float inv_g;  // 1/G and 1/pool_kernel, computed on the host
  bool gqa_max;
  int pool_kernel;
  float inv_pool;
  bool pool_avg;
  float* scores;  // [B][Hkv][scores_row]
  int64_t scores_row;
};

// scores[b, kvh, j] = pool_j( R_{heads of the group}( sum over segments of the column sum / Tq ) ),
// or with query_max the max over segments of the column max (no division), for j < S_b; -inf for
// S_b <= j < scores_row (paged rows are wider than any S_b); NaN for a paged sequence with invalid
// index data. The divisions are multiplications by reciprocals (1/Tq is correctly rounded here).
__global__ void __launch_bounds__(kFinalTile) scores_finalize_kernel(const Params p, const FinalizeArgs f) {
  float* raw = dynamic_smem<float>();  // kFinalTile + 2 * halo reduced scores
  const int row = blockIdx.y, b = row / p.Hkv, kvh = row % p.Hkv;
  const int halo = f.pool_kernel / 2, j0 = blockIdx.x * kFinalTile, j = j0 + threadIdx.x;
  float* out = f.scores + row * f.scores_row;
  const Sequence seq = sequence(p, b);
  if (!seq.valid || j0 >= seq.S) {
    if (j < f.scores_row) out[j] = seq.valid ? -INFINITY : NAN;
    return;
  }
  const int S = seq.S;
  const float inv_tq = __fdiv_rn(1.f, static_cast<float>(seq.Tq));
  for (int idx = threadIdx.x; idx < kFinalTile + 2 * halo; idx += kFinalTile) {
    const int jj = j0 - halo + idx;
    float r;
    if (jj >= 0 && jj < S) {
      r = f.gqa_max ? -INFINITY : 0.f;
      const int64_t seg_stride = p.Hq * p.col_stride;
      for (int h = 0; h < p.G; ++h) {
        const float* col = p.ws_col + (static_cast<int64_t>(seq.seg0) * p.Hq + kvh * p.G + h) * p.col_stride + jj;
        float c = col[0];
#pragma unroll 1  // (unrolled, ptxas spills 8 bytes here)
        for (int sg = 1; sg < seq.nseg; ++sg) c = reduce_rows(c, col[sg * seg_stride], p.query_max);
        const float over_queries = p.query_max ? c : __fmul_rn(c, inv_tq);
        r = f.gqa_max ? nan_max(r, over_queries) : __fadd_rn(r, over_queries);
      }
      if (!f.gqa_max) r = __fmul_rn(r, f.inv_g);
    } else {
      r = f.pool_avg ? 0.f : -INFINITY;  // avg counts the padding as zeros; max ignores it
    }
    raw[idx] = r;
  }
  __syncthreads();
  if (j >= S) {
    if (j < f.scores_row) out[j] = -INFINITY;
    return;
  }
  float v = f.pool_avg ? 0.f : -INFINITY;
  for (int w = 0; w < f.pool_kernel; ++w) {
    const float r = raw[threadIdx.x + w];
    v = f.pool_avg ? __fadd_rn(v, r) : nan_max(v, r);
  }
  if (f.pool_avg) v = __fmul_rn(v, f.inv_pool);
  out[j] = v;
}

// out = sum of the chunks' partial outputs in chunk order; all NaN when the paged query offsets are
// malformed (no row can be attributed to a sequence).
template <typename T>
__global__ void __launch_bounds__(256) out_combine_kernel(const float* __restrict__ ws_out, int chunks, int64_t total,
                                                          const int* offsets_bad, T* __restrict__ out) {
  const bool poisoned = offsets_bad != nullptr && *offsets_bad != 0;
  for (int64_t e = blockIdx.x * 256ll + threadIdx.x; e < total; e += static_cast<int64_t>(gridDim.x) * 256) {
    float s = poisoned ? NAN : ws_out[e];
    for (int c = 1; c < chunks && !poisoned; ++c) s += ws_out[c * total + e];
    out[e] = from_float<T>(s);
  }
}

// Per paged sequence: N_b, S_b, Tq_b and q_offsets[b] checked against the tensors' sizes and every
// block id it uses against num_blocks, into its descriptor; a malformed q_offsets (not 0 at the
// start, total_q at the end and increasing) sets the call's flag, which invalidates every sequence.
// Each sequence also fills its range of the grid's rows and of the column-sum segment slots. With
// R = segment_rows and x_b = q_offsets[b] - b (>= 0: every sequence has a query), sequence b owns
// segment slots [b + x_b / R, b + 1 + (x_b + Tq_b - 1) / R), at least ceil(Tq_b / R) of them, and
// G times as many grid rows, at least its G·ceil(Tq_b / R) >= units (row_geometry). The ranges tile
// [0, B + (total_q - B) / R) without a prefix sum over the sequences.
struct PagedIndex {
  const int32_t* seq_lens;
  const int32_t* num_scored;
  const int32_t* q_offsets;
  const int32_t* block_table;
  int64_t max_blocks, num_blocks;
  int block_size, capacity, total_q, B;
  int G, warps;  // the attention kernel's row geometry
  UnitRef* units;
  int unit_rows;  // the grid's rows (units' length)
};

constexpr int kCheckThreads = 128;

__device__ __forceinline__ int64_t segment_slot0(int64_t b, int64_t q0, int segment_rows) {
  return b + (q0 - b) / segment_rows;
}

__global__ void __launch_bounds__(kCheckThreads)
    paged_sequences_kernel(const PagedIndex ix, SeqDesc* seqs, int* offsets_bad) {
  __shared__ int flag;
  const int b = blockIdx.x;
  const int N = ix.seq_lens[b], S = ix.num_scored[b];
  const int64_t q0 = ix.q_offsets[b], q1 = ix.q_offsets[b + 1];
  const bool offsets_ok =
      q0 >= b && q0 < q1 && q1 <= ix.total_q && (b > 0 || q0 == 0) && (b < ix.B - 1 || q1 == ix.total_q);
  const bool sizes_ok = offsets_ok && N >= 1 && N <= ix.capacity && S >= 1 && S <= N && q1 - q0 <= N;
  const int used_blocks = sizes_ok ? (N + ix.block_size - 1) / ix.block_size : 0;
  const bool blocks_ok = block_ids_in_range(ix.block_table + b * ix.max_blocks, used_blocks, ix.num_blocks, &flag);
  const int segment_rows = 16 * ix.warps;
  const int64_t seg0 = segment_slot0(b, q0, segment_rows);
  if (threadIdx.x == 0) {
    seqs[b] = {N,
               S,
               static_cast<int32_t>(q1 - q0),
               static_cast<int32_t>(q0),
               static_cast<int32_t>(seg0),
               sizes_ok && blocks_ok ? 1 : 0};
    if (!offsets_ok) *offsets_bad = 1;
  }
  if (!offsets_ok) return;  // the flag disables every grid row
  const int64_t first = ix.G * seg0, end = ix.G * segment_slot0(b + 1, q1, segment_rows);
  const int units = row_geometry(static_cast<int>(q1 - q0), ix.G, ix.warps).units;
  for (int64_t row = first + threadIdx.x; row < end && row < ix.unit_rows; row += kCheckThreads) {
    const int unit = static_cast<int>(row - first);
    ix.units[row] = unit < units ? UnitRef{b, unit} : UnitRef{-1, 0};
  }
}

// ---- host plan -----------------------------------------------------------------------------------

// What a plan depends on: sizes, never index data.
struct Shape {
  int64_t B, Hq, Hkv, D;
  int64_t Tq;          // dense: query rows per batch row; paged: unused
  int64_t keys;        // key range of the chunks: dense N; paged the capacity
  int64_t scored;      // scored key range and column-sum row: dense S; paged the capacity
  int64_t query_rows;  // dense B·Tq; paged total_q
  bool paged;
};

struct Plan {
  int segment_rows;
  int unit_rows;  // grid.y: dense the units of one (batch row, KV head); paged every sequence's units
  int64_t grid_z;
  int stats_chunk_keys, stats_chunks;
  int main_chunk_keys, main_chunks;
  size_t seqs_offset, flag_offset, units_offset, stats_offset, col_offset, out_offset, bytes;
};

// Chunks of the key range [0, key_end) in whole tiles: at most two blocks per multiprocessor (what
// the tensor-core configurations keep resident), so the grid is one wave.
void chunking(int64_t key_end, int key_tile, int64_t blocks_per_chunk, int num_sms, int& chunk_keys, int& chunks) {
  const int64_t tiles = ceil_div(key_end, key_tile);
  const int64_t want = clamp64(2 * static_cast<int64_t>(num_sms) / blocks_per_chunk, 1, tiles);
  chunk_keys = static_cast<int>(ceil_div(tiles, want) * key_tile);
  chunks = static_cast<int>(ceil_div(key_end, chunk_keys));
}

Plan make_plan(int warps, int key_tile, const Shape& s, bool with_out, int num_sms) {
  Plan p;
  const int64_t G = s.Hq / s.Hkv;
  p.segment_rows = 16 * warps;
  int64_t segment_slots;
  if (s.paged) {  // see paged_sequences_kernel
    segment_slots = s.B + std::max<int64_t>(0, s.query_rows - s.B) / p.segment_rows;
    p.unit_rows = static_cast<int>(std::min<int64_t>(G * segment_slots, INT32_MAX));
    p.grid_z = s.Hkv;
  } else {
    const RowGeometry geo = row_geometry(static_cast<int>(s.Tq), static_cast<int>(G), warps);
    segment_slots = s.B * geo.nseg;
    p.unit_rows = geo.units;
    p.grid_z = s.B * s.Hkv;
  }
  check_arg(p.unit_rows <= 65535, "attention: too many query rows per KV head for one grid (> 65535 row blocks)");
  const int64_t blocks_per_chunk = p.grid_z * p.unit_rows;
  chunking(s.keys, key_tile, blocks_per_chunk, num_sms, p.stats_chunk_keys, p.stats_chunks);
  chunking(with_out ? s.keys : s.scored, key_tile, blocks_per_chunk, num_sms, p.main_chunk_keys, p.main_chunks);
  WorkspaceLayout ws;
  p.seqs_offset = ws.take(s.paged ? sizeof(SeqDesc) * s.B : 0);
  p.flag_offset = ws.take(s.paged ? sizeof(int) : 0);
  p.units_offset = ws.take(s.paged ? sizeof(UnitRef) * p.unit_rows : 0);
  p.stats_offset = ws.take(sizeof(float) * 2 * s.query_rows * s.Hq * p.stats_chunks);
  p.col_offset = ws.take(sizeof(float) * segment_slots * s.Hq * s.scored);
  p.out_offset = ws.take(with_out ? sizeof(float) * p.main_chunks * s.query_rows * s.Hq * s.D : 0);
  p.bytes = ws.bytes;
  return p;
}

template <typename T, int D_PAD>
Plan plan_for(const Shape& s, bool with_out, int num_sms) {
  using C = Cfg<T, D_PAD>;
  return make_plan(C::kWarps, C::kKeyTile, s, with_out, num_sms);
}

template <typename T, int D_PAD, int MODE>
void launch_pass(const Params& params, int chunks, int unit_rows, int64_t grid_z, Stream stream, const char* name) {
  using C = Cfg<T, D_PAD>;
  launch(name, attention_kernel<T, D_PAD, MODE>, dim3(chunks, unit_rows, static_cast<unsigned>(grid_z)), C::kThreads,
         C::smem_bytes(static_cast<Mode>(MODE)), stream, params);
}

// attention_scores / lookahead_attention (paged == null), or their paged forms.
template <typename T, int D_PAD>
void run(const AttentionArgs& a, const PagedAttentionArgs* paged, const Shape& shape, char* workspace, int num_sms,
         Stream stream) {
  const bool with_out = a.out != nullptr;
  const Plan plan = plan_for<T, D_PAD>(shape, with_out, num_sms);
  Params p;
  p.q = a.q;
  p.q_sb = a.q_sb;
  p.q_sh = a.q_sh;
  p.q_st = a.q_st;
  p.k = a.k;
  p.k_sb = a.k_sb;
  p.k_sh = a.k_sh;
  p.k_sn = a.k_sn;
  p.k_sblk = a.k_sblk;
  p.v = a.v;
  p.v_sb = a.v_sb;
  p.v_sh = a.v_sh;
  p.v_sn = a.v_sn;
  p.v_sblk = a.v_sblk;
  p.blocks = a.k_blocks;
  p.blocks_stride = a.blocks_stride;
  p.block_size = static_cast<int>(a.block_size);
  p.seqs = paged ? reinterpret_cast<const SeqDesc*>(workspace + plan.seqs_offset) : nullptr;
  p.units = paged ? reinterpret_cast<const UnitRef*>(workspace + plan.units_offset) : nullptr;
  p.offsets_bad = paged ? reinterpret_cast<const int*>(workspace + plan.flag_offset) : nullptr;
  p.B = static_cast<int>(a.B);
  p.Hq = static_cast<int>(a.Hq);
  p.Hkv = static_cast<int>(a.Hkv);
  p.G = static_cast<int>(a.Hq / a.Hkv);
  p.Tq = static_cast<int>(a.Tq);
  p.N = static_cast<int>(a.N);
  p.D = static_cast<int>(a.D);
  p.S = static_cast<int>(a.S);
  p.segment_rows = plan.segment_rows;
  p.scale_log2 = static_cast<float>(static_cast<double>(a.scale) * 1.4426950408889634);
  p.stats_chunk_keys = plan.stats_chunk_keys;
  p.stats_chunks = plan.stats_chunks;
  p.query_max = a.query_reduce == Reduce::kMax;
  // Rows: dense [B][H][rows][D]; paged q [total_q][Hq][D] (q_sb = 0) and caches [blocks][...][D].
  const int64_t q_rows = paged ? paged->total_q : a.Tq;
  const int64_t kv_rows = paged ? a.block_size : a.N, kv_blocks = paged ? paged->num_blocks : 1;
  const bool dim_vec = (a.D * sizeof(T)) % 16 == 0;
  p.q_vec = dim_vec && rows_aligned16(a.q, sizeof(T), {{a.B, a.q_sb}, {a.Hq, a.q_sh}, {q_rows, a.q_st}});
  p.k_vec = dim_vec &&
            rows_aligned16(a.k, sizeof(T), {{a.B, a.k_sb}, {a.Hkv, a.k_sh}, {kv_rows, a.k_sn}, {kv_blocks, a.k_sblk}});
  p.v_vec = with_out && dim_vec &&
            rows_aligned16(a.v, sizeof(T), {{a.B, a.v_sb}, {a.Hkv, a.v_sh}, {kv_rows, a.v_sn}, {kv_blocks, a.v_sblk}});
  p.ws_stats = reinterpret_cast<float*>(workspace + plan.stats_offset);
  p.ws_col = reinterpret_cast<float*>(workspace + plan.col_offset);
  p.col_stride = shape.scored;
  p.ws_out = reinterpret_cast<float*>(workspace + plan.out_offset);
  p.out_sb = a.out_sb;
  p.out_sh = a.out_sh;
  p.out_st = a.out_st;
  p.out_elems = shape.query_rows * a.Hq * a.D;
  if (paged) {
    int* flag = reinterpret_cast<int*>(workspace + plan.flag_offset);
    const PagedIndex ix{paged->seq_lens,
                        paged->num_scored,
                        paged->q_offsets,
                        a.k_blocks,
                        paged->max_blocks,
                        paged->num_blocks,
                        static_cast<int>(a.block_size),
                        static_cast<int>(a.N),
                        static_cast<int>(paged->total_q),
                        static_cast<int>(a.B),
                        p.G,
                        Cfg<T, D_PAD>::kWarps,
                        reinterpret_cast<UnitRef*>(workspace + plan.units_offset),
                        plan.unit_rows};
    memset_async(flag, 0, sizeof(int), stream);
    launch("paged_sequences_kernel", paged_sequences_kernel, static_cast<unsigned>(a.B), kCheckThreads, 0, stream, ix,
           reinterpret_cast<SeqDesc*>(workspace + plan.seqs_offset), flag);
  }

  p.chunk_keys = plan.stats_chunk_keys;
  launch_pass<T, D_PAD, kStats>(p, plan.stats_chunks, plan.unit_rows, plan.grid_z, stream, "attention_kernel<stats>");

  p.chunk_keys = plan.main_chunk_keys;
  if (with_out) {
    launch_pass<T, D_PAD, kScoresOut>(p, plan.main_chunks, plan.unit_rows, plan.grid_z, stream,
                                      "attention_kernel<scores+out>");
  } else {
    launch_pass<T, D_PAD, kScores>(p, plan.main_chunks, plan.unit_rows, plan.grid_z, stream,
                                   "attention_kernel<scores>");
  }

  const int halo = static_cast<int>(a.pool_kernel / 2);
  const FinalizeArgs f{1.f / p.G,
                       a.gqa_reduce == Reduce::kMax,
                       static_cast<int>(a.pool_kernel),
                       1.f / static_cast<float>(a.pool_kernel),
                       a.pool_type == PoolType::kAvg,
                       a.scores,
                       a.scores_row};
  launch("scores_finalize_kernel", scores_finalize_kernel,
         dim3(static_cast<unsigned>(ceil_div(a.scores_row, kFinalTile)), static_cast<unsigned>(a.B * a.Hkv)),
         kFinalTile, (kFinalTile + 2 * halo) * sizeof(float), stream, p, f);

  if (with_out) {
    const int64_t total = p.out_elems;
    const unsigned blocks =
        static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 8 * static_cast<int64_t>(num_sms)));
    launch("out_combine_kernel", out_combine_kernel<T>, blocks, 256, 0, stream, p.ws_out, plan.main_chunks, total,
           p.offsets_bad, static_cast<T*>(a.out));
  }
}

template <typename T>
void run_dtype(const AttentionArgs& a, const PagedAttentionArgs* paged, const Shape& s, char* ws, int num_sms,
               Stream stream) {
  if (a.D <= 64) return run<T, 64>(a, paged, s, ws, num_sms, stream);
  if (a.D <= 128) return run<T, 128>(a, paged, s, ws, num_sms, stream);
  return run<T, 256>(a, paged, s, ws, num_sms, stream);
}

void run_any(const AttentionArgs& a, const PagedAttentionArgs* paged, const Shape& s, void* workspace, int num_sms,
             Stream stream) {
  check_arg(a.scores != nullptr && (a.out == nullptr) == (a.v == nullptr), "attention: out and v go together");
  char* ws = static_cast<char*>(workspace);
  switch (a.dtype) {
    case DType::kFloat32:
      return run_dtype<float>(a, paged, s, ws, num_sms, stream);
    case DType::kFloat16:
      return run_dtype<__half>(a, paged, s, ws, num_sms, stream);
    case DType::kBFloat16:
      return run_dtype<__nv_bfloat16>(a, paged, s, ws, num_sms, stream);
  }
}

template <typename T>
Plan plan_dtype(const Shape& s, bool with_out, int num_sms) {
  if (s.D <= 64) return plan_for<T, 64>(s, with_out, num_sms);
  if (s.D <= 128) return plan_for<T, 128>(s, with_out, num_sms);
  return plan_for<T, 256>(s, with_out, num_sms);
}

Plan plan_any(DType dtype, const Shape& s, bool with_out, int num_sms) {
  switch (dtype) {
    case DType::kFloat32:
      return plan_dtype<float>(s, with_out, num_sms);
    case DType::kFloat16:
      return plan_dtype<__half>(s, with_out, num_sms);
    case DType::kBFloat16:
      return plan_dtype<__nv_bfloat16>(s, with_out, num_sms);
  }
  throw std::invalid_argument("lookaheadkv native: unknown dtype");
}

void check_heads(int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int num_sms) {
  check_arg(B >= 1 && Hq >= 1 && Hkv >= 1 && D >= 1 && num_sms >= 1, "attention: sizes must be >= 1");
  check_arg(Hq % Hkv == 0, "attention: Hq must be a multiple of Hkv");
  check_arg(D <= 256, "attention: head_dim must be <= 256");
  check_arg(B * Hkv <= 65535 && Hq <= 65535, "attention: B*Hkv and Hq must be <= 65535");
}

void check_pool(int64_t pool_kernel) {
  check_arg(pool_kernel >= 1 && pool_kernel % 2 == 1 && pool_kernel <= 4095,
            "attention: pool_kernel must be odd in [1, 4095]");
}

Shape dense_shape(int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t N, int64_t D, int64_t S, int num_sms) {
  check_heads(B, Hq, Hkv, D, num_sms);
  check_arg(Tq >= 1 && N >= 1 && Tq <= N, "attention: need 1 <= Tq <= N");
  check_arg(S >= 1 && S <= N, "attention: num_scored must be in [1, N]");
  check_arg(N < (int64_t{1} << 30) && B * Tq < (int64_t{1} << 31), "attention: N must be < 2^30 and B*Tq < 2^31");
  return {B, Hq, Hkv, D, Tq, N, S, B * Tq, false};
}

Shape paged_shape(int64_t B, int64_t Hq, int64_t Hkv, int64_t total_q, int64_t capacity, int64_t D, int num_sms) {
  check_heads(B, Hq, Hkv, D, num_sms);
  check_arg(total_q >= 1 && total_q < (int64_t{1} << 31), "paged attention: q's rows must be in [1, 2^31)");
  check_arg(capacity >= 1 && capacity < (int64_t{1} << 30), "paged attention: capacity must be in [1, 2^30)");
  return {B, Hq, Hkv, D, 0, capacity, capacity, total_q, true};
}

}  // namespace

size_t attention_workspace_bytes(DType dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t N, int64_t D,
                                 int64_t S, bool with_out, int num_sms) {
  return plan_any(dtype, dense_shape(B, Hq, Hkv, Tq, N, D, S, num_sms), with_out, num_sms).bytes;
}

void attention(const AttentionArgs& a, void* workspace, int num_sms, Stream stream) {
  check_pool(a.pool_kernel);
  const Shape s = dense_shape(a.B, a.Hq, a.Hkv, a.Tq, a.N, a.D, a.S, num_sms);
  check_arg(a.k_blocks == nullptr && a.scores_row == a.S, "attention: dense K/V and scores");
  run_any(a, nullptr, s, workspace, num_sms, stream);
}

size_t paged_attention_workspace_bytes(DType dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t total_q,
                                       int64_t capacity, int64_t D, bool with_out, int num_sms) {
  return plan_any(dtype, paged_shape(B, Hq, Hkv, total_q, capacity, D, num_sms), with_out, num_sms).bytes;
}

void paged_attention(const PagedAttentionArgs& pa, void* workspace, int num_sms, Stream stream) {
  const AttentionArgs& a = pa.a;
  check_pool(a.pool_kernel);
  const Shape s = paged_shape(a.B, a.Hq, a.Hkv, pa.total_q, a.N, a.D, num_sms);
  check_arg(a.k_blocks != nullptr && a.block_size >= 1 && pa.num_blocks >= 1 && a.N == pa.max_blocks * a.block_size &&
                a.scores_row == a.N && a.q_sb == 0 && a.k_sb == 0 && a.v_sb == 0 && a.out_sb == 0,
            "paged attention: inconsistent paged arguments");
  run_any(a, &pa, s, workspace, num_sms, stream);
}

}  // namespace cuda
}  // namespace lookaheadkv
