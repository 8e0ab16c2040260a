// Device and launch helpers shared by the CUDA kernels: sizes and alignment, dtype conversion,
// warp/block scans, and (last section) launches and the sm_80+ primitives: ldmatrix, mma.sync
// m16n8k16, cp.async.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "api.cuh"

namespace lookaheadkv {
namespace cuda {

// ---- host side ----------------------------------------------------------------------------------

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Rows addressed by base + sum(index_i * stride_i) elements all start on 16 bytes when the base
// does and every stride of a dim longer than 1 is a multiple of 16 bytes (a size-1 dim's stride is
// never used).
inline bool rows_aligned16(const void* base, int64_t elem_size,
                           std::initializer_list<std::pair<int64_t, int64_t>> dims) {
  if (!aligned16(base)) return false;
  for (const auto& size_stride : dims) {
    if (size_stride.first > 1 && (size_stride.second * elem_size) % 16 != 0) return false;
  }
  return true;
}

// Workspace carving: consecutive 256-byte aligned regions.
struct WorkspaceLayout {
  size_t bytes = 0;
  size_t take(size_t n) {
    size_t at = bytes;
    bytes += (n + 255) / 256 * 256;
    return at;
  }
};

// ---- element types ------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two floats as one 32-bit register of two 16-bit values, the lower column in the low half (the
// operand layout of mma.sync).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// NaN-propagating max (torch.amax / max_pool1d semantics; fmaxf would drop a NaN).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// ---- scans --------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t warp_inclusive_scan(uint32_t v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    uint32_t n = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += n;
  }
  return v;
}

// Exclusive prefix sum of one value per thread over a block of THREADS threads (all must call);
// `total` receives the block sum. `scratch` holds THREADS/32 + 1 words.
template <int THREADS>
__device__ __forceinline__ uint32_t block_exclusive_scan(uint32_t v, uint32_t* scratch, uint32_t& total) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block size");
  constexpr int kWarps = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t inclusive = warp_inclusive_scan(v);
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    uint32_t w = lane < kWarps ? scratch[lane] : 0u;
    uint32_t wi = warp_inclusive_scan(w);
    if (lane < kWarps) scratch[lane] = wi - w;  // exclusive offset of each warp
    if (lane == kWarps - 1) scratch[kWarps] = wi;
  }
  __syncthreads();
  uint32_t result = scratch[warp] + inclusive - v;
  total = scratch[kWarps];
  __syncthreads();  // scratch may be reused right after
  return result;
}

// ---- paged index guards -------------------------------------------------------------------------

// Whether the first `count` ids of a block table row all lie in [0, num_blocks), in every thread of
// the block (all must call; `flag` is a shared word). Index data is checked on the device: the host
// never reads it.
__device__ __forceinline__ bool block_ids_in_range(const int32_t* table, int count, int64_t num_blocks, int* flag) {
  if (threadIdx.x == 0) *flag = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    const int32_t id = table[j];
    if (id < 0 || id >= num_blocks) *flag = 1;
  }
  __syncthreads();
  const bool in_range = *flag == 0;
  __syncthreads();  // the flag may be reused
  return in_range;
}

// ---- hardware: launches and PTX primitives ----------------------------------------------------
// Everything that needs a GPU sits in this one section. python_tests/cuda_emulation/ compiles the
// kernels for the host with LOOKAHEADKV_CUDA_EMULATION and supplies twins of these functions (same
// signatures, semantics from the PTX ISA), so the kernels' logic is tested without a GPU.
#ifndef LOOKAHEADKV_CUDA_EMULATION

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lookaheadkv CUDA: ") + what + ": " + cudaGetErrorString(err));
  }
}

// Enqueues kernel<<<grid, block, smem, stream>>>(args...) and turns a launch error (or a sticky
// error from earlier work) into an exception. Kernels using more than 48 KiB of dynamic shared
// memory must opt in, per device, so the attribute is set before every such launch.
template <typename... Params, typename... Args>
inline void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream stream,
                   Args&&... args) {
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)), name);
  }
  kernel<<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(std::forward<Args>(args)...);
  check_cuda(cudaGetLastError(), name);
}

inline void memset_async(void* ptr, int value, size_t bytes, Stream stream) {
  check_cuda(cudaMemsetAsync(ptr, value, bytes, static_cast<cudaStream_t>(stream)), "cudaMemsetAsync");
}

// The block's dynamic shared memory (size given at launch).
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char lookaheadkv_dynamic_smem[];
  return reinterpret_cast<T*>(lookaheadkv_dynamic_smem);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane l gives the row address of matrix l/8, row l%8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// D = A·B + D for one m16n8k16 tile, fp32 accumulators. Fragment layout (g = lane/4, t = lane%4):
//   a: {a0a1: (g, 2t..2t+1), a2a3: (g+8, 2t..), a4a5: (g, 2t+8..), a6a7: (g+8, 2t+8..)}
//   b: {b0b1: (k 2t..2t+1, n g), b2b3: (k 2t+8.., n g)}
//   c: {c0c1: (g, 2t..2t+1), c2c3: (g+8, 2t..2t+1)}
template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global->shared copy that bypasses L1 (streamed data); with fill == false the 16 bytes
// are zero-filled and `src` is not read.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool fill) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(fill ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#endif  // LOOKAHEADKV_CUDA_EMULATION

}  // namespace cuda
}  // namespace lookaheadkv
