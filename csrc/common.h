// Shared by the CPU and CUDA native modules. The Python layer passes raw pointers, sizes,
// element strides and one of these dtype codes; nothing here depends on libtorch, so one build
// of the extension works with any torch version.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace lookaheadkv {

// Must match lookaheadkv_kernels/backends/_native.py::DTYPE_CODES.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline DType to_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("lookaheadkv: unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

inline void check_arg(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("lookaheadkv native: ") + what);
}

}  // namespace lookaheadkv
