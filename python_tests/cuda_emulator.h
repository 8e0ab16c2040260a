// Host emulation of the CUDA kernels, for tests on machines without a GPU.
//
// python_tests/cuda_emulator.py compiles csrc/cuda_bindings.cpp and csrc/cuda/*.cu with g++ and
// `-include` of this header: the kernel source is unchanged; this header supplies the CUDA
// built-ins and the twins of the hardware section of csrc/cuda/device.cuh (launch, dynamic shared
// memory, ldmatrix, mma.sync, cp.async), written from the PTX ISA's definitions.
//
// Every thread of a block runs as a fiber (ucontext for the first entry, then _setjmp/_longjmp);
// __syncthreads and every warp collective are barriers on which fibers wait until all live
// threads of the block / warp arrive, so warp-synchronous code runs as on the GPU. Blocks run one
// after another. Dynamic shared memory is filled with 0xff bytes (NaN in every float type) before
// each block, so a read of shared memory nothing wrote shows up as NaN. Checks the GPU would fault
// on: misaligned or non-shared ldmatrix/cp.async addresses, block size, shared-memory size (the
// sm_80 limit, the smallest of the built targets), barrier deadlock.
// Not emulated: timing, races (execution order is deterministic), the memory model.
#pragma once

#define LOOKAHEADKV_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kMaxDynamicSmem = 166912;  // sm_80's opt-in maximum per block (163 KiB)

struct Barrier {
  int live = 0, arrived = 0;
  unsigned generation = 0;
};

struct Fiber {
  ucontext_t start;
  jmp_buf resume;
  std::vector<char> stack;
  uint3 thread_idx;
  int warp = 0, lane = 0;
  bool started = false, done = false;
  const Barrier* waiting = nullptr;
  unsigned waiting_generation = 0;
};

struct Warp {
  Barrier barrier;
  alignas(16) unsigned char slots[32][64];
};

struct Runtime {
  jmp_buf scheduler;
  ucontext_t scheduler_context;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  uint3 block_idx;
  dim3 block_dim, grid_dim;
  Barrier block_barrier;
  std::vector<Warp> warps;
  std::vector<unsigned char> dynamic_smem;
  std::function<void()> body;
  std::string error;
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

inline void yield() {
  Runtime& r = runtime();
  if (_setjmp(r.current->resume) == 0) _longjmp(r.scheduler, 1);
}

// A fiber that finds a fault records it and leaves its block; launch() then throws.
[[noreturn]] inline void fault(const std::string& what) {
  Runtime& r = runtime();
  if (r.error.empty()) r.error = what;
  _longjmp(r.scheduler, 2);
}

inline void release(Barrier& b) {
  b.arrived = 0;
  ++b.generation;
}

inline void wait(Barrier& b) {
  Runtime& r = runtime();
  if (++b.arrived == b.live) {
    release(b);
    return;
  }
  r.current->waiting = &b;
  r.current->waiting_generation = b.generation;
  yield();
}

inline void fiber_entry() {
  Runtime& r = runtime();
  r.body();
  Fiber* f = r.current;
  f->done = true;
  Barrier* barriers[2] = {&r.block_barrier, &r.warps[f->warp].barrier};
  for (Barrier* b : barriers) {
    --b->live;
    if (b->arrived > 0 && b->arrived == b->live) release(*b);
  }
  _longjmp(r.scheduler, 1);
}

// Runs every thread of the current block to completion.
inline void run_block(int threads) {
  Runtime& r = runtime();
  r.block_barrier = Barrier{};
  r.block_barrier.live = threads;
  r.warps.assign((threads + 31) / 32, Warp{});
  for (int i = 0; i < threads; ++i) r.warps[i / 32].barrier.live++;
  for (int i = 0; i < threads; ++i) {
    Fiber& f = r.fibers[i];
    f.thread_idx =
        make_uint3(i % r.block_dim.x, (i / r.block_dim.x) % r.block_dim.y, i / (r.block_dim.x * r.block_dim.y));
    f.warp = i / 32;
    f.lane = i % 32;
    f.started = f.done = false;
    f.waiting = nullptr;
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = f.stack.data();
    f.start.uc_stack.ss_size = f.stack.size();
    f.start.uc_link = nullptr;
    makecontext(&f.start, fiber_entry, 0);
  }
  int remaining = threads;
  while (remaining > 0) {
    bool progress = false;
    for (int i = 0; i < threads; ++i) {
      Fiber& f = r.fibers[i];
      if (f.done || (f.waiting != nullptr && f.waiting->generation == f.waiting_generation)) continue;
      f.waiting = nullptr;
      r.current = &f;
      const int how = _setjmp(r.scheduler);
      if (how == 0) {
        if (!f.started) {
          f.started = true;
          swapcontext(&r.scheduler_context, &f.start);
        } else {
          _longjmp(f.resume, 1);
        }
      }
      if (how == 2) throw std::runtime_error("emulated CUDA fault: " + r.error);
      progress = true;
      if (f.done) --remaining;
    }
    if (!progress) throw std::runtime_error("emulated CUDA: deadlock, threads wait on a barrier others never reach");
  }
}

inline bool in_dynamic_smem(const void* p, size_t bytes) {
  const auto& s = runtime().dynamic_smem;
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return c >= s.data() && c + bytes <= s.data() + s.size();
}

template <typename V>
inline V exchange(const V& v, int src_lane) {
  static_assert(sizeof(V) <= 64, "slot size");
  Runtime& r = runtime();
  Warp& w = r.warps[r.current->warp];
  std::memcpy(w.slots[r.current->lane], &v, sizeof(V));
  wait(w.barrier);
  V out;
  std::memcpy(&out, w.slots[src_lane], sizeof(V));
  wait(w.barrier);
  return out;
}

inline int lane() { return runtime().current->lane; }

// The deposits of all 32 lanes of the warp (each lane copies its own in first).
template <typename V>
inline void gather(const V& v, V (&all)[32]) {
  Runtime& r = runtime();
  Warp& w = r.warps[r.current->warp];
  std::memcpy(w.slots[r.current->lane], &v, sizeof(V));
  wait(w.barrier);
  for (int l = 0; l < 32; ++l) std::memcpy(&all[l], w.slots[l], sizeof(V));
  wait(w.barrier);
}

}  // namespace emu

#define threadIdx (::emu::runtime().current->thread_idx)
#define blockIdx (::emu::runtime().block_idx)
#define blockDim (::emu::runtime().block_dim)
#define gridDim (::emu::runtime().grid_dim)

// ---- CUDA built-ins ------------------------------------------------------------------------------

inline void __syncthreads() { emu::wait(emu::runtime().block_barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  emu::wait(emu::runtime().warps[emu::runtime().current->warp].barrier);
}
inline void __threadfence() {}

template <typename V>
inline V __shfl_sync(unsigned, V v, int src, int = 32) {
  return emu::exchange(v, src & 31);
}
template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int mask, int = 32) {
  return emu::exchange(v, emu::lane() ^ mask);
}
template <typename V>
inline V __shfl_up_sync(unsigned, V v, unsigned delta, int = 32) {
  const int src = emu::lane() - static_cast<int>(delta);
  return emu::exchange(v, src < 0 ? emu::lane() : src);
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  int all[32];
  emu::gather(predicate != 0 ? 1 : 0, all);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= static_cast<unsigned>(all[l]) << l;
  return bits;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }

inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
template <typename V>
inline V __ldg(const V* p) {
  return *p;
}
template <typename V>
inline V __ldcg(const V* p) {
  return *p;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
// Built with -ffp-contract=off: each is one IEEE operation, round to nearest.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }

// ---- twins of csrc/cuda/device.cuh's hardware section --------------------------------------------
namespace lookaheadkv {
namespace cuda {

template <typename... Params, typename... Args>
inline void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, void*,
                   Args&&... args) {
  emu::Runtime& r = emu::runtime();
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads < 1 || threads > 1024) throw std::runtime_error(std::string(name) + ": bad block size");
  if (smem > emu::kMaxDynamicSmem) throw std::runtime_error(std::string(name) + ": too much dynamic shared memory");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error(std::string(name) + ": grid too large");
  r.body = [&] { kernel(args...); };
  r.block_dim = block;
  r.grid_dim = grid;
  if (static_cast<int>(r.fibers.size()) < threads) {
    r.fibers.resize(threads);
    for (auto& f : r.fibers) f.stack.resize(emu::kStackBytes);
  }
  r.error.clear();
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        r.block_idx = make_uint3(x, y, z);
        r.dynamic_smem.assign(smem, 0xff);
        emu::run_block(threads);
      }
}

inline void memset_async(void* ptr, int value, size_t bytes, void*) { std::memset(ptr, value, bytes); }

template <typename T>
inline T* dynamic_smem() {
  return reinterpret_cast<T*>(emu::runtime().dynamic_smem.data());
}

inline const unsigned char* checked_row(const void* row, const char* what) {
  if ((reinterpret_cast<uintptr_t>(row) & 15) != 0 || !emu::in_dynamic_smem(row, 16)) {
    emu::fault(std::string(what) + ": row address not a 16-byte aligned shared-memory row");
  }
  return static_cast<const unsigned char*>(row);
}

// ldmatrix .x4: lane l addresses row l%8 of matrix l/8; thread (g = lane/4, t = lane%4) receives
// elements (g, 2t) and (g, 2t+1) of each matrix, or with .trans (2t, g) and (2t+1, g).
inline void ldmatrix_x4(uint32_t r[4], const void* row) {
  const unsigned char* rows[32];
  emu::gather(checked_row(row, "ldmatrix"), rows);
  const int g = emu::lane() / 4, t = emu::lane() % 4;
  for (int j = 0; j < 4; ++j) std::memcpy(&r[j], rows[j * 8 + g] + 4 * t, 4);
}
inline void ldmatrix_x4_trans(uint32_t r[4], const void* row) {
  const unsigned char* rows[32];
  emu::gather(checked_row(row, "ldmatrix.trans"), rows);
  const int g = emu::lane() / 4, t = emu::lane() % 4;
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    std::memcpy(&lo, rows[j * 8 + 2 * t] + 2 * g, 2);
    std::memcpy(&hi, rows[j * 8 + 2 * t + 1] + 2 * g, 2);
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

template <typename T>
inline float half_bits_to_float(uint16_t bits) {
  T h;
  std::memcpy(&h, &bits, 2);
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(h);
  } else {
    return __bfloat162float(h);
  }
}

// mma.sync.m16n8k16.row.col, fp32 accumulate. Thread (g, t): A {a0a1: (g, 2t..), a2a3: (g+8, 2t..),
// a4a5: (g, 2t+8..), a6a7: (g+8, 2t+8..)}, B {b0b1: (2t.., g), b2b3: (2t+8.., g)},
// C {c0c1: (g, 2t..), c2c3: (g+8, 2t..)}.
template <typename T>
inline void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  struct Operands {
    uint32_t a[4], b[2];
  } mine{{a[0], a[1], a[2], a[3]}, {b0, b1}}, all[32];
  emu::gather(mine, all);
  float A[16][16], B[16][8];
  auto half = [](uint32_t w, int i) { return half_bits_to_float<T>(static_cast<uint16_t>(w >> (16 * i))); };
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 2; ++i) {
      A[g][2 * t + i] = half(all[l].a[0], i);
      A[g + 8][2 * t + i] = half(all[l].a[1], i);
      A[g][2 * t + 8 + i] = half(all[l].a[2], i);
      A[g + 8][2 * t + 8 + i] = half(all[l].a[3], i);
      B[2 * t + i][g] = half(all[l].b[0], i);
      B[2 * t + 8 + i][g] = half(all[l].b[1], i);
    }
  }
  const int g = emu::lane() / 4, t = emu::lane() % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    c[e] += sum;
  }
}

inline void cp_async16(void* dst, const void* src, bool fill) {
  if ((reinterpret_cast<uintptr_t>(dst) & 15) != 0 || !emu::in_dynamic_smem(dst, 16)) {
    emu::fault("cp.async: destination not 16-byte aligned shared memory");
  }
  if (fill && (reinterpret_cast<uintptr_t>(src) & 15) != 0) emu::fault("cp.async: source not 16-byte aligned");
  if (fill) {
    std::memcpy(dst, src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

}  // namespace cuda
}  // namespace lookaheadkv
