// The ops' arguments checked and turned into the kernels' argument structs (op_args.h), shared by
// csrc/cpu_bindings.cpp and csrc/cuda_bindings.cpp so that both modules take the same arguments,
// in the same order, under the schema's names (docs/ops.md), and enforce the same contract.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "tensor_args.h"

namespace lookaheadkv {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxPoolKernel = 31;

// Optional small float32 parameter (bias, LoRA, cos/sin, norm weight): contiguous, exact shape.
inline const float* small_param(DeviceCheck& device, py::handle obj, const char* name,
                                std::initializer_list<int64_t> shape) {
  if (obj.is_none()) return nullptr;
  const TensorArg t = tensor_arg(obj, name, static_cast<int>(shape.size()));
  device(t);
  check_type(t, ScalarType::kFloat32, "float32");
  check_shape(t, shape);
  check_contiguous(t);
  return t.ptr<const float>();
}

inline QProjArgs qproj_args(DeviceCheck& device, py::handle x_obj, py::handle weight_obj, py::handle bias,
                            py::handle lora_a_obj, py::handle lora_b, double lora_scale, py::handle cos, py::handle sin,
                            int64_t num_heads, py::handle norm_weight, double eps, py::handle out_obj) {
  const TensorArg x = tensor_arg(x_obj, "x", 2), weight = tensor_arg(weight_obj, "weight", 2);
  for (const TensorArg* t : {&x, &weight}) {
    device(*t);
    check_float(*t);
    check_nonempty(*t);
    check_last_dense(*t);
  }
  check_same_type(weight, x);
  const int64_t T = x.size(0), hidden = x.size(1);
  check_shape(weight, {-1, hidden});
  check_range(num_heads, 1, weight.size(0), "num_heads");
  if (weight.size(0) % num_heads) fail("weight's rows must be a multiple of num_heads");
  const int64_t out_features = weight.size(0), D = out_features / num_heads;
  if (D % 2) fail("head_dim (weight rows / num_heads) must be even");
  if (lora_a_obj.is_none() != lora_b.is_none()) fail("lora_a and lora_b must be given together (or neither)");
  const int64_t rank = lora_a_obj.is_none() ? 0 : tensor_arg(lora_a_obj, "lora_a", 2).size(0);
  QProjArgs a{};
  a.dtype = float_dtype(x);
  a.x = x.ptr<const void>();
  a.x_row_stride = x.stride(0);
  a.weight = weight.ptr<const void>();
  a.w_row_stride = weight.stride(0);
  a.bias = small_param(device, bias, "bias", {out_features});
  a.lora_a = small_param(device, lora_a_obj, "lora_a", {rank, hidden});
  a.lora_b = small_param(device, lora_b, "lora_b", {out_features, rank});
  a.rank = rank;
  a.lora_scale = static_cast<float>(lora_scale);
  a.cos = small_param(device, cos, "cos", {T, D});
  a.sin = small_param(device, sin, "sin", {T, D});
  if (a.cos == nullptr || a.sin == nullptr) fail("cos and sin are required, shape [T, head_dim]");
  a.norm_weight = small_param(device, norm_weight, "norm_weight", {D});
  a.eps = static_cast<float>(eps);
  a.T = T;
  a.hidden = hidden;
  a.num_heads = num_heads;
  a.head_dim = D;
  const TensorArg out = tensor_arg(out_obj, "out", 3);
  device(out);
  check_same_type(out, x);
  check_shape(out, {T, num_heads, D});
  check_contiguous(out);
  a.out = out.ptr<void>();
  return a;
}

// attention_scores when v_obj and out_obj are None, else lookahead_attention.
inline AttentionArgs attention_args(DeviceCheck& device, py::handle q_obj, py::handle k_obj, py::handle v_obj,
                                    int64_t num_scored, double scale, const std::string& gqa_reduce,
                                    int64_t pool_kernel, const std::string& pool_type, const std::string& query_reduce,
                                    py::handle out_obj, py::handle scores_obj) {
  const TensorArg q = tensor_arg(q_obj, "q", 4), k = tensor_arg(k_obj, "k", 4);
  for (const TensorArg* t : {&q, &k}) {
    device(*t);
    check_float(*t);
    check_nonempty(*t);
    check_last_dense(*t);
  }
  check_same_type(k, q);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), N = k.size(2);
  check_shape(k, {B, -1, -1, D});
  check_range(D, 1, kMaxHeadDim, "head_dim");
  if (Hq % Hkv) fail("q's heads must be a multiple of k's heads (GQA)");
  check_range(Tq, 1, N, "q's query count Tq");
  check_range(num_scored, 1, N, "num_scored");
  check_range(pool_kernel, 1, kMaxPoolKernel, "pool_kernel");
  if (pool_kernel % 2 == 0) fail("pool_kernel must be odd");
  if (v_obj.is_none() != out_obj.is_none()) fail("v and out must be given together (lookahead_attention)");
  AttentionArgs a{};
  a.dtype = float_dtype(q);
  a.q = q.ptr<const void>();
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(1);
  a.q_st = q.stride(2);
  a.k = k.ptr<const void>();
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_sn = k.stride(2);
  if (!v_obj.is_none()) {
    const TensorArg v = tensor_arg(v_obj, "v", 4);
    device(v);
    check_same_type(v, k);
    check_shape(v, {B, Hkv, N, D});
    check_last_dense(v);
    a.v = v.ptr<const void>();
    a.v_sb = v.stride(0);
    a.v_sh = v.stride(1);
    a.v_sn = v.stride(2);
    const TensorArg out = tensor_arg(out_obj, "out", 4);
    device(out);
    check_same_type(out, q);
    check_shape(out, {B, Hq, Tq, D});
    check_contiguous(out);
    a.out = out.ptr<void>();
    a.out_sb = Hq * Tq * D;
    a.out_sh = Tq * D;
    a.out_st = D;
  }
  const TensorArg scores = tensor_arg(scores_obj, "scores", 3);
  device(scores);
  check_type(scores, ScalarType::kFloat32, "float32");
  check_shape(scores, {B, Hkv, num_scored});
  check_contiguous(scores);
  a.scores = scores.ptr<float>();
  a.scores_row = num_scored;
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Tq = Tq;
  a.N = N;
  a.D = D;
  a.S = num_scored;
  a.scale = static_cast<float>(scale);
  a.gqa_reduce = reduce_arg(gqa_reduce, "gqa_reduce");
  a.query_reduce = reduce_arg(query_reduce, "query_reduce");
  a.pool_kernel = pool_kernel;
  a.pool_type = pool_type_arg(pool_type);
  return a;
}

inline SelectArgs select_args(DeviceCheck& device, py::handle scores_obj, py::handle k_obj, py::handle v_obj,
                              int64_t budget, int64_t num_sink, py::handle k_out_obj, py::handle v_out_obj,
                              py::handle kept_obj) {
  const TensorArg scores = tensor_arg(scores_obj, "scores", 3);
  const TensorArg k = tensor_arg(k_obj, "k", 4), v = tensor_arg(v_obj, "v", 4);
  device(scores);
  check_type(scores, ScalarType::kFloat32, "float32");
  check_nonempty(scores);
  for (const TensorArg* t : {&k, &v}) {
    device(*t);
    check_float(*t);
    check_nonempty(*t);
    check_last_dense(*t);
  }
  check_same_type(v, k);
  const int64_t B = k.size(0), Hkv = k.size(1), N = k.size(2), D = k.size(3), S = scores.size(2);
  check_shape(v, {B, Hkv, N, D});
  check_shape(scores, {B, Hkv, -1});
  check_range(S, 1, N, "scores' positions S");
  check_range(budget, 1, INT64_MAX, "budget");
  check_range(num_sink, 0, INT64_MAX, "num_sink");
  const int64_t protected_count = std::min(num_sink, S) + (N - S);
  if (budget < N && budget < protected_count) fail("budget is below the always-kept positions (sinks + tail)");
  const int64_t M = std::min(budget, N);
  const TensorArg k_out = tensor_arg(k_out_obj, "k_out", 4), v_out = tensor_arg(v_out_obj, "v_out", 4);
  for (const TensorArg* t : {&k_out, &v_out}) {
    device(*t);
    check_same_type(*t, k);
    check_shape(*t, {B, Hkv, M, D});
    check_contiguous(*t);
  }
  const TensorArg kept = tensor_arg(kept_obj, "kept", 3);
  device(kept);
  check_type(kept, ScalarType::kInt64, "int64");
  check_shape(kept, {B, Hkv, M});
  check_contiguous(kept);
  SelectArgs a{};
  a.scores = scores.ptr<const float>();
  a.s_sb = scores.stride(0);
  a.s_sh = scores.stride(1);
  a.s_ss = scores.stride(2);
  a.k = k.ptr<const void>();
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_sn = k.stride(2);
  a.v = v.ptr<const void>();
  a.v_sb = v.stride(0);
  a.v_sh = v.stride(1);
  a.v_sn = v.stride(2);
  a.elem_size = k.elem_size;
  a.B = B;
  a.Hkv = Hkv;
  a.N = N;
  a.D = D;
  a.S = S;
  a.budget = budget;
  a.num_sink = num_sink;
  a.k_out = k_out.ptr<void>();
  a.v_out = v_out.ptr<void>();
  a.kept = kept.ptr<int64_t>();
  return a;
}

// ---- paged ops ---------------------------------------------------------------------------------

// A paged cache's geometry: NHD is [num_blocks, block_size, Hkv, D], HND [num_blocks, Hkv, block_size, D].
struct PagedCache {
  TensorArg t;
  int64_t block_size, Hkv, D, block_stride, token_stride, head_stride;
};

inline PagedCache paged_cache(DeviceCheck& device, py::handle obj, const char* name, const std::string& layout) {
  if (layout != "NHD" && layout != "HND") fail("layout must be 'NHD' or 'HND', got '" + layout + "'");
  PagedCache c{tensor_arg(obj, name, 4), 0, 0, 0, 0, 0, 0};
  device(c.t);
  check_float(c.t);
  check_nonempty(c.t);
  check_last_dense(c.t);
  const bool nhd = layout == "NHD";
  c.block_size = c.t.size(nhd ? 1 : 2);
  c.Hkv = c.t.size(nhd ? 2 : 1);
  c.D = c.t.size(3);
  c.block_stride = c.t.stride(0);
  c.token_stride = c.t.stride(nhd ? 1 : 2);
  c.head_stride = c.t.stride(nhd ? 2 : 1);
  return c;
}

inline const int32_t* index_tensor(DeviceCheck& device, py::handle obj, const char* name,
                                   std::initializer_list<int64_t> shape) {
  const TensorArg t = tensor_arg(obj, name, static_cast<int>(shape.size()));
  device(t);
  check_type(t, ScalarType::kInt32, "int32");
  check_shape(t, shape);
  check_contiguous(t);
  return t.ptr<const int32_t>();
}

// paged_attention_scores when v_obj and out_obj are None, else paged_lookahead_attention.
inline PagedAttentionArgs paged_attention_args(DeviceCheck& device, py::handle q_obj, py::handle q_offsets,
                                               py::handle k_obj, py::handle v_obj, py::handle block_table_obj,
                                               py::handle seq_lens, py::handle num_scored, double scale,
                                               const std::string& gqa_reduce, int64_t pool_kernel,
                                               const std::string& pool_type, const std::string& query_reduce,
                                               const std::string& layout, py::handle out_obj, py::handle scores_obj) {
  const PagedCache k = paged_cache(device, k_obj, "k_cache", layout);
  const TensorArg q = tensor_arg(q_obj, "q", 3);
  device(q);
  check_float(q);
  check_nonempty(q);
  check_last_dense(q);
  check_same_type(q, k.t);
  const int64_t total_q = q.size(0), Hq = q.size(1), D = k.D;
  check_shape(q, {-1, -1, D});
  check_range(D, 1, kMaxHeadDim, "head_dim");
  if (Hq % k.Hkv) fail("q's heads must be a multiple of k_cache's heads (GQA)");
  const TensorArg block_table = tensor_arg(block_table_obj, "block_table", 2);
  const int64_t B = block_table.size(0), max_blocks = block_table.size(1);
  check_nonempty(block_table);
  PagedAttentionArgs p{};
  p.a.k_blocks = index_tensor(device, block_table_obj, "block_table", {B, max_blocks});
  p.seq_lens = index_tensor(device, seq_lens, "seq_lens", {B});
  p.num_scored = index_tensor(device, num_scored, "num_scored", {B});
  p.q_offsets = index_tensor(device, q_offsets, "q_offsets", {B + 1});
  p.num_blocks = k.t.size(0);
  p.max_blocks = max_blocks;
  p.total_q = total_q;
  check_range(pool_kernel, 1, kMaxPoolKernel, "pool_kernel");
  if (pool_kernel % 2 == 0) fail("pool_kernel must be odd");
  if (v_obj.is_none() != out_obj.is_none()) fail("v_cache and out must be given together");
  AttentionArgs& a = p.a;
  a.dtype = float_dtype(q);
  a.q = q.ptr<const void>();
  a.q_sb = 0;
  a.q_sh = q.stride(1);
  a.q_st = q.stride(0);
  a.k = k.t.ptr<const void>();
  a.k_sb = 0;
  a.k_sh = k.head_stride;
  a.k_sn = k.token_stride;
  a.k_sblk = k.block_stride;
  a.blocks_stride = max_blocks;
  a.block_size = k.block_size;
  if (!v_obj.is_none()) {
    const PagedCache v = paged_cache(device, v_obj, "v_cache", layout);
    check_same_type(v.t, k.t);
    check_shape(v.t, {k.t.size(0), k.t.size(1), k.t.size(2), D});
    a.v = v.t.ptr<const void>();
    a.v_sb = 0;
    a.v_sh = v.head_stride;
    a.v_sn = v.token_stride;
    a.v_sblk = v.block_stride;
    const TensorArg out = tensor_arg(out_obj, "out", 3);
    device(out);
    check_same_type(out, q);
    check_shape(out, {total_q, Hq, D});
    check_contiguous(out);
    a.out = out.ptr<void>();
    a.out_sb = 0;
    a.out_sh = D;
    a.out_st = Hq * D;
  }
  const int64_t capacity = max_blocks * k.block_size;
  const TensorArg scores = tensor_arg(scores_obj, "scores", 3);
  device(scores);
  check_type(scores, ScalarType::kFloat32, "float32");
  check_shape(scores, {B, k.Hkv, capacity});
  check_contiguous(scores);
  a.scores = scores.ptr<float>();
  a.scores_row = capacity;
  a.B = B;
  a.Hq = Hq;
  a.Hkv = k.Hkv;
  a.N = capacity;
  a.D = D;
  a.scale = static_cast<float>(scale);
  a.gqa_reduce = reduce_arg(gqa_reduce, "gqa_reduce");
  a.query_reduce = reduce_arg(query_reduce, "query_reduce");
  a.pool_kernel = pool_kernel;
  a.pool_type = pool_type_arg(pool_type);
  return p;
}

inline PagedSelectArgs paged_select_args(DeviceCheck& device, py::handle scores_obj, py::handle k_obj, py::handle v_obj,
                                         py::handle block_table_obj, py::handle seq_lens, py::handle num_scored,
                                         py::handle budgets, int64_t num_sink, const std::string& layout,
                                         py::handle new_lens, py::handle kept) {
  const PagedCache k = paged_cache(device, k_obj, "k_cache", layout);
  const PagedCache v = paged_cache(device, v_obj, "v_cache", layout);
  check_same_type(v.t, k.t);
  check_shape(v.t, {k.t.size(0), k.t.size(1), k.t.size(2), k.D});
  const TensorArg scores = tensor_arg(scores_obj, "scores", 3);
  device(scores);
  check_type(scores, ScalarType::kFloat32, "float32");
  check_nonempty(scores);
  const TensorArg block_table = tensor_arg(block_table_obj, "block_table", 2);
  const int64_t B = block_table.size(0), max_blocks = block_table.size(1);
  check_nonempty(block_table);
  check_shape(scores, {B, k.Hkv, -1});
  check_range(num_sink, 0, INT64_MAX, "num_sink");
  const int64_t capacity = max_blocks * k.block_size;
  PagedSelectArgs p{};
  p.scores = scores.ptr<const float>();
  p.s_sb = scores.stride(0);
  p.s_sh = scores.stride(1);
  p.s_ss = scores.stride(2);
  p.score_width = scores.size(2);
  p.k = k.t.ptr<void>();
  p.k_sblk = k.block_stride;
  p.k_sh = k.head_stride;
  p.k_sn = k.token_stride;
  p.v = v.t.ptr<void>();
  p.v_sblk = v.block_stride;
  p.v_sh = v.head_stride;
  p.v_sn = v.token_stride;
  p.elem_size = k.t.elem_size;
  p.B = B;
  p.Hkv = k.Hkv;
  p.D = k.D;
  p.block_size = k.block_size;
  p.num_blocks = k.t.size(0);
  p.max_blocks = max_blocks;
  p.num_sink = num_sink;
  p.block_table = index_tensor(device, block_table_obj, "block_table", {B, max_blocks});
  p.seq_lens = index_tensor(device, seq_lens, "seq_lens", {B});
  p.num_scored = index_tensor(device, num_scored, "num_scored", {B});
  p.budgets = index_tensor(device, budgets, "budgets", {B});
  p.new_lens = const_cast<int32_t*>(index_tensor(device, new_lens, "new_lens", {B}));
  p.kept = const_cast<int32_t*>(index_tensor(device, kept, "kept", {B, k.Hkv, capacity}));
  return p;
}

// The index data of a paged call, for kernels that read it on the host (the CPU module): every
// length, offset and used block id in range, and for compaction no used entry of a compacted
// sequence shared with another slot. The Python path checks the same first, with more context.
inline void check_paged_indices(const int32_t* block_table, int64_t B, int64_t max_blocks, int64_t block_size,
                                int64_t num_blocks, const int32_t* seq_lens, const int32_t* num_scored,
                                const int32_t* q_offsets, int64_t total_q, const int32_t* budgets, int64_t num_sink,
                                int64_t score_width) {
  const int64_t capacity = max_blocks * block_size;
  std::vector<uint8_t> uses(budgets ? size_t(num_blocks) : 0, 0);
  for (int64_t b = 0; b < B; ++b) {
    const std::string seq = "[" + std::to_string(b) + "]";
    const int64_t N = seq_lens[b], S = num_scored[b];
    check_range(N, 1, capacity, ("seq_lens" + seq).c_str());
    check_range(S, 1, std::min(N, score_width), ("num_scored" + seq).c_str());
    if (q_offsets) {
      check_range(q_offsets[b], 0, total_q, ("q_offsets" + seq).c_str());
      check_range(q_offsets[b + 1] - q_offsets[b], 1, N, ("the query count of sequence " + seq).c_str());
      if (b == B - 1 && q_offsets[B] != total_q) fail("q_offsets[-1] must equal q's rows");
    }
    for (int64_t j = 0; j < (N + block_size - 1) / block_size; ++j) {
      const int64_t id = block_table[b * max_blocks + j];
      check_range(id, 0, num_blocks - 1, ("block_table" + seq).c_str());
      if (budgets && uses[size_t(id)] < 2) ++uses[size_t(id)];
    }
    if (budgets) {
      const int64_t budget = budgets[b], protected_count = std::min(num_sink, S) + (N - S);
      check_range(budget, 1, INT32_MAX, ("budgets" + seq).c_str());
      if (budget < N && budget < protected_count) fail("budgets" + seq + " is below the always-kept positions");
    }
  }
  if (!budgets) return;
  for (int64_t b = 0; b < B; ++b) {
    if (budgets[b] >= seq_lens[b]) continue;
    for (int64_t j = 0; j < (seq_lens[b] + block_size - 1) / block_size; ++j) {
      if (uses[size_t(block_table[b * max_blocks + j])] > 1) {
        fail("sequence [" + std::to_string(b) + "] is compacted in place but shares a block with another slot");
      }
    }
  }
}

}  // namespace lookaheadkv
