// Host entry points of the CUDA module (_C_cuda), shared by csrc/cuda_bindings.cpp (plain C++) and
// the .cu files that define them. Pointers, sizes and element strides come from Python; every
// function enqueues kernels on `stream` (the caller's current stream) and returns without waiting.
// Workspace sizes depend only on shapes, dtype and the device's multiprocessor count, so a caller
// can allocate the workspace with torch before launching (CUDA-graph capturable).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace lookaheadkv {
namespace cuda {

using Stream = void*;  // a cudaStream_t, kept opaque so this header needs no CUDA include

// ---- lookahead_qproj (csrc/cuda/lookahead_qproj.cu) -------------------------------------------
struct QprojArgs {
  DType dtype;
  const void* x;
  int64_t x_row_stride;  // [T, hidden]
  const void* weight;
  int64_t w_row_stride;  // [out_features, hidden]
  const float* bias;     // [out_features] or null
  const float* lora_a;   // [rank, hidden] or null
  const float* lora_b;   // [out_features, rank] or null
  int64_t rank;
  float lora_scale;
  const float* cos;          // [T, head_dim]
  const float* sin;          // [T, head_dim]
  const float* norm_weight;  // [head_dim] or null
  float eps;
  int64_t T, hidden, num_heads, head_dim;
  void* out;  // [T, num_heads, head_dim], x's dtype, contiguous
};
size_t qproj_workspace_bytes(int64_t T, int64_t hidden, int64_t out_features, int64_t rank, int num_sms);
void lookahead_qproj(const QprojArgs& a, void* workspace, int num_sms, Stream stream);

// ---- attention_scores / lookahead_attention (csrc/cuda/attention_scores.cu) --------------------
struct AttentionArgs {
  DType dtype;
  const void* q;
  int64_t q_sb, q_sh, q_st;  // [B, Hq, Tq, D]
  const void* k;
  int64_t k_sb, k_sh, k_sn;  // [B, Hkv, N, D]
  const void* v;
  int64_t v_sb, v_sh, v_sn;  // like k; null for attention_scores
  int64_t B, Hq, Hkv, Tq, N, D, S;
  float scale;
  bool gqa_max;    // gqa_reduce: false = mean, true = max
  bool query_max;  // query_reduce: false = mean, true = max
  int64_t pool_kernel;
  bool pool_avg;  // pool_type: false = max, true = avg
  void* out;      // [B, Hq, Tq, D] q's dtype, contiguous; null for attention_scores
  float* scores;  // [B, Hkv, S] float32, contiguous
};
size_t attention_workspace_bytes(DType dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t N, int64_t D,
                                 int64_t S, bool with_out, int num_sms);
void attention(const AttentionArgs& a, void* workspace, int num_sms, Stream stream);

// ---- select_compact (csrc/cuda/select_compact.cu) ----------------------------------------------
struct SelectArgs {
  const float* scores;
  int64_t s_sb, s_sh, s_ss;  // [B, Hkv, S], any strides
  const void* k;
  int64_t k_sb, k_sh, k_sn;  // [B, Hkv, N, D]
  const void* v;
  int64_t v_sb, v_sh, v_sn;
  int64_t elem_size;  // bytes per K/V element (2 or 4)
  int64_t B, Hkv, N, D, S, budget, num_sink;
  void* k_out;
  void* v_out;    // [B, Hkv, M, D] contiguous, M = min(budget, N)
  int64_t* kept;  // [B, Hkv, M]
};
size_t select_workspace_bytes(int64_t B, int64_t Hkv, int64_t N, int64_t S, int64_t budget, int64_t num_sink);
void select_compact(const SelectArgs& a, void* workspace, Stream stream);

}  // namespace cuda
}  // namespace lookaheadkv
