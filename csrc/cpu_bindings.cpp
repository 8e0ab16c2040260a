// pybind11 module _C_cpu: the CPU kernels of csrc/cpu/ behind a raw interface (data pointers as
// ints, sizes, element strides, dtype codes of common.h). No libtorch: the Python backend
// lookaheadkv_kernels/backends/cpu.py allocates the outputs and passes their pointers.
// The checks here guard memory safety only (argument semantics are validated in Python); a
// failed check raises ValueError. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.h"
#include "cpu/kernels.h"

namespace py = pybind11;
using lookaheadkv::check_arg;
using lookaheadkv::to_dtype;
namespace cpu = lookaheadkv::cpu;

namespace {

template <class T>
const T* cptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

void qproj(uintptr_t x, int64_t x_row, uintptr_t weight, int64_t w_row, uintptr_t bias, uintptr_t lora_a,
           uintptr_t lora_b, int64_t rank, double lora_scale, uintptr_t cos, uintptr_t sin, uintptr_t norm_weight,
           double eps, uintptr_t out, int dtype, int64_t T, int64_t hidden, int64_t num_heads, int64_t head_dim,
           int num_threads) {
  check_arg(x && weight && cos && sin && out, "lookahead_qproj: null pointer for x, weight, cos, sin or out");
  check_arg(T >= 1 && hidden >= 1 && num_heads >= 1 && head_dim >= 2 && head_dim % 2 == 0,
            "lookahead_qproj: need T, hidden, num_heads >= 1 and an even head_dim >= 2");
  check_arg((lora_a == 0) == (lora_b == 0), "lookahead_qproj: lora_a and lora_b must be given together");
  check_arg(lora_a == 0 || rank >= 1, "lookahead_qproj: LoRA rank must be >= 1");
  const cpu::QProjArgs args{
      cptr<void>(x),
      x_row,
      cptr<void>(weight),
      w_row,
      cptr<float>(bias),
      cptr<float>(lora_a),
      cptr<float>(lora_b),
      float(lora_scale),
      cptr<float>(cos),
      cptr<float>(sin),
      cptr<float>(norm_weight),
      float(eps),
      reinterpret_cast<void*>(out),
      to_dtype(dtype),
      T,
      hidden,
      num_heads,
      head_dim,
      rank,
      num_threads,
  };
  py::gil_scoped_release release;
  cpu::lookahead_qproj(args);
}

void attention(uintptr_t q, int64_t q_b, int64_t q_h, int64_t q_t, uintptr_t k, int64_t k_b, int64_t k_h, int64_t k_n,
               uintptr_t v, int64_t v_b, int64_t v_h, int64_t v_n, int dtype, uintptr_t out, uintptr_t scores,
               int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t N, int64_t D, int64_t S, double scale,
               bool gqa_max, bool query_max, int64_t pool_kernel, bool pool_max, int num_threads) {
  check_arg(q && k && scores, "attention: null pointer for q, k or scores");
  check_arg((v == 0) == (out == 0), "attention: v and out must be given together (lookahead_attention)");
  check_arg(B >= 1 && Hq >= 1 && Hkv >= 1 && Tq >= 1 && N >= 1 && D >= 1, "attention: sizes must be >= 1");
  check_arg(Hq % Hkv == 0, "attention: Hq must be a multiple of Hkv");
  check_arg(Tq <= N && S >= 1 && S <= N, "attention: need Tq <= N and 1 <= S <= N");
  check_arg(pool_kernel >= 1 && pool_kernel % 2 == 1, "attention: pool_kernel must be odd and >= 1");
  const cpu::AttentionArgs args{
      cptr<void>(q),
      q_b,
      q_h,
      q_t,
      cptr<void>(k),
      k_b,
      k_h,
      k_n,
      cptr<void>(v),
      v_b,
      v_h,
      v_n,
      to_dtype(dtype),
      reinterpret_cast<void*>(out),
      reinterpret_cast<float*>(scores),
      B,
      Hq,
      Hkv,
      Tq,
      N,
      D,
      S,
      float(scale),
      gqa_max,
      query_max,
      pool_kernel,
      pool_max,
      num_threads,
  };
  py::gil_scoped_release release;
  cpu::attention(args);
}

void select_compact(uintptr_t scores, int64_t s_b, int64_t s_h, int64_t s_s, uintptr_t k, int64_t k_b, int64_t k_h,
                    int64_t k_n, uintptr_t v, int64_t v_b, int64_t v_h, int64_t v_n, int64_t element_size,
                    uintptr_t k_out, uintptr_t v_out, uintptr_t kept, int64_t B, int64_t Hkv, int64_t N, int64_t D,
                    int64_t S, int64_t budget, int64_t num_sink, int num_threads) {
  check_arg(scores && k && v && k_out && v_out && kept, "select_compact: null pointer");
  check_arg(B >= 1 && Hkv >= 1 && N >= 1 && D >= 1 && element_size >= 1, "select_compact: sizes must be >= 1");
  check_arg(S >= 1 && S <= N, "select_compact: need 1 <= S <= N");
  check_arg(budget >= 1 && num_sink >= 0, "select_compact: need budget >= 1 and num_sink >= 0");
  const int64_t protected_count = (num_sink < S ? num_sink : S) + (N - S);
  check_arg(budget >= N || budget >= protected_count, "select_compact: budget is below the always-kept positions");
  const cpu::SelectArgs args{
      cptr<float>(scores),
      s_b,
      s_h,
      s_s,
      cptr<void>(k),
      k_b,
      k_h,
      k_n,
      cptr<void>(v),
      v_b,
      v_h,
      v_n,
      element_size,
      reinterpret_cast<void*>(k_out),
      reinterpret_cast<void*>(v_out),
      reinterpret_cast<int64_t*>(kept),
      B,
      Hkv,
      N,
      D,
      S,
      budget,
      num_sink,
      num_threads,
  };
  py::gil_scoped_release release;
  cpu::select_compact(args);
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "lookaheadkv native CPU kernels (raw pointers; use lookaheadkv_kernels.backends.cpu)";
  m.def("lookahead_qproj", &qproj, py::arg("x"), py::arg("x_row"), py::arg("weight"), py::arg("w_row"), py::arg("bias"),
        py::arg("lora_a"), py::arg("lora_b"), py::arg("rank"), py::arg("lora_scale"), py::arg("cos"), py::arg("sin"),
        py::arg("norm_weight"), py::arg("eps"), py::arg("out"), py::arg("dtype"), py::arg("T"), py::arg("hidden"),
        py::arg("num_heads"), py::arg("head_dim"), py::arg("num_threads"));
  m.def("attention", &attention, py::arg("q"), py::arg("q_b"), py::arg("q_h"), py::arg("q_t"), py::arg("k"),
        py::arg("k_b"), py::arg("k_h"), py::arg("k_n"), py::arg("v"), py::arg("v_b"), py::arg("v_h"), py::arg("v_n"),
        py::arg("dtype"), py::arg("out"), py::arg("scores"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("Tq"),
        py::arg("N"), py::arg("D"), py::arg("S"), py::arg("scale"), py::arg("gqa_max"), py::arg("query_max"),
        py::arg("pool_kernel"), py::arg("pool_max"), py::arg("num_threads"));
  m.def("select_compact", &select_compact, py::arg("scores"), py::arg("s_b"), py::arg("s_h"), py::arg("s_s"),
        py::arg("k"), py::arg("k_b"), py::arg("k_h"), py::arg("k_n"), py::arg("v"), py::arg("v_b"), py::arg("v_h"),
        py::arg("v_n"), py::arg("element_size"), py::arg("k_out"), py::arg("v_out"), py::arg("kept"), py::arg("B"),
        py::arg("Hkv"), py::arg("N"), py::arg("D"), py::arg("S"), py::arg("budget"), py::arg("num_sink"),
        py::arg("num_threads"));
}
