// pybind11 module _C_cuda: the CUDA kernels of csrc/cuda/. Each op takes its tensors (outputs
// allocated by lookaheadkv_kernels/backends/cuda.py) under the schema's names, checked by
// op_bindings.h exactly as the CPU module checks them, then its launch context: a uint8 workspace
// sized by the matching *_workspace_bytes query, the device's multiprocessor count and the caller's
// current cudaStream_t as an int. Launches are asynchronous; launch errors raise RuntimeError.
#include <pybind11/pybind11.h>

#include <string>

#include "cuda/api.cuh"
#include "op_bindings.h"

namespace py = pybind11;
using namespace lookaheadkv;

namespace {

// The host emulator (python_tests/cuda_emulator.h) runs this module on CPU tensors.
#ifdef LOOKAHEADKV_CUDA_EMULATION
constexpr DeviceType kDevice = DeviceType::kCPU;
#else
constexpr DeviceType kDevice = DeviceType::kCUDA;
#endif

cuda::Stream as_stream(uintptr_t s) { return reinterpret_cast<cuda::Stream>(s); }

void* workspace_ptr(DeviceCheck& device, py::handle obj, size_t need) {
  const TensorArg w = tensor_arg(obj, "workspace", 1);
  device(w);
  check_type(w, ScalarType::kUInt8, "uint8");
  check_contiguous(w);
  if (static_cast<size_t>(w.size(0)) < need) {
    fail("workspace holds " + std::to_string(w.size(0)) + " bytes, the call needs " + std::to_string(need));
  }
  return w.ptr<void>();
}

void check_num_sms(int num_sms) {
  if (num_sms < 1) fail("num_sms must be >= 1");
}

void lookahead_qproj(py::handle x, py::handle weight, py::handle bias, py::handle lora_a, py::handle lora_b,
                     double lora_scale, py::handle cos, py::handle sin, int64_t num_heads, py::handle norm_weight,
                     double eps, py::handle out, py::handle workspace, int num_sms, uintptr_t stream) {
  check_num_sms(num_sms);
  DeviceCheck device(kDevice);
  const QProjArgs a =
      qproj_args(device, x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps, out);
  const size_t need = cuda::qproj_workspace_bytes(a.T, a.hidden, a.num_heads * a.head_dim, a.rank, num_sms);
  cuda::lookahead_qproj(a, workspace_ptr(device, workspace, need), num_sms, as_stream(stream));
}

void run_attention(const AttentionArgs& a, DeviceCheck& device, py::handle workspace, int num_sms, uintptr_t stream) {
  const size_t need =
      cuda::attention_workspace_bytes(a.dtype, a.B, a.Hq, a.Hkv, a.Tq, a.N, a.D, a.S, a.out != nullptr, num_sms);
  cuda::attention(a, workspace_ptr(device, workspace, need), num_sms, as_stream(stream));
}

void attention_scores(py::handle q, py::handle k, int64_t num_scored, double scale, const std::string& gqa_reduce,
                      int64_t pool_kernel, const std::string& pool_type, const std::string& query_reduce,
                      py::handle scores, py::handle workspace, int num_sms, uintptr_t stream) {
  check_num_sms(num_sms);
  DeviceCheck device(kDevice);
  const AttentionArgs a = attention_args(device, q, k, py::none(), num_scored, scale, gqa_reduce, pool_kernel,
                                         pool_type, query_reduce, py::none(), scores);
  run_attention(a, device, workspace, num_sms, stream);
}

void lookahead_attention(py::handle q, py::handle k, py::handle v, int64_t num_scored, double scale,
                         const std::string& gqa_reduce, int64_t pool_kernel, const std::string& pool_type,
                         const std::string& query_reduce, py::handle out, py::handle scores, py::handle workspace,
                         int num_sms, uintptr_t stream) {
  check_num_sms(num_sms);
  DeviceCheck device(kDevice);
  const AttentionArgs a =
      attention_args(device, q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce, out, scores);
  run_attention(a, device, workspace, num_sms, stream);
}

void select_compact(py::handle scores, py::handle k, py::handle v, int64_t budget, int64_t num_sink, py::handle k_out,
                    py::handle v_out, py::handle kept, py::handle workspace, uintptr_t stream) {
  DeviceCheck device(kDevice);
  const SelectArgs a = select_args(device, scores, k, v, budget, num_sink, k_out, v_out, kept);
  const size_t need = cuda::select_workspace_bytes(a.B, a.Hkv, a.N, a.S, a.budget, a.num_sink);
  cuda::select_compact(a, workspace_ptr(device, workspace, need), as_stream(stream));
}

void run_paged_attention(const PagedAttentionArgs& p, DeviceCheck& device, py::handle workspace, int num_sms,
                         uintptr_t stream) {
  const AttentionArgs& a = p.a;
  const size_t need =
      cuda::paged_attention_workspace_bytes(a.dtype, a.B, a.Hq, a.Hkv, p.total_q, a.N, a.D, a.out != nullptr, num_sms);
  cuda::paged_attention(p, workspace_ptr(device, workspace, need), num_sms, as_stream(stream));
}

// The index tensors are not read here: the kernels check them on the device (no host sync).
void paged_attention_scores(py::handle q, py::handle q_offsets, py::handle k_cache, py::handle block_table,
                            py::handle seq_lens, py::handle num_scored, double scale, const std::string& gqa_reduce,
                            int64_t pool_kernel, const std::string& pool_type, const std::string& query_reduce,
                            const std::string& layout, py::handle scores, py::handle workspace, int num_sms,
                            uintptr_t stream) {
  check_num_sms(num_sms);
  DeviceCheck device(kDevice);
  const PagedAttentionArgs p =
      paged_attention_args(device, q, q_offsets, k_cache, py::none(), block_table, seq_lens, num_scored, scale,
                           gqa_reduce, pool_kernel, pool_type, query_reduce, layout, py::none(), scores);
  run_paged_attention(p, device, workspace, num_sms, stream);
}

void paged_lookahead_attention(py::handle q, py::handle q_offsets, py::handle k_cache, py::handle v_cache,
                               py::handle block_table, py::handle seq_lens, py::handle num_scored, double scale,
                               const std::string& gqa_reduce, int64_t pool_kernel, const std::string& pool_type,
                               const std::string& query_reduce, const std::string& layout, py::handle out,
                               py::handle scores, py::handle workspace, int num_sms, uintptr_t stream) {
  check_num_sms(num_sms);
  DeviceCheck device(kDevice);
  const PagedAttentionArgs p =
      paged_attention_args(device, q, q_offsets, k_cache, v_cache, block_table, seq_lens, num_scored, scale, gqa_reduce,
                           pool_kernel, pool_type, query_reduce, layout, out, scores);
  run_paged_attention(p, device, workspace, num_sms, stream);
}

void paged_select_compact(py::handle scores, py::handle k_cache, py::handle v_cache, py::handle block_table,
                          py::handle seq_lens, py::handle num_scored, py::handle budgets, int64_t num_sink,
                          const std::string& layout, py::handle new_lens, py::handle kept, py::handle workspace,
                          uintptr_t stream) {
  DeviceCheck device(kDevice);
  const PagedSelectArgs p = paged_select_args(device, scores, k_cache, v_cache, block_table, seq_lens, num_scored,
                                              budgets, num_sink, layout, new_lens, kept);
  const size_t need = cuda::paged_select_workspace_bytes(p.B, p.Hkv, p.max_blocks * p.block_size);
  cuda::paged_select_compact(p, workspace_ptr(device, workspace, need), as_stream(stream));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "lookaheadkv CUDA kernels (use lookaheadkv_kernels.backends.cuda)";
  m.def("qproj_workspace_bytes", &cuda::qproj_workspace_bytes, py::arg("T"), py::arg("hidden"), py::arg("out_features"),
        py::arg("rank"), py::arg("num_sms"));
  m.def(
      "attention_workspace_bytes",
      [](py::handle q_obj, py::handle k_obj, int64_t num_scored, bool with_out, int num_sms) {
        const TensorArg q = tensor_arg(q_obj, "q", 4), k = tensor_arg(k_obj, "k", 4);
        check_float(q);
        return cuda::attention_workspace_bytes(float_dtype(q), q.size(0), q.size(1), k.size(1), q.size(2), k.size(2),
                                               q.size(3), num_scored, with_out, num_sms);
      },
      py::arg("q"), py::arg("k"), py::arg("num_scored"), py::arg("with_out"), py::arg("num_sms"));
  m.def("select_workspace_bytes", &cuda::select_workspace_bytes, py::arg("B"), py::arg("Hkv"), py::arg("N"),
        py::arg("S"), py::arg("budget"), py::arg("num_sink"));
  m.def(
      "paged_attention_workspace_bytes",
      [](py::handle q_obj, py::handle k_cache, py::handle block_table_obj, const std::string& layout, bool with_out,
         int num_sms) {
        DeviceCheck device(kDevice);
        const TensorArg q = tensor_arg(q_obj, "q", 3), block_table = tensor_arg(block_table_obj, "block_table", 2);
        const PagedCache k = paged_cache(device, k_cache, "k_cache", layout);
        check_float(q);
        return cuda::paged_attention_workspace_bytes(float_dtype(q), block_table.size(0), q.size(1), k.Hkv, q.size(0),
                                                     block_table.size(1) * k.block_size, q.size(2), with_out, num_sms);
      },
      py::arg("q"), py::arg("k_cache"), py::arg("block_table"), py::arg("layout"), py::arg("with_out"),
      py::arg("num_sms"));
  m.def("paged_select_workspace_bytes", &cuda::paged_select_workspace_bytes, py::arg("B"), py::arg("Hkv"),
        py::arg("capacity"));
  m.def("lookahead_qproj", &lookahead_qproj, py::arg("x"), py::arg("weight"), py::arg("bias").none(true),
        py::arg("lora_a").none(true), py::arg("lora_b").none(true), py::arg("lora_scale"), py::arg("cos"),
        py::arg("sin"), py::arg("num_heads"), py::arg("norm_weight").none(true), py::arg("eps"), py::arg("out"),
        py::arg("workspace"), py::arg("num_sms"), py::arg("stream"));
  m.def("attention_scores", &attention_scores, py::arg("q"), py::arg("k"), py::arg("num_scored"), py::arg("scale"),
        py::arg("gqa_reduce"), py::arg("pool_kernel"), py::arg("pool_type"), py::arg("query_reduce"), py::arg("scores"),
        py::arg("workspace"), py::arg("num_sms"), py::arg("stream"));
  m.def("lookahead_attention", &lookahead_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("num_scored"),
        py::arg("scale"), py::arg("gqa_reduce"), py::arg("pool_kernel"), py::arg("pool_type"), py::arg("query_reduce"),
        py::arg("out"), py::arg("scores"), py::arg("workspace"), py::arg("num_sms"), py::arg("stream"));
  m.def("select_compact", &select_compact, py::arg("scores"), py::arg("k"), py::arg("v"), py::arg("budget"),
        py::arg("num_sink"), py::arg("k_out"), py::arg("v_out"), py::arg("kept"), py::arg("workspace"),
        py::arg("stream"));
  m.def("paged_attention_scores", &paged_attention_scores, py::arg("q"), py::arg("q_offsets"), py::arg("k_cache"),
        py::arg("block_table"), py::arg("seq_lens"), py::arg("num_scored"), py::arg("scale"), py::arg("gqa_reduce"),
        py::arg("pool_kernel"), py::arg("pool_type"), py::arg("query_reduce"), py::arg("layout"), py::arg("scores"),
        py::arg("workspace"), py::arg("num_sms"), py::arg("stream"));
  m.def("paged_lookahead_attention", &paged_lookahead_attention, py::arg("q"), py::arg("q_offsets"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_table"), py::arg("seq_lens"), py::arg("num_scored"), py::arg("scale"),
        py::arg("gqa_reduce"), py::arg("pool_kernel"), py::arg("pool_type"), py::arg("query_reduce"), py::arg("layout"),
        py::arg("out"), py::arg("scores"), py::arg("workspace"), py::arg("num_sms"), py::arg("stream"));
  m.def("paged_select_compact", &paged_select_compact, py::arg("scores"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_table"), py::arg("seq_lens"), py::arg("num_scored"), py::arg("budgets"), py::arg("num_sink"),
        py::arg("layout"), py::arg("new_lens"), py::arg("kept"), py::arg("workspace"), py::arg("stream"));
}
