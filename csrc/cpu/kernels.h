// Entry points of the CPU kernels (docs/ops.md), called by csrc/cpu_bindings.cpp with arguments
// it has checked against the tensors they came from.
#pragma once

#include <cstdint>

#include "op_args.h"

// Every entry point, as X(name, argument struct): void name(const Args& args, int num_threads), with
// num_threads the OpenMP threads of the call (<= 0: omp_get_max_threads()). The paged ones'
// index data (block ids, lengths, offsets) is checked by the caller (check_paged_indices).
#define LOOKAHEADKV_CPU_KERNELS(X)       \
  X(lookahead_qproj, QProjArgs)          \
  X(attention, AttentionArgs)            \
  X(select_compact, SelectArgs)          \
  X(paged_attention, PagedAttentionArgs) \
  X(paged_select_compact, PagedSelectArgs)

#define LOOKAHEADKV_CPU_DECLARE(name, Args) void name(const Args& args, int num_threads);
#define LOOKAHEADKV_CPU_POINTER(name, Args) void (*name)(const Args& args, int num_threads);

namespace lookaheadkv::cpu {

// The entry points of one instruction-set level (cpu/kernel_table.cpp fills one per level).
struct Kernels {
  const char* level;
  LOOKAHEADKV_CPU_KERNELS(LOOKAHEADKV_CPU_POINTER)
};

// What the bindings call: the kernels of the best level this CPU supports (csrc/cpu_dispatch.cpp).
LOOKAHEADKV_CPU_KERNELS(LOOKAHEADKV_CPU_DECLARE)

#ifdef LOOKAHEADKV_ISA
// The level this translation unit is compiled for (cpu/isa.h).
namespace LOOKAHEADKV_ISA {
LOOKAHEADKV_CPU_KERNELS(LOOKAHEADKV_CPU_DECLARE)
extern const Kernels kernels;
}  // namespace LOOKAHEADKV_ISA
#endif

}  // namespace lookaheadkv::cpu
