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
  void* out;  // [B, Hq, Tq, D], or null
  int64_t out_sb, out_sh, out_st;
  float* scores;  // [B, Hkv, S], rows scores_row apart
  int64_t scores_row;
  // Paged K/V: key j of batch row b is entry j % block_size of block
  // k_blocks[b·blocks_stride + j / block_size], at k + block·k_sblk + (j % block_size)·k_sn + h·k_sh
  // (v alike). Null k_blocks: dense, at k + b·k_sb + j·k_sn + h·k_sh.
  const int32_t* k_blocks;
  int64_t blocks_stride, block_size, k_sblk, v_sblk;
};

// paged_attention_scores / paged_lookahead_attention; docs/ops.md §5. `a` holds q, the caches
// (k_blocks = block_table), out and scores with their strides, B = sequences, N = capacity; the
// per-sequence N_b, S_b, Tq_b come from seq_lens, num_scored and q_offsets.
struct PagedAttentionArgs {
  AttentionArgs a;            // q [total_q, Hq, D]: q_sb = 0, q_sh, q_st; out likewise; scores [B, Hkv, capacity]
  const int32_t* seq_lens;    // [B]
  const int32_t* num_scored;  // [B]
  const int32_t* q_offsets;   // [B + 1]
  int64_t num_blocks, max_blocks, total_q;
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

// paged_select_compact; docs/ops.md §6. K/V entry (block, slot in block, head) at
// k + block·k_sblk + slot·k_sn + head·k_sh (elements), v alike.
struct PagedSelectArgs {
  const float* scores;  // [B, Hkv, score_width]
  int64_t s_sb, s_sh, s_ss, score_width;
  void* k;
  int64_t k_sblk, k_sh, k_sn;
  void* v;
  int64_t v_sblk, v_sh, v_sn;
  int64_t elem_size;
  int64_t B, Hkv, D, block_size, num_blocks, max_blocks, num_sink;
  const int32_t* block_table;  // [B, max_blocks] contiguous
  const int32_t* seq_lens;     // [B]
  const int32_t* num_scored;   // [B]
  const int32_t* budgets;      // [B]
  int32_t* new_lens;           // [B]
  int32_t* kept;               // [B, Hkv, max_blocks·block_size] contiguous
};

}  // namespace lookaheadkv
