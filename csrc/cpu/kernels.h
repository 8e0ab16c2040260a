// Entry points of the CPU kernels (docs/ops.md), called by csrc/cpu_bindings.cpp. Arguments are
// raw pointers, sizes and element strides; the Python backend (lookaheadkv_kernels/backends/cpu.py)
// allocates every output and guarantees a dense last dim on every input.
#pragma once

#include <cstdint>

#include "common.h"

namespace lookaheadkv::cpu {

// q[T, Hq, D] = RoPE(RMSNorm?(x·Wᵀ + bias + lora_scale·(x·Aᵀ)·Bᵀ)); see docs/ops.md §1.
struct QProjArgs {
  const void* x;  // [T, hidden], row stride x_row, dtype
  int64_t x_row;
  const void* weight;  // [Hq*D, hidden], row stride w_row, dtype
  int64_t w_row;
  const float* bias;    // [Hq*D] or null
  const float* lora_a;  // [rank, hidden] or null (contiguous)
  const float* lora_b;  // [Hq*D, rank] or null (contiguous)
  float lora_scale;
  const float* cos;          // [T, D] contiguous
  const float* sin;          // [T, D] contiguous
  const float* norm_weight;  // [D] or null
  float eps;
  void* out;  // [T, Hq, D] contiguous, dtype
  DType dtype;
  int64_t T, hidden, num_heads, head_dim, rank;
  int num_threads;
};
void lookahead_qproj(const QProjArgs& args);

// attention_scores (out == nullptr) and lookahead_attention: one fused computation, §2-3.
struct AttentionArgs {
  const void* q;  // [B, Hq, Tq, D], element strides q_b, q_h, q_t
  int64_t q_b, q_h, q_t;
  const void* k;  // [B, Hkv, N, D]
  int64_t k_b, k_h, k_n;
  const void* v;  // like k; null for attention_scores
  int64_t v_b, v_h, v_n;
  DType dtype;    // of q, k, v and out
  void* out;      // [B, Hq, Tq, D] contiguous or null
  float* scores;  // [B, Hkv, S] contiguous
  int64_t B, Hq, Hkv, Tq, N, D, S;
  float scale;
  bool gqa_max;    // gqa_reduce == "max" (else "mean")
  bool query_max;  // query_reduce == "max" (else "mean")
  int64_t pool_kernel;
  bool pool_max;  // pool_type == "max" (else "avg")
  int num_threads;
};
void attention(const AttentionArgs& args);

// select_compact, §4.
struct SelectArgs {
  const float* scores;  // [B, Hkv, S], element strides s_b, s_h, s_s
  int64_t s_b, s_h, s_s;
  const void* k;  // [B, Hkv, N, D], element strides k_b, k_h, k_n
  int64_t k_b, k_h, k_n;
  const void* v;
  int64_t v_b, v_h, v_n;
  int64_t element_size;  // bytes per element of k and v
  void* k_out;           // [B, Hkv, M, D] contiguous
  void* v_out;
  int64_t* kept;  // [B, Hkv, M] contiguous
  int64_t B, Hkv, N, D, S, budget, num_sink;
  int num_threads;
};
void select_compact(const SelectArgs& args);

}  // namespace lookaheadkv::cpu
