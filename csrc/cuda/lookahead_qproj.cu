// lookahead_qproj (docs/ops.md §1): q = x·Wᵀ (+ bias) + lora_scale·(x·Aᵀ)·Bᵀ, per-head RMSNorm,
// RoPE, for the few (≈32) lookahead rows.
//
// With T ≈ 32 rows the product reads W once and is bound by W's bytes, so the work is split along
// the hidden (K) axis until every multiprocessor streams W:
//   1. projection: block = 64 output features x 32 tokens x one K split; its 4 warps each own a
//      quarter of that split and accumulate a 64x32 fp32 tile; the warps' tiles are summed in a
//      fixed order through shared memory and the block writes partial[split][t][feature].
//      bf16/fp16 with 16-byte aligned rows: W and x fragments come straight from global memory with
//      16-byte loads into mma.sync m16n8k16 (see load order below). Otherwise (fp32, or unaligned
//      rows): fp32 FMAs on tiles staged through shared memory, same tile and partial layout.
//   2. LoRA down-projection xa = x·Aᵀ [T, rank] (only with LoRA): one block per (t, j).
//   3. epilogue, one block per (t, head): sum the splits in order (deterministic, no atomics),
//      + bias + lora_scale·xa·Bᵀ, RMSNorm over the head, RoPE, one rounding to x's dtype.
#include "device.cuh"

namespace lookaheadkv {
namespace cuda {
namespace {

constexpr int kWarps = 4;  // K slices per block
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 64;                // output features per block: 4 m16 tiles
constexpr int kTokens = 32;              // tokens per block: 4 n8 tiles
constexpr int kChunk = 32;               // hidden elements per step of the tensor-core path (two k16 mmas)
constexpr int kRedStride = kRows + 4;    // +4 floats: conflict-free fragment stores
constexpr int kSimtK = 16;               // hidden elements per staged step of the FMA path
constexpr int kSimtStride = kSimtK + 4;  // +4 floats: conflict-free 16-byte fragment reads
constexpr int kStageFloats = (kRows + kTokens) * kSimtStride;  // one warp's staged W and x tiles
constexpr int kRedFloats = kWarps * kTokens * kRedStride;
constexpr int kSmemFloats = kRedFloats > kWarps* kStageFloats ? kRedFloats : kWarps * kStageFloats;

struct Plan {
  int64_t row_tiles, tok_tiles, kchunks, splits, chunks_per_warp;
  size_t partial_offset, xa_offset, bytes;
};

Plan make_plan(int64_t T, int64_t hidden, int64_t out_features, int64_t rank, int num_sms) {
  Plan p;
  p.row_tiles = ceil_div(out_features, kRows);
  p.tok_tiles = ceil_div(T, kTokens);
  p.kchunks = ceil_div(hidden, kChunk);
  // One wave of blocks streams W: the tensor-core kernel's registers allow 2 blocks (8 warps) per
  // multiprocessor, so the K splits fill 2 * num_sms blocks without starting a second, partial
  // wave; each warp keeps at least one 32-element chunk. The partials (splits x T x out_features
  // floats) stay in L2.
  const int64_t max_splits = std::max<int64_t>(1, p.kchunks / kWarps);
  p.splits = clamp64(2 * static_cast<int64_t>(num_sms) / (p.row_tiles * p.tok_tiles), 1, max_splits);
  p.chunks_per_warp = ceil_div(p.kchunks, p.splits * kWarps);
  WorkspaceLayout ws;
  p.partial_offset = ws.take(sizeof(float) * p.splits * T * out_features);
  p.xa_offset = ws.take(sizeof(float) * T * rank);
  p.bytes = ws.bytes;
  return p;
}

// The hidden range [begin, end) of warp slice `slice` (split * kWarps + warp).
__device__ __forceinline__ void slice_range(int slice, int chunks_per_warp, int hidden, int& begin, int& end) {
  const int kchunks = (hidden + kChunk - 1) / kChunk;
  const int c0 = min(slice * chunks_per_warp, kchunks);
  const int c1 = min(c0 + chunks_per_warp, kchunks);
  begin = c0 * kChunk;
  end = min(c1 * kChunk, hidden);
}

// acc[mt][nt][e] is the m16n8 accumulator fragment of features mt*16 + g (+8 for e >= 2) and tokens
// nt*8 + 2t (+1 for odd e). Sums the 4 warps' tiles in warp order and writes this split's partial.
__device__ __forceinline__ void store_partial(const float (&acc)[4][4][4], float* red, int row0, int tok0, int T,
                                              int out_features, float* __restrict__ partial_split) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = mt * 16 + g + (e >> 1) * 8, tok = nt * 8 + 2 * t + (e & 1);
        red[(warp * kTokens + tok) * kRedStride + row] = acc[mt][nt][e];
      }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTokens * kRows; idx += kThreads) {
    const int tok = idx / kRows, row = idx % kRows;
    float sum = red[tok * kRedStride + row];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) sum += red[(w * kTokens + tok) * kRedStride + row];
    if (tok0 + tok < T && row0 + row < out_features) {
      partial_split[static_cast<int64_t>(tok0 + tok) * out_features + row0 + row] = sum;
    }
  }
}

union Vec16 {
  uint4 v;
  uint32_t w[4];
};

// Tensor-core projection (bf16/fp16, hidden % 8 == 0, 16-byte aligned rows).
// The dot product may visit the hidden axis in any order as long as A and B agree, so each lane
// loads 8 consecutive elements (16 bytes) of a W row and of an x row at hidden offset
// chunk + 8t and feeds words 0,1 to the first k16 mma and words 2,3 to the second: logical
// k = 2t, 2t+1 map to elements 4s, 4s+1 and k = 2t+8, 2t+9 to elements 4s+2, 4s+3 of step s, for
// both the A (W rows g, g+8) and the B (x row g) fragments.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    qproj_mma_kernel(const T* __restrict__ x, int64_t x_rs, const T* __restrict__ w, int64_t w_rs, int T_, int hidden,
                     int out_features, int chunks_per_warp, float* __restrict__ partial) {
  __shared__ __align__(16) float red[kRedFloats];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * kRows, tok0 = blockIdx.z * kTokens;
  int begin, end;
  slice_range(blockIdx.y * kWarps + warp, chunks_per_warp, hidden, begin, end);

  const T* wrow[4][2];
  bool wok[4][2];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = row0 + mt * 16 + hh * 8 + g;
      wok[mt][hh] = row < out_features;
      wrow[mt][hh] = w + static_cast<int64_t>(wok[mt][hh] ? row : 0) * w_rs + 8 * t;
    }
  const T* xrow[4];
  bool xok[4];
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int tok = tok0 + nt * 8 + g;
    xok[nt] = tok < T_;
    xrow[nt] = x + static_cast<int64_t>(xok[nt] ? tok : 0) * x_rs + 8 * t;
  }

  float acc[4][4][4] = {};
#pragma unroll 2
  for (int k = begin; k < end; k += kChunk) {
    const bool kin = k + 8 * t < end;  // hidden % 8 == 0: a lane's 8 elements are all in or all out
    Vec16 a[4][2], b[4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        a[mt][hh].v =
            (kin && wok[mt][hh]) ? __ldg(reinterpret_cast<const uint4*>(wrow[mt][hh] + k)) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
      b[nt].v = (kin && xok[nt]) ? __ldg(reinterpret_cast<const uint4*>(xrow[nt] + k)) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const uint32_t af[4] = {a[mt][0].w[2 * s], a[mt][1].w[2 * s], a[mt][0].w[2 * s + 1], a[mt][1].w[2 * s + 1]};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_16816<T>(acc[mt][nt], af, b[nt].w[2 * s], b[nt].w[2 * s + 1]);
      }
  }
  store_partial(acc, red, row0, tok0, T_, out_features, partial + static_cast<int64_t>(blockIdx.y) * T_ * out_features);
}

// FMA projection for fp32 and for rows that are not 16-byte aligned: each warp stages its W
// (64 x 16) and x (32 x 16) tiles as fp32 in shared memory and computes the same fragment tile as
// the tensor-core path, so the block reduction is shared.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    qproj_fma_kernel(const T* __restrict__ x, int64_t x_rs, const T* __restrict__ w, int64_t w_rs, int T_, int hidden,
                     int out_features, int chunks_per_warp, float* __restrict__ partial) {
  __shared__ __align__(16) float smem[kSmemFloats];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * kRows, tok0 = blockIdx.z * kTokens;
  int begin, end;
  slice_range(blockIdx.y * kWarps + warp, chunks_per_warp, hidden, begin, end);
  float* wtile = smem + warp * kStageFloats;  // rows 0..63: W, rows 64..95: x
  float* xtile = wtile + kRows * kSimtStride;

  float acc[4][4][4] = {};
  for (int k0 = begin; k0 < end; k0 += kSimtK) {
    __syncwarp();
    for (int e = lane; e < kRows * kSimtK; e += 32) {
      const int r = e / kSimtK, kk = e % kSimtK, row = row0 + r;
      wtile[r * kSimtStride + kk] =
          (row < out_features && k0 + kk < end) ? to_float(w[static_cast<int64_t>(row) * w_rs + k0 + kk]) : 0.f;
    }
    for (int e = lane; e < kTokens * kSimtK; e += 32) {
      const int r = e / kSimtK, kk = e % kSimtK, tok = tok0 + r;
      xtile[r * kSimtStride + kk] =
          (tok < T_ && k0 + kk < end) ? to_float(x[static_cast<int64_t>(tok) * x_rs + k0 + kk]) : 0.f;
    }
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < kSimtK; kk += 4) {
      float4 xb[4][2];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int u = 0; u < 2; ++u)
          xb[nt][u] = *reinterpret_cast<const float4*>(xtile + (nt * 8 + 2 * t + u) * kSimtStride + kk);
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const float4 wa = *reinterpret_cast<const float4*>(wtile + (mt * 16 + hh * 8 + g) * kSimtStride + kk);
#pragma unroll
          for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              float& c = acc[mt][nt][hh * 2 + u];
              c = fmaf(wa.x, xb[nt][u].x, c);
              c = fmaf(wa.y, xb[nt][u].y, c);
              c = fmaf(wa.z, xb[nt][u].z, c);
              c = fmaf(wa.w, xb[nt][u].w, c);
            }
        }
      }
    }
  }
  __syncthreads();  // the reduction below reuses every warp's staging area
  store_partial(acc, smem, row0, tok0, T_, out_features,
                partial + static_cast<int64_t>(blockIdx.y) * T_ * out_features);
}

// Deterministic sum over the 4 warps of a 128-thread block; every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) scratch[warp] = v;
  __syncthreads();
  float total = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// xa[t][j] = x[t]·A[j], one block per (t, j).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    qproj_lora_down_kernel(const T* __restrict__ x, int64_t x_rs, const float* __restrict__ lora_a, int hidden,
                           int rank, float* __restrict__ xa) {
  __shared__ float scratch[kWarps];
  const int t = blockIdx.x, j = blockIdx.y;
  const T* xr = x + static_cast<int64_t>(t) * x_rs;
  const float* ar = lora_a + static_cast<int64_t>(j) * hidden;
  float s = 0.f;
  for (int k = threadIdx.x; k < hidden; k += kThreads) s = fmaf(to_float(xr[k]), ar[k], s);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) xa[t * rank + j] = s;
}

// One block per (token, head): split sum, bias, LoRA up-projection, RMSNorm, RoPE, rounding.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    qproj_epilogue_kernel(const float* __restrict__ partial, int splits, const float* __restrict__ bias,
                          const float* __restrict__ xa, const float* __restrict__ lora_b, int rank, float lora_scale,
                          const float* __restrict__ norm_weight, float eps, const float* __restrict__ cos,
                          const float* __restrict__ sin, int T_, int num_heads, int head_dim, T* __restrict__ out) {
  float* qv = dynamic_smem<float>();  // the head's head_dim values
  __shared__ float scratch[kWarps];
  const int t = blockIdx.x, h = blockIdx.y;
  const int out_features = num_heads * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    const int o = h * head_dim + d;
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += partial[(static_cast<int64_t>(s) * T_ + t) * out_features + o];
    if (bias != nullptr) acc += bias[o];
    if (rank > 0) {
      float lo = 0.f;
      for (int j = 0; j < rank; ++j) lo = fmaf(xa[t * rank + j], lora_b[static_cast<int64_t>(o) * rank + j], lo);
      acc = fmaf(lora_scale, lo, acc);
    }
    qv[d] = acc;
  }
  __syncthreads();
  float inv_rms = 1.f;
  if (norm_weight != nullptr) {
    float ss = 0.f;
    for (int d = threadIdx.x; d < head_dim; d += kThreads) ss = fmaf(qv[d], qv[d], ss);
    ss = block_sum(ss, scratch);
    inv_rms = 1.f / sqrtf(ss / static_cast<float>(head_dim) + eps);
  }
  const int half = head_dim / 2;
  const float* c = cos + static_cast<int64_t>(t) * head_dim;
  const float* sn = sin + static_cast<int64_t>(t) * head_dim;
  T* o = out + (static_cast<int64_t>(t) * num_heads + h) * head_dim;
  for (int d = threadIdx.x; d < half; d += kThreads) {
    float lo = qv[d], hi = qv[d + half];
    if (norm_weight != nullptr) {
      lo = lo * inv_rms * norm_weight[d];
      hi = hi * inv_rms * norm_weight[d + half];
    }
    // rotate_half(q) = cat(-q[half:], q[:half])
    o[d] = from_float<T>(lo * c[d] - hi * sn[d]);
    o[d + half] = from_float<T>(hi * c[d + half] + lo * sn[d + half]);
  }
}

template <typename T>
void run(const QProjArgs& a, const Plan& p, char* workspace, Stream stream) {
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight);
  const int T_ = static_cast<int>(a.T), hidden = static_cast<int>(a.hidden);
  const int out_features = static_cast<int>(a.num_heads * a.head_dim);
  float* partial = reinterpret_cast<float*>(workspace + p.partial_offset);
  float* xa = reinterpret_cast<float*>(workspace + p.xa_offset);

  const dim3 grid(static_cast<unsigned>(p.row_tiles), static_cast<unsigned>(p.splits),
                  static_cast<unsigned>(p.tok_tiles));
  const bool tensor_cores = a.dtype != DType::kFloat32 && a.hidden % 8 == 0 &&
                            rows_aligned16(a.x, sizeof(T), {{a.T, a.x_row_stride}}) &&
                            rows_aligned16(a.weight, sizeof(T), {{out_features, a.w_row_stride}});
  if constexpr (!std::is_same<T, float>::value) {
    if (tensor_cores) {
      launch("qproj_mma_kernel", qproj_mma_kernel<T>, grid, kThreads, 0, stream, x, a.x_row_stride, w, a.w_row_stride,
             T_, hidden, out_features, static_cast<int>(p.chunks_per_warp), partial);
    }
  }
  if (!tensor_cores) {
    launch("qproj_fma_kernel", qproj_fma_kernel<T>, grid, kThreads, 0, stream, x, a.x_row_stride, w, a.w_row_stride, T_,
           hidden, out_features, static_cast<int>(p.chunks_per_warp), partial);
  }
  if (a.rank > 0) {
    launch("qproj_lora_down_kernel", qproj_lora_down_kernel<T>, dim3(T_, static_cast<unsigned>(a.rank)), kThreads, 0,
           stream, x, a.x_row_stride, a.lora_a, hidden, static_cast<int>(a.rank), xa);
  }
  launch("qproj_epilogue_kernel", qproj_epilogue_kernel<T>, dim3(T_, static_cast<unsigned>(a.num_heads)), kThreads,
         a.head_dim * sizeof(float), stream, partial, static_cast<int>(p.splits), a.bias, xa, a.lora_b,
         static_cast<int>(a.rank), a.lora_scale, a.norm_weight, a.eps, a.cos, a.sin, T_, static_cast<int>(a.num_heads),
         static_cast<int>(a.head_dim), static_cast<T*>(a.out));
}

}  // namespace

size_t qproj_workspace_bytes(int64_t T, int64_t hidden, int64_t out_features, int64_t rank, int num_sms) {
  check_arg(T >= 1 && hidden >= 1 && out_features >= 1 && rank >= 0 && num_sms >= 1, "qproj: bad sizes");
  return make_plan(T, hidden, out_features, rank, num_sms).bytes;
}

void lookahead_qproj(const QProjArgs& a, void* workspace, int num_sms, Stream stream) {
  check_arg(a.T >= 1 && a.hidden >= 1 && a.num_heads >= 1 && num_sms >= 1, "qproj: T, hidden, num_heads must be >= 1");
  check_arg(a.head_dim >= 2 && a.head_dim % 2 == 0, "qproj: head_dim must be even");
  check_arg(a.head_dim * sizeof(float) <= 48 * 1024, "qproj: head_dim must be <= 12288");
  check_arg(a.rank >= 0 && a.rank <= 65535 && (a.rank > 0) == (a.lora_a != nullptr && a.lora_b != nullptr),
            "qproj: lora_a and lora_b must be given together with rank in [1, 65535]");
  check_arg(a.num_heads <= 65535, "qproj: num_heads must be <= 65535");
  const int64_t out_features = a.num_heads * a.head_dim;
  check_arg(a.T * std::max(out_features, a.hidden) < (int64_t{1} << 31) && a.hidden < (int64_t{1} << 30),
            "qproj: sizes exceed 32-bit indexing");
  const Plan p = make_plan(a.T, a.hidden, out_features, a.rank, num_sms);
  char* ws = static_cast<char*>(workspace);
  switch (a.dtype) {
    case DType::kFloat32:
      run<float>(a, p, ws, stream);
      break;
    case DType::kFloat16:
      run<__half>(a, p, ws, stream);
      break;
    case DType::kBFloat16:
      run<__nv_bfloat16>(a, p, ws, stream);
      break;
  }
}

}  // namespace cuda
}  // namespace lookaheadkv
