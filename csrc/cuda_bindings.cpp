// pybind11 module _C_cuda: the CUDA kernels (csrc/cuda/) behind plain integers. Python passes data
// pointers, sizes, element strides, a dtype code (csrc/common.h), a workspace pointer sized by the
// matching *_workspace_bytes query, and the caller's current cudaStream_t as an int. Launches are
// asynchronous; launch errors raise RuntimeError, bad sizes ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.h"
#include "cuda/api.cuh"

namespace py = pybind11;
using namespace lookaheadkv;

namespace {

template <typename T>
T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cuda::Stream as_stream(uintptr_t s) { return reinterpret_cast<cuda::Stream>(s); }

void lookahead_qproj(int dtype, uintptr_t x, int64_t x_row_stride, uintptr_t weight, int64_t w_row_stride,
                     uintptr_t bias, uintptr_t lora_a, uintptr_t lora_b, int64_t rank, double lora_scale, uintptr_t cos,
                     uintptr_t sin, int64_t T, int64_t hidden, int64_t num_heads, int64_t head_dim,
                     uintptr_t norm_weight, double eps, uintptr_t out, uintptr_t workspace, int num_sms,
                     uintptr_t stream) {
  cuda::QprojArgs a;
  a.dtype = to_dtype(dtype);
  a.x = as_ptr<const void>(x);
  a.x_row_stride = x_row_stride;
  a.weight = as_ptr<const void>(weight);
  a.w_row_stride = w_row_stride;
  a.bias = as_ptr<const float>(bias);
  a.lora_a = as_ptr<const float>(lora_a);
  a.lora_b = as_ptr<const float>(lora_b);
  a.rank = rank;
  a.lora_scale = static_cast<float>(lora_scale);
  a.cos = as_ptr<const float>(cos);
  a.sin = as_ptr<const float>(sin);
  a.norm_weight = as_ptr<const float>(norm_weight);
  a.eps = static_cast<float>(eps);
  a.T = T;
  a.hidden = hidden;
  a.num_heads = num_heads;
  a.head_dim = head_dim;
  a.out = as_ptr<void>(out);
  cuda::lookahead_qproj(a, as_ptr<void>(workspace), num_sms, as_stream(stream));
}

void attention(int dtype, uintptr_t q, int64_t q_sb, int64_t q_sh, int64_t q_st, uintptr_t k, int64_t k_sb,
               int64_t k_sh, int64_t k_sn, uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_sn, int64_t B, int64_t Hq,
               int64_t Hkv, int64_t Tq, int64_t N, int64_t D, int64_t S, double scale, bool gqa_max, bool query_max,
               int64_t pool_kernel, bool pool_avg, uintptr_t out, uintptr_t scores, uintptr_t workspace, int num_sms,
               uintptr_t stream) {
  cuda::AttentionArgs a;
  a.dtype = to_dtype(dtype);
  a.q = as_ptr<const void>(q);
  a.q_sb = q_sb;
  a.q_sh = q_sh;
  a.q_st = q_st;
  a.k = as_ptr<const void>(k);
  a.k_sb = k_sb;
  a.k_sh = k_sh;
  a.k_sn = k_sn;
  a.v = as_ptr<const void>(v);
  a.v_sb = v_sb;
  a.v_sh = v_sh;
  a.v_sn = v_sn;
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Tq = Tq;
  a.N = N;
  a.D = D;
  a.S = S;
  a.scale = static_cast<float>(scale);
  a.gqa_max = gqa_max;
  a.query_max = query_max;
  a.pool_kernel = pool_kernel;
  a.pool_avg = pool_avg;
  a.out = as_ptr<void>(out);
  a.scores = as_ptr<float>(scores);
  cuda::attention(a, as_ptr<void>(workspace), num_sms, as_stream(stream));
}

void select_compact(uintptr_t scores, int64_t s_sb, int64_t s_sh, int64_t s_ss, uintptr_t k, int64_t k_sb, int64_t k_sh,
                    int64_t k_sn, uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_sn, int64_t elem_size, int64_t B,
                    int64_t Hkv, int64_t N, int64_t D, int64_t S, int64_t budget, int64_t num_sink, uintptr_t k_out,
                    uintptr_t v_out, uintptr_t kept, uintptr_t workspace, uintptr_t stream) {
  cuda::SelectArgs a;
  a.scores = as_ptr<const float>(scores);
  a.s_sb = s_sb;
  a.s_sh = s_sh;
  a.s_ss = s_ss;
  a.k = as_ptr<const void>(k);
  a.k_sb = k_sb;
  a.k_sh = k_sh;
  a.k_sn = k_sn;
  a.v = as_ptr<const void>(v);
  a.v_sb = v_sb;
  a.v_sh = v_sh;
  a.v_sn = v_sn;
  a.elem_size = elem_size;
  a.B = B;
  a.Hkv = Hkv;
  a.N = N;
  a.D = D;
  a.S = S;
  a.budget = budget;
  a.num_sink = num_sink;
  a.k_out = as_ptr<void>(k_out);
  a.v_out = as_ptr<void>(v_out);
  a.kept = as_ptr<int64_t>(kept);
  cuda::select_compact(a, as_ptr<void>(workspace), as_stream(stream));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "lookaheadkv CUDA kernels (raw pointers, element strides, caller's stream; see backends/cuda.py)";
  m.def("qproj_workspace_bytes", &cuda::qproj_workspace_bytes, py::arg("T"), py::arg("hidden"), py::arg("out_features"),
        py::arg("rank"), py::arg("num_sms"));
  m.def("lookahead_qproj", &lookahead_qproj);
  m.def(
      "attention_workspace_bytes",
      [](int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t N, int64_t D, int64_t S, bool with_out,
         int num_sms) {
        return cuda::attention_workspace_bytes(to_dtype(dtype), B, Hq, Hkv, Tq, N, D, S, with_out, num_sms);
      },
      py::arg("dtype"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("Tq"), py::arg("N"), py::arg("D"),
      py::arg("S"), py::arg("with_out"), py::arg("num_sms"));
  m.def("attention", &attention);
  m.def("select_workspace_bytes", &cuda::select_workspace_bytes, py::arg("B"), py::arg("Hkv"), py::arg("N"),
        py::arg("S"), py::arg("budget"), py::arg("num_sink"));
  m.def("select_compact", &select_compact);
}
