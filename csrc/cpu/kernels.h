// Entry points of the CPU kernels (docs/ops.md), called by csrc/cpu_bindings.cpp with arguments
// it has checked against the tensors they came from.
#pragma once

#include <cstdint>

#include "op_args.h"

namespace lookaheadkv::cpu {

// num_threads: OpenMP threads of the call (<= 0: omp_get_max_threads()).
void lookahead_qproj(const QProjArgs& args, int num_threads);
void attention(const AttentionArgs& args, int num_threads);
void select_compact(const SelectArgs& args, int num_threads);
// Index data (block ids, lengths, offsets) checked by the caller (check_paged_indices).
void paged_attention(const PagedAttentionArgs& args, int num_threads);
void paged_select_compact(const PagedSelectArgs& args, int num_threads);

}  // namespace lookaheadkv::cpu
