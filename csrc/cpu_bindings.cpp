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
}
