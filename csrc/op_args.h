// The arguments of each op as the kernels see them: one struct per op, shared by the CPU and CUDA
// kernels. The bindings (csrc/tensor_args.h) fill them from checked tensors; a kernel trusts them.
// Strides are in elements; every tensor's last dim is dense.
#pragma once

#include <cstdint>

#include "common.h"

namespace lookaheadkv {

enum class Reduce : int { kMean = 0, kMax = 1 };
enum class PoolType : int { kMax = 0, kAvg = 1 };

// q[T, Hq, D] = RoPE(RMSNorm?(x·Wᵀ + bias + lora_scale·(x·Aᵀ)·Bᵀ)); docs/ops.md §1.
struct QProjArgs {
  DType dtype;    // of x, weight and out
  const void* x;  // [T, hidden]
  int64_t x_row_stride;
  const void* weight;  // [num_heads·head_dim, hidden]
  int64_t w_row_stride;
  const float* bias;    // [num_heads·head_dim] or null
  const float* lora_a;  // [rank, hidden] contiguous, or null
  const float* lora_b;  // [num_heads·head_dim, rank] contiguous, or null
  int64_t rank;         // 0 without LoRA
  float lora_scale;
  const float* cos;          // [T, head_dim] contiguous
  const float* sin;          // [T, head_dim] contiguous
  const float* norm_weight;  // [head_dim] or null
  float eps;
  int64_t T, hidden, num_heads, head_dim;
  void* out;  // [T, num_heads, head_dim] contiguous
};

// attention_scores (v == out == null) and lookahead_attention; docs/ops.md §2-3.
struct AttentionArgs {
  DType dtype;    // of q, k, v and out
  const void* q;  // [B, Hq, Tq, D]
  int64_t q_sb, q_sh, q_st;
  const void* k;  // [B, Hkv, N, D]
  int64_t k_sb, k_sh, k_sn;
  const void* v;  // like k, or null
  int64_t v_sb, v_sh, v_sn;
  int64_t B, Hq, Hkv, Tq, N, D, S;
  float scale;
  Reduce gqa_reduce;
  Reduce query_reduce;
  int64_t pool_kernel;
  PoolType pool_type;
  void* out;      // [B, Hq, Tq, D] contiguous, or null
  float* scores;  // [B, Hkv, S] contiguous
};

// select_compact; docs/ops.md §4.
struct SelectArgs {
  const float* scores;  // [B, Hkv, S]
  int64_t s_sb, s_sh, s_ss;
  const void* k;  // [B, Hkv, N, D]
  int64_t k_sb, k_sh, k_sn;
  const void* v;
  int64_t v_sb, v_sh, v_sn;
  int64_t elem_size;  // bytes per K/V element
  int64_t B, Hkv, N, D, S, budget, num_sink;
  void* k_out;  // [B, Hkv, M, D] contiguous, M = min(budget, N)
  void* v_out;
  int64_t* kept;  // [B, Hkv, M] contiguous
};

}  // namespace lookaheadkv
