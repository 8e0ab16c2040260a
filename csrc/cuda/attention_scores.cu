// attention_scores and lookahead_attention (docs/ops.md §2-3): one code path, the attention output
// P·V is a template mode of the same kernel.
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

struct Params {
  const void* q;
  int64_t q_sb, q_sh, q_st;
  const void* k;
  int64_t k_sb, k_sh, k_sn;
  const void* v;
  int64_t v_sb, v_sh, v_sn;
  int B, Hq, Hkv, G, Tq, N, D, S;
  float scale_log2;  // scale · log2(e): logits in base-2 units
  int mtiles_per_head, heads_per_block, nseg;
  int chunk_keys, key_end;   // this pass's key chunks cover [0, key_end)
  int stats_chunks;          // the stats pass's chunk count (combined by pass 2)
  bool q_vec, k_vec, v_vec;  // rows 16-byte aligned: cp.async
  bool query_max;            // query_reduce: column max instead of column sum
  float* ws_stats;           // [B][Hq][Tq][stats_chunks][2]: (max, sum)
  float* ws_col;             // [B][Hq][nseg][S]: column sums (maxima) of P
  float* ws_out;             // [chunks][B][Hq][Tq][D]: P·V per chunk
};

// Combines two partial column reductions of P over query rows: a sum (query_reduce = mean) or a
// NaN-propagating max (query_reduce = max; P >= 0, so the zeros of hidden keys and padding rows
// never win).
__device__ __forceinline__ float reduce_rows(float a, float b, bool query_max) {
  return query_max ? nan_max(a, b) : __fadd_rn(a, b);
}

// Which query rows warp `warp` of row block `rowblock` owns.
struct WarpRows {
  bool active;
  int head;   // within the GQA group
  int mtile;  // m16 tile within the head
  int seg;    // segment of the head (several blocks per head when it has > kWarps tiles)
};

template <int kWarps>
__device__ __forceinline__ WarpRows warp_rows(const Params& p, int rowblock, int warp) {
  WarpRows r;
  if (p.nseg == 1) {
    const int slot = warp / p.mtiles_per_head;
    r.head = rowblock * p.heads_per_block + slot;
    r.mtile = warp % p.mtiles_per_head;
    r.seg = 0;
    r.active = slot < p.heads_per_block && r.head < p.G;
  } else {
    r.head = rowblock / p.nseg;
    r.seg = rowblock % p.nseg;
    r.mtile = r.seg * kWarps + warp;
    r.active = r.mtile < p.mtiles_per_head;
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

// Rows first..first+ROWS-1 of a [rows][D] matrix (row stride in elements) -> shared memory rows
// of C::kStride, copied by THREADS threads (tid = this thread's index among them); rows >= limit
// are zero-filled. 16-byte cp.async when `vec` (rows 16-byte aligned), element-wise otherwise.
// Columns D..D_PAD stay zero from the kernel's initial clear (never written).
template <typename T, int D_PAD, int ROWS, int THREADS>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t row_stride, int first, int limit, int D,
                                          bool vec, int tid) {
  using C = Cfg<T, D_PAD>;
  if (vec) {
    constexpr int kPer = 16 / sizeof(T);
    const int per_row = D / kPer;
    for (int c = tid; c < ROWS * per_row; c += THREADS) {
      const int r = c / per_row, col = (c % per_row) * kPer, row = first + r;
      const bool in = row < limit;
      cp_async16(dst + r * C::kStride + col, src + static_cast<int64_t>(in ? row : 0) * row_stride + col, in);
    }
  } else {
    for (int e = tid; e < ROWS * D; e += THREADS) {
      const int r = e / D, d = e % D, row = first + r;
      dst[r * C::kStride + d] = row < limit ? src[static_cast<int64_t>(row) * row_stride + d] : from_float<T>(0.f);
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

  const int chunk = blockIdx.x, rowblock = blockIdx.y;
  const int b = blockIdx.z / p.Hkv, kvh = blockIdx.z % p.Hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const WarpRows wr = warp_rows<C::kWarps>(p, rowblock, warp);

  // Clear Q and the K/V stages: padding rows and dims must read as zeros.
  {
    const size_t clear_bytes = C::q_bytes() + C::tile_bytes() * 2 * (kOut ? 2 : 1);
    uint4* z = reinterpret_cast<uint4*>(smem_raw);
    for (size_t i = threadIdx.x; i < clear_bytes / 16; i += C::kThreads) z[i] = make_uint4(0, 0, 0, 0);
  }
  __syncthreads();

  // Each warp loads its own 16 query rows (committed with the first K/V tile below).
  if (wr.active) {
    const T* qhead = static_cast<const T*>(p.q) + b * p.q_sb + (kvh * p.G + wr.head) * p.q_sh;
    load_rows<T, D_PAD, 16, 32>(sQ + warp * 16 * kStride, qhead, p.q_st, wr.mtile * 16, p.Tq, p.D, p.q_vec, lane);
  }
  if constexpr (MODE != kStats) {
    // Softmax statistics of this block's rows: all stats chunks combined in chunk order.
    if (threadIdx.x < C::kRows) {
      const int row = threadIdx.x;
      const WarpRows rr = warp_rows<C::kWarps>(p, rowblock, row / 16);
      const int i = rr.mtile * 16 + row % 16;
      float m = 0.f, il = 0.f;
      if (rr.active && i < p.Tq) {
        const int hq = kvh * p.G + rr.head;
        const float* st = p.ws_stats + ((static_cast<int64_t>(b) * p.Hq + hq) * p.Tq + i) * p.stats_chunks * 2;
        m = -INFINITY;
        for (int c = 0; c < p.stats_chunks; ++c) m = fmaxf(m, st[2 * c]);
        float l = 0.f;
        for (int c = 0; c < p.stats_chunks; ++c)
          l = __fadd_rn(l, __fmul_rn(st[2 * c + 1], exp2f(__fsub_rn(st[2 * c], m))));
        // l >= 1 whenever it is finite (the row max contributes 2^0), so the fast reciprocal is
        // accurate to ~1 ulp here; the IEEE one would add a slow-path call to the kernel.
        il = __fdividef(1.f, l);
      }
      row_m[row] = m;
      row_il[row] = il;
    }
  }

  // The last key each of this thread's two rows (g, g+8) sees; -1 for padding rows.
  int last_visible[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = wr.mtile * 16 + g + 8 * h;
    last_visible[h] = (wr.active && i < p.Tq) ? p.N - p.Tq + i : -1;
  }

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* vbase = kOut ? static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh : nullptr;
  const int chunk_begin = chunk * p.chunk_keys;
  const int chunk_end = min(chunk_begin + p.chunk_keys, p.key_end);
  const int ntiles = (chunk_end - chunk_begin + KT - 1) / KT;

  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // stats pass
  float o[D_PAD / 8][4];                                           // output mode
  if constexpr (kOut) {
#pragma unroll
    for (int dt = 0; dt < D_PAD / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
  }

  load_rows<T, D_PAD, KT, C::kThreads>(sK, kbase, p.k_sn, chunk_begin, p.N, p.D, p.k_vec, threadIdx.x);
  if constexpr (kOut)
    load_rows<T, D_PAD, KT, C::kThreads>(sV, vbase, p.v_sn, chunk_begin, p.N, p.D, p.v_vec, threadIdx.x);
  cp_async_commit();

  for (int it = 0; it < ntiles; ++it) {
    const int key0 = chunk_begin + it * KT;
    const int stage = it & 1;
    if (it + 1 < ntiles) {
      load_rows<T, D_PAD, KT, C::kThreads>(sK + (stage ^ 1) * KT * kStride, kbase, p.k_sn, key0 + KT, p.N, p.D, p.k_vec,
                                           threadIdx.x);
      if constexpr (kOut) {
        load_rows<T, D_PAD, KT, C::kThreads>(sV + (stage ^ 1) * KT * kStride, vbase, p.v_sn, key0 + KT, p.N, p.D,
                                             p.v_vec, threadIdx.x);
      }
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
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < KS / 8; ++nt)
#pragma unroll
              for (int u = 0; u < 2; ++u) {
                const int key = kb + nt * 8 + 2 * t + u;
                float& x = s[nt][2 * h + u];
                x = key <= last_visible[h] ? __fmul_rn(x, p.scale_log2) : -INFINITY;
                mx = fmaxf(mx, x);
              }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_run[h], mx);
            // Rows with nothing visible yet keep a zero reference, so -inf - -inf never makes a NaN
            // (a NaN logit still turns the sum into NaN, as softmax does).
            const float m_ref = m_new == -INFINITY ? 0.f : m_new;
            float l = __fmul_rn(l_run[h], exp2f(__fsub_rn(m_run[h], m_ref)));
#pragma unroll
            for (int nt = 0; nt < KS / 8; ++nt)
#pragma unroll
              for (int u = 0; u < 2; ++u) l = __fadd_rn(l, exp2f(__fsub_rn(s[nt][2 * h + u], m_ref)));
            l_run[h] = l;
            m_run[h] = m_new;
          }
        } else {
          float m[2], il[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            m[h] = row_m[warp * 16 + g + 8 * h];
            il[h] = row_il[warp * 16 + g + 8 * h];
          }
#pragma unroll
          for (int nt = 0; nt < KS / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key = kb + nt * 8 + 2 * t + (e & 1);
              float& x = s[nt][e];
              x = key <= last_visible[e >> 1]
                      ? __fmul_rn(exp2f(__fsub_rn(__fmul_rn(x, p.scale_log2), m[e >> 1])), il[e >> 1])
                      : 0.f;
            }
          // Column sums (maxima) over the warp's 16 rows: the pair (g, g+8) in-thread, then across
          // the 8 g.
#pragma unroll
          for (int nt = 0; nt < KS / 8; ++nt)
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              float c = reduce_rows(s[nt][u], s[nt][2 + u], p.query_max);
              c = reduce_rows(c, __shfl_xor_sync(0xffffffffu, c, 4), p.query_max);
              c = reduce_rows(c, __shfl_xor_sync(0xffffffffu, c, 8), p.query_max);
              c = reduce_rows(c, __shfl_xor_sync(0xffffffffu, c, 16), p.query_max);
              if (g == 0) colsum[warp * KT + sub * KS + nt * 8 + 2 * t + u] = c;
            }
          if constexpr (kOut) M::template pv<KS>(s, sV + stage * KT * kStride + sub * KS * kStride, o);
        }
      }
    }
    __syncthreads();  // tile buffers free for the next prefetch; column sums complete

    if constexpr (MODE != kStats) {
      // Per head of the block: sum (max) its warps' column sums (maxima) in warp order.
      const int slots = p.nseg == 1 ? p.heads_per_block : 1;
      const int warps_per_slot = p.nseg == 1 ? p.mtiles_per_head : C::kWarps;
      for (int idx = threadIdx.x; idx < slots * KT; idx += C::kThreads) {
        const int slot = idx / KT, col = idx % KT, key = key0 + col;
        const WarpRows first = warp_rows<C::kWarps>(p, rowblock, slot * warps_per_slot);
        if (!first.active || key >= p.S) continue;
        float sum = 0.f;
        for (int w = 0; w < warps_per_slot; ++w) {
          if (warp_rows<C::kWarps>(p, rowblock, slot * warps_per_slot + w).active) {
            sum = reduce_rows(sum, colsum[(slot * warps_per_slot + w) * KT + col], p.query_max);
          }
        }
        const int hq = kvh * p.G + first.head;
        p.ws_col[((static_cast<int64_t>(b) * p.Hq + hq) * p.nseg + first.seg) * p.S + key] = sum;
      }
    }
  }

  if constexpr (MODE == kStats) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[h];
      l = __fadd_rn(l, __shfl_xor_sync(0xffffffffu, l, 1));
      l = __fadd_rn(l, __shfl_xor_sync(0xffffffffu, l, 2));
      const int i = wr.mtile * 16 + g + 8 * h;
      if (wr.active && t == 0 && i < p.Tq) {
        const int hq = kvh * p.G + wr.head;
        float* st = p.ws_stats + (((static_cast<int64_t>(b) * p.Hq + hq) * p.Tq + i) * p.stats_chunks + chunk) * 2;
        st[0] = m_run[h];
        st[1] = l;
      }
    }
  }
  if constexpr (kOut) {
    if (wr.active) {
      const int hq = kvh * p.G + wr.head;
      const int64_t per_chunk = static_cast<int64_t>(p.B) * p.Hq * p.Tq * p.D;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = wr.mtile * 16 + g + 8 * h;
        if (i >= p.Tq) continue;
        float* dst = p.ws_out + chunk * per_chunk + ((static_cast<int64_t>(b) * p.Hq + hq) * p.Tq + i) * p.D;
#pragma unroll
        for (int dt = 0; dt < D_PAD / 8; ++dt)
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int d = dt * 8 + 2 * t + u;
            if (d < p.D) dst[d] = o[dt][2 * h + u];
          }
      }
    }
  }
}

constexpr int kFinalTile = 256;

// scores[b, kvh, j] = pool_j( R_{heads of the group}( sum over segments of the column sum / Tq ) ),
// or with query_max the max over segments of the column max (no division).
// The divisions (by Tq, G, pool_kernel) are multiplications by reciprocals computed on the host.
__global__ void __launch_bounds__(kFinalTile)
    scores_finalize_kernel(const float* __restrict__ ws_col, int Hq, int Hkv, int G, int nseg, int S, bool query_max,
                           float inv_tq, float inv_g, bool gqa_max, int pool_kernel, float inv_pool, bool pool_avg,
                           float* __restrict__ scores) {
  float* raw = dynamic_smem<float>();  // kFinalTile + 2 * halo reduced scores
  const int row = blockIdx.y, b = row / Hkv, kvh = row % Hkv;
  const int halo = pool_kernel / 2, j0 = blockIdx.x * kFinalTile;
  for (int idx = threadIdx.x; idx < kFinalTile + 2 * halo; idx += kFinalTile) {
    const int j = j0 - halo + idx;
    float r;
    if (j >= 0 && j < S) {
      r = gqa_max ? -INFINITY : 0.f;
      for (int h = 0; h < G; ++h) {
        const float* col = ws_col + ((static_cast<int64_t>(b) * Hq + kvh * G + h) * nseg) * S + j;
        float c = col[0];
#pragma unroll 1  // (unrolled, ptxas spills 8 bytes here)
        for (int sg = 1; sg < nseg; ++sg) c = reduce_rows(c, col[static_cast<int64_t>(sg) * S], query_max);
        const float over_queries = query_max ? c : __fmul_rn(c, inv_tq);
        r = gqa_max ? nan_max(r, over_queries) : __fadd_rn(r, over_queries);
      }
      if (!gqa_max) r = __fmul_rn(r, inv_g);
    } else {
      r = pool_avg ? 0.f : -INFINITY;  // avg counts the padding as zeros; max ignores it
    }
    raw[idx] = r;
  }
  __syncthreads();
  const int j = j0 + threadIdx.x;
  if (j >= S) return;
  float v = pool_avg ? 0.f : -INFINITY;
  for (int w = 0; w < pool_kernel; ++w) {
    const float r = raw[threadIdx.x + w];
    v = pool_avg ? __fadd_rn(v, r) : nan_max(v, r);
  }
  if (pool_avg) v = __fmul_rn(v, inv_pool);
  scores[static_cast<int64_t>(row) * S + j] = v;
}

template <typename T>
__global__ void __launch_bounds__(256)
    out_combine_kernel(const float* __restrict__ ws_out, int chunks, int64_t total, T* __restrict__ out) {
  for (int64_t e = blockIdx.x * 256ll + threadIdx.x; e < total; e += static_cast<int64_t>(gridDim.x) * 256) {
    float s = ws_out[e];
    for (int c = 1; c < chunks; ++c) s += ws_out[c * total + e];
    out[e] = from_float<T>(s);
  }
}

// ---- host plan -----------------------------------------------------------------------------------

struct Plan {
  int mtiles_per_head, heads_per_block, nseg, rowblocks;
  int stats_chunk_keys, stats_chunks;
  int main_chunk_keys, main_chunks;
  size_t stats_offset, col_offset, out_offset, bytes;
};

// Chunks of the key range [0, key_end) in whole tiles: at most two blocks per multiprocessor (what
// the tensor-core configurations keep resident), so the grid is one wave.
void chunking(int64_t key_end, int key_tile, int64_t blocks_per_chunk, int num_sms, int& chunk_keys, int& chunks) {
  const int64_t tiles = ceil_div(key_end, key_tile);
  const int64_t want = clamp64(2 * static_cast<int64_t>(num_sms) / blocks_per_chunk, 1, tiles);
  chunk_keys = static_cast<int>(ceil_div(tiles, want) * key_tile);
  chunks = static_cast<int>(ceil_div(key_end, chunk_keys));
}

Plan make_plan(int warps, int key_tile, int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t N, int64_t D, int64_t S,
               bool with_out, int num_sms) {
  Plan p;
  const int64_t G = Hq / Hkv;
  p.mtiles_per_head = static_cast<int>(ceil_div(Tq, 16));
  if (p.mtiles_per_head <= warps) {
    p.heads_per_block = static_cast<int>(std::min<int64_t>(G, warps / p.mtiles_per_head));
    p.nseg = 1;
    p.rowblocks = static_cast<int>(ceil_div(G, p.heads_per_block));
  } else {
    p.heads_per_block = 1;
    p.nseg = static_cast<int>(ceil_div(p.mtiles_per_head, warps));
    p.rowblocks = static_cast<int>(G * p.nseg);
  }
  const int64_t blocks_per_chunk = B * Hkv * p.rowblocks;
  chunking(N, key_tile, blocks_per_chunk, num_sms, p.stats_chunk_keys, p.stats_chunks);
  chunking(with_out ? N : S, key_tile, blocks_per_chunk, num_sms, p.main_chunk_keys, p.main_chunks);
  WorkspaceLayout ws;
  p.stats_offset = ws.take(sizeof(float) * 2 * B * Hq * Tq * p.stats_chunks);
  p.col_offset = ws.take(sizeof(float) * B * Hq * p.nseg * S);
  p.out_offset = ws.take(with_out ? sizeof(float) * p.main_chunks * B * Hq * Tq * D : 0);
  p.bytes = ws.bytes;
  return p;
}

template <typename T, int D_PAD>
Plan plan_for(const AttentionArgs& a, bool with_out, int num_sms) {
  using C = Cfg<T, D_PAD>;
  return make_plan(C::kWarps, C::kKeyTile, a.B, a.Hq, a.Hkv, a.Tq, a.N, a.D, a.S, with_out, num_sms);
}

template <typename T, int D_PAD, int MODE>
void launch_pass(const Params& params, int chunks, int rowblocks, int64_t rows, Stream stream, const char* name) {
  using C = Cfg<T, D_PAD>;
  launch(name, attention_kernel<T, D_PAD, MODE>, dim3(chunks, rowblocks, static_cast<unsigned>(rows)), C::kThreads,
         C::smem_bytes(static_cast<Mode>(MODE)), stream, params);
}

template <typename T, int D_PAD>
void run(const AttentionArgs& a, char* workspace, int num_sms, Stream stream) {
  const bool with_out = a.out != nullptr;
  const Plan plan = plan_for<T, D_PAD>(a, with_out, num_sms);
  Params p;
  p.q = a.q;
  p.q_sb = a.q_sb;
  p.q_sh = a.q_sh;
  p.q_st = a.q_st;
  p.k = a.k;
  p.k_sb = a.k_sb;
  p.k_sh = a.k_sh;
  p.k_sn = a.k_sn;
  p.v = a.v;
  p.v_sb = a.v_sb;
  p.v_sh = a.v_sh;
  p.v_sn = a.v_sn;
  p.B = static_cast<int>(a.B);
  p.Hq = static_cast<int>(a.Hq);
  p.Hkv = static_cast<int>(a.Hkv);
  p.G = static_cast<int>(a.Hq / a.Hkv);
  p.Tq = static_cast<int>(a.Tq);
  p.N = static_cast<int>(a.N);
  p.D = static_cast<int>(a.D);
  p.S = static_cast<int>(a.S);
  p.scale_log2 = static_cast<float>(static_cast<double>(a.scale) * 1.4426950408889634);
  p.mtiles_per_head = plan.mtiles_per_head;
  p.heads_per_block = plan.heads_per_block;
  p.nseg = plan.nseg;
  p.stats_chunks = plan.stats_chunks;
  p.query_max = a.query_reduce == Reduce::kMax;
  const bool dim_vec = (a.D * sizeof(T)) % 16 == 0;
  p.q_vec = dim_vec && rows_aligned16(a.q, sizeof(T), {{a.B, a.q_sb}, {a.Hq, a.q_sh}, {a.Tq, a.q_st}});
  p.k_vec = dim_vec && rows_aligned16(a.k, sizeof(T), {{a.B, a.k_sb}, {a.Hkv, a.k_sh}, {a.N, a.k_sn}});
  p.v_vec = with_out && dim_vec && rows_aligned16(a.v, sizeof(T), {{a.B, a.v_sb}, {a.Hkv, a.v_sh}, {a.N, a.v_sn}});
  p.ws_stats = reinterpret_cast<float*>(workspace + plan.stats_offset);
  p.ws_col = reinterpret_cast<float*>(workspace + plan.col_offset);
  p.ws_out = reinterpret_cast<float*>(workspace + plan.out_offset);
  const int64_t rows = a.B * a.Hkv;

  p.chunk_keys = plan.stats_chunk_keys;
  p.key_end = p.N;
  launch_pass<T, D_PAD, kStats>(p, plan.stats_chunks, plan.rowblocks, rows, stream, "attention_kernel<stats>");

  p.chunk_keys = plan.main_chunk_keys;
  p.key_end = with_out ? p.N : p.S;
  if (with_out) {
    launch_pass<T, D_PAD, kScoresOut>(p, plan.main_chunks, plan.rowblocks, rows, stream,
                                      "attention_kernel<scores+out>");
  } else {
    launch_pass<T, D_PAD, kScores>(p, plan.main_chunks, plan.rowblocks, rows, stream, "attention_kernel<scores>");
  }

  const int halo = static_cast<int>(a.pool_kernel / 2);
  launch("scores_finalize_kernel", scores_finalize_kernel,
         dim3(static_cast<unsigned>(ceil_div(a.S, kFinalTile)), static_cast<unsigned>(rows)), kFinalTile,
         (kFinalTile + 2 * halo) * sizeof(float), stream, p.ws_col, p.Hq, p.Hkv, p.G, p.nseg, p.S,
         a.query_reduce == Reduce::kMax, 1.f / p.Tq, 1.f / p.G, a.gqa_reduce == Reduce::kMax,
         static_cast<int>(a.pool_kernel), 1.f / static_cast<float>(a.pool_kernel), a.pool_type == PoolType::kAvg,
         a.scores);

  if (with_out) {
    const int64_t total = a.B * a.Hq * a.Tq * a.D;
    const unsigned blocks =
        static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 8 * static_cast<int64_t>(num_sms)));
    launch("out_combine_kernel", out_combine_kernel<T>, blocks, 256, 0, stream, p.ws_out, plan.main_chunks, total,
           static_cast<T*>(a.out));
  }
}

template <typename T>
void run_dtype(const AttentionArgs& a, char* ws, int num_sms, Stream stream) {
  if (a.D <= 64) return run<T, 64>(a, ws, num_sms, stream);
  if (a.D <= 128) return run<T, 128>(a, ws, num_sms, stream);
  return run<T, 256>(a, ws, num_sms, stream);
}

template <typename T>
Plan plan_dtype(const AttentionArgs& a, bool with_out, int num_sms) {
  if (a.D <= 64) return plan_for<T, 64>(a, with_out, num_sms);
  if (a.D <= 128) return plan_for<T, 128>(a, with_out, num_sms);
  return plan_for<T, 256>(a, with_out, num_sms);
}

void check_sizes(const AttentionArgs& a, int num_sms) {
  check_arg(a.B >= 1 && a.Hq >= 1 && a.Hkv >= 1 && a.Tq >= 1 && a.N >= 1 && a.D >= 1 && num_sms >= 1,
            "attention: sizes must be >= 1");
  check_arg(a.Hq % a.Hkv == 0, "attention: Hq must be a multiple of Hkv");
  check_arg(a.Tq <= a.N, "attention: Tq must be <= N");
  check_arg(a.S >= 1 && a.S <= a.N, "attention: num_scored must be in [1, N]");
  check_arg(a.D <= 256, "attention: head_dim must be <= 256");
  check_arg(a.B * a.Hkv <= 65535 && a.Hq <= 65535, "attention: B*Hkv and Hq must be <= 65535");
  check_arg(a.N < (int64_t{1} << 30), "attention: N must be < 2^30");
  check_arg(a.pool_kernel >= 1 && a.pool_kernel % 2 == 1 && a.pool_kernel <= 4095,
            "attention: pool_kernel must be odd in [1, 4095]");
}

Plan plan_any(const AttentionArgs& a, bool with_out, int num_sms) {
  switch (a.dtype) {
    case DType::kFloat32:
      return plan_dtype<float>(a, with_out, num_sms);
    case DType::kFloat16:
      return plan_dtype<__half>(a, with_out, num_sms);
    case DType::kBFloat16:
      return plan_dtype<__nv_bfloat16>(a, with_out, num_sms);
  }
  throw std::invalid_argument("lookaheadkv native: unknown dtype");
}

}  // namespace

size_t attention_workspace_bytes(DType dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t N, int64_t D,
                                 int64_t S, bool with_out, int num_sms) {
  AttentionArgs a{};
  a.dtype = dtype;
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Tq = Tq;
  a.N = N;
  a.D = D;
  a.S = S;
  a.pool_kernel = 1;
  check_sizes(a, num_sms);
  return plan_any(a, with_out, num_sms).bytes;
}

void attention(const AttentionArgs& a, void* workspace, int num_sms, Stream stream) {
  check_sizes(a, num_sms);
  check_arg(a.scores != nullptr && (a.out == nullptr) == (a.v == nullptr), "attention: out and v go together");
  char* ws = static_cast<char*>(workspace);
  switch (a.dtype) {
    case DType::kFloat32:
      run_dtype<float>(a, ws, num_sms, stream);
      break;
    case DType::kFloat16:
      run_dtype<__half>(a, ws, num_sms, stream);
      break;
    case DType::kBFloat16:
      run_dtype<__nv_bfloat16>(a, ws, num_sms, stream);
      break;
  }
}

}  // namespace cuda
}  // namespace lookaheadkv
