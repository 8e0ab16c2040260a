// pybind11 module _C_cpu: the CPU kernels of csrc/cpu/. Each op takes its tensors (outputs
// allocated by lookaheadkv_kernels/backends/cpu.py) under the schema's names, checked by
// op_bindings.h, then the OpenMP thread count. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/kernels.h"
#include "op_bindings.h"

namespace py = pybind11;
using namespace lookaheadkv;

namespace {

DeviceCheck on_cpu() { return DeviceCheck(DeviceType::kCPU); }

void lookahead_qproj(py::handle x, py::handle weight, py::handle bias, py::handle lora_a, py::handle lora_b,
                     double lora_scale, py::handle cos, py::handle sin, int64_t num_heads, py::handle norm_weight,
                     double eps, py::handle out, int num_threads) {
  DeviceCheck device = on_cpu();
  const QProjArgs a =
      qproj_args(device, x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps, out);
  py::gil_scoped_release release;
  cpu::lookahead_qproj(a, num_threads);
}

void attention_scores(py::handle q, py::handle k, int64_t num_scored, double scale, const std::string& gqa_reduce,
                      int64_t pool_kernel, const std::string& pool_type, const std::string& query_reduce,
                      py::handle scores, int num_threads) {
  DeviceCheck device = on_cpu();
  const AttentionArgs a = attention_args(device, q, k, py::none(), num_scored, scale, gqa_reduce, pool_kernel,
                                         pool_type, query_reduce, py::none(), scores);
  py::gil_scoped_release release;
  cpu::attention(a, num_threads);
}

void lookahead_attention(py::handle q, py::handle k, py::handle v, int64_t num_scored, double scale,
                         const std::string& gqa_reduce, int64_t pool_kernel, const std::string& pool_type,
                         const std::string& query_reduce, py::handle out, py::handle scores, int num_threads) {
  DeviceCheck device = on_cpu();
  const AttentionArgs a =
      attention_args(device, q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce, out, scores);
  py::gil_scoped_release release;
  cpu::attention(a, num_threads);
}

void select_compact(py::handle scores, py::handle k, py::handle v, int64_t budget, int64_t num_sink, py::handle k_out,
                    py::handle v_out, py::handle kept, int num_threads) {
  DeviceCheck device = on_cpu();
  const SelectArgs a = select_args(device, scores, k, v, budget, num_sink, k_out, v_out, kept);
  py::gil_scoped_release release;
  cpu::select_compact(a, num_threads);
}

void run_paged_attention(const PagedAttentionArgs& p, int num_threads) {
  check_paged_indices(p.a.k_blocks, p.a.B, p.max_blocks, p.a.block_size, p.num_blocks, p.seq_lens, p.num_scored,
                      p.q_offsets, p.total_q, nullptr, 0, p.a.scores_row);
  py::gil_scoped_release release;
  cpu::paged_attention(p, num_threads);
}

void paged_attention_scores(py::handle q, py::handle q_offsets, py::handle k_cache, py::handle block_table,
                            py::handle seq_lens, py::handle num_scored, double scale, const std::string& gqa_reduce,
                            int64_t pool_kernel, const std::string& pool_type, const std::string& query_reduce,
                            const std::string& layout, py::handle scores, int num_threads) {
  DeviceCheck device = on_cpu();
  run_paged_attention(
      paged_attention_args(device, q, q_offsets, k_cache, py::none(), block_table, seq_lens, num_scored, scale,
                           gqa_reduce, pool_kernel, pool_type, query_reduce, layout, py::none(), scores),
      num_threads);
}

void paged_lookahead_attention(py::handle q, py::handle q_offsets, py::handle k_cache, py::handle v_cache,
                               py::handle block_table, py::handle seq_lens, py::handle num_scored, double scale,
                               const std::string& gqa_reduce, int64_t pool_kernel, const std::string& pool_type,
                               const std::string& query_reduce, const std::string& layout, py::handle out,
                               py::handle scores, int num_threads) {
  DeviceCheck device = on_cpu();
  run_paged_attention(
      paged_attention_args(device, q, q_offsets, k_cache, v_cache, block_table, seq_lens, num_scored, scale, gqa_reduce,
                           pool_kernel, pool_type, query_reduce, layout, out, scores),
      num_threads);
}

void paged_select_compact(py::handle scores, py::handle k_cache, py::handle v_cache, py::handle block_table,
                          py::handle seq_lens, py::handle num_scored, py::handle budgets, int64_t num_sink,
                          const std::string& layout, py::handle new_lens, py::handle kept, int num_threads) {
  DeviceCheck device = on_cpu();
  const PagedSelectArgs p = paged_select_args(device, scores, k_cache, v_cache, block_table, seq_lens, num_scored,
                                              budgets, num_sink, layout, new_lens, kept);
  check_paged_indices(p.block_table, p.B, p.max_blocks, p.block_size, p.num_blocks, p.seq_lens, p.num_scored, nullptr,
                      0, p.budgets, p.num_sink, p.score_width);
  py::gil_scoped_release release;
  cpu::paged_select_compact(p, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "lookaheadkv native CPU kernels (use lookaheadkv_kernels.backends.cpu)";
  m.def("lookahead_qproj", &lookahead_qproj, py::arg("x"), py::arg("weight"), py::arg("bias").none(true),
        py::arg("lora_a").none(true), py::arg("lora_b").none(true), py::arg("lora_scale"), py::arg("cos"),
        py::arg("sin"), py::arg("num_heads"), py::arg("norm_weight").none(true), py::arg("eps"), py::arg("out"),
        py::arg("num_threads"));
  m.def("attention_scores", &attention_scores, py::arg("q"), py::arg("k"), py::arg("num_scored"), py::arg("scale"),
        py::arg("gqa_reduce"), py::arg("pool_kernel"), py::arg("pool_type"), py::arg("query_reduce"), py::arg("scores"),
        py::arg("num_threads"));
  m.def("lookahead_attention", &lookahead_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("num_scored"),
        py::arg("scale"), py::arg("gqa_reduce"), py::arg("pool_kernel"), py::arg("pool_type"), py::arg("query_reduce"),
        py::arg("out"), py::arg("scores"), py::arg("num_threads"));
  m.def("select_compact", &select_compact, py::arg("scores"), py::arg("k"), py::arg("v"), py::arg("budget"),
        py::arg("num_sink"), py::arg("k_out"), py::arg("v_out"), py::arg("kept"), py::arg("num_threads"));
  m.def("paged_attention_scores", &paged_attention_scores, py::arg("q"), py::arg("q_offsets"), py::arg("k_cache"),
        py::arg("block_table"), py::arg("seq_lens"), py::arg("num_scored"), py::arg("scale"), py::arg("gqa_reduce"),
        py::arg("pool_kernel"), py::arg("pool_type"), py::arg("query_reduce"), py::arg("layout"), py::arg("scores"),
        py::arg("num_threads"));
  m.def("paged_lookahead_attention", &paged_lookahead_attention, py::arg("q"), py::arg("q_offsets"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_table"), py::arg("seq_lens"), py::arg("num_scored"), py::arg("scale"),
        py::arg("gqa_reduce"), py::arg("pool_kernel"), py::arg("pool_type"), py::arg("query_reduce"), py::arg("layout"),
        py::arg("out"), py::arg("scores"), py::arg("num_threads"));
  m.def("paged_select_compact", &paged_select_compact, py::arg("scores"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_table"), py::arg("seq_lens"), py::arg("num_scored"), py::arg("budgets"), py::arg("num_sink"),
        py::arg("layout"), py::arg("new_lens"), py::arg("kept"), py::arg("num_threads"));
}
