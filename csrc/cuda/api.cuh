// Host entry points of the CUDA module (_C_cuda), shared by csrc/cuda_bindings.cpp (plain C++) and
// the .cu files that define them. The bindings check the arguments against their tensors; every
// function enqueues kernels on `stream` (the caller's current stream) and returns without waiting.
// Workspace sizes depend only on shapes, dtype and the device's multiprocessor count, so a caller
// can allocate the workspace with torch before launching (CUDA-graph capturable).
#pragma once

#include <cstddef>
#include <cstdint>

#include "op_args.h"

namespace lookaheadkv {
namespace cuda {

using Stream = void*;  // a cudaStream_t, kept opaque so this header needs no CUDA include

// ---- lookahead_qproj (csrc/cuda/lookahead_qproj.cu) -------------------------------------------
size_t qproj_workspace_bytes(int64_t T, int64_t hidden, int64_t out_features, int64_t rank, int num_sms);
void lookahead_qproj(const QProjArgs& a, void* workspace, int num_sms, Stream stream);

// ---- attention_scores / lookahead_attention (csrc/cuda/attention_scores.cu) --------------------
size_t attention_workspace_bytes(DType dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t N, int64_t D,
                                 int64_t S, bool with_out, int num_sms);
void attention(const AttentionArgs& a, void* workspace, int num_sms, Stream stream);

// ---- paged_attention_scores / paged_lookahead_attention (csrc/cuda/attention_scores.cu) --------
// The index tensors are read on the device only: a sequence with out-of-range data gets NaN.
size_t paged_attention_workspace_bytes(DType dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t total_q,
                                       int64_t capacity, int64_t D, bool with_out, int num_sms);
void paged_attention(const PagedAttentionArgs& a, void* workspace, int num_sms, Stream stream);

// ---- select_compact (csrc/cuda/select_compact.cu) ----------------------------------------------
size_t select_workspace_bytes(int64_t B, int64_t Hkv, int64_t N, int64_t S, int64_t budget, int64_t num_sink);
void select_compact(const SelectArgs& a, void* workspace, Stream stream);

// ---- paged_select_compact (csrc/cuda/select_compact.cu) -----------------------------------------
size_t paged_select_workspace_bytes(int64_t B, int64_t Hkv, int64_t capacity);
void paged_select_compact(const PagedSelectArgs& a, void* workspace, Stream stream);

}  // namespace cuda
}  // namespace lookaheadkv
