// The typed boundary of the native modules: every op receives its torch.Tensor arguments as Python
// objects and reads their metadata (data pointer, dtype, sizes, strides, device, storage extent)
// through torch's Python API, so the modules link no libtorch and one build serves any torch
// version. Every check a kernel's memory safety depends on is made here, against the tensors
// themselves: dims, dtypes, devices, dense last dims, outputs' shapes, and that every element a
// tensor's sizes and strides address lies inside its storage. A failed check raises ValueError
// (TypeError for a wrong type or dtype) naming the argument; no call reads outside a buffer.
#pragma once

#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "op_args.h"

namespace lookaheadkv {

namespace py = pybind11;

enum class ScalarType { kFloat32, kFloat16, kBFloat16, kInt32, kInt64, kUInt8, kOther };
enum class DeviceType { kCPU, kCUDA, kOther };

constexpr int kMaxDims = 4;

struct TensorArg {
  const char* name = "";
  uintptr_t data = 0;
  ScalarType type = ScalarType::kOther;
  std::string type_name;
  int64_t elem_size = 0;
  int ndim = 0;
  std::array<int64_t, kMaxDims> sizes{}, strides{};
  DeviceType device = DeviceType::kOther;
  int64_t device_index = -1;

  int64_t size(int d) const { return sizes[d < 0 ? ndim + d : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? ndim + d : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= sizes[d];
    return n;
  }
  template <typename T>
  T* ptr() const {
    return reinterpret_cast<T*>(data);
  }
};

[[noreturn]] inline void fail(const std::string& what) { throw py::value_error("lookaheadkv native: " + what); }
[[noreturn]] inline void fail_type(const std::string& what) { throw py::type_error("lookaheadkv native: " + what); }

inline std::string shape_str(const TensorArg& t) {
  std::string s = "[";
  for (int d = 0; d < t.ndim; ++d) s += (d ? ", " : "") + std::to_string(t.sizes[d]);
  return s + "]";
}

inline ScalarType scalar_type(const std::string& name, int64_t* elem_size) {
  struct Entry {
    const char* name;
    ScalarType type;
    int64_t size;
  };
  static const Entry kTypes[] = {
      {"torch.float32", ScalarType::kFloat32, 4},   {"torch.float16", ScalarType::kFloat16, 2},
      {"torch.bfloat16", ScalarType::kBFloat16, 2}, {"torch.int32", ScalarType::kInt32, 4},
      {"torch.int64", ScalarType::kInt64, 8},       {"torch.uint8", ScalarType::kUInt8, 1},
  };
  for (const Entry& e : kTypes) {
    if (name == e.name) {
      *elem_size = e.size;
      return e.type;
    }
  }
  return ScalarType::kOther;
}

// The metadata of `obj`, which must be a strided torch.Tensor of `ndim` dims whose addressed
// elements all lie in its storage.
inline TensorArg tensor_arg(py::handle obj, const char* name, int ndim) {
  static py::handle tensor_type = py::object(py::module_::import("torch").attr("Tensor")).release();
  TensorArg t;
  t.name = name;
  if (!py::isinstance(obj, tensor_type)) fail_type(std::string(name) + " must be a torch.Tensor");
  if (py::str(obj.attr("layout")).cast<std::string>() != "torch.strided") {
    fail(std::string(name) + " must be a dense (strided) tensor");
  }
  if (obj.attr("is_conj")().cast<bool>() || obj.attr("is_neg")().cast<bool>()) {
    fail(std::string(name) + " is a lazy conjugate/negative view: call .resolve_conj().resolve_neg() first");
  }
  const py::tuple shape = obj.attr("shape");
  if (static_cast<int>(shape.size()) != ndim) {
    fail(std::string(name) + " must have " + std::to_string(ndim) + " dims, got " + std::to_string(shape.size()));
  }
  const py::tuple strides = obj.attr("stride")();
  t.ndim = ndim;
  for (int d = 0; d < ndim; ++d) {
    t.sizes[d] = shape[d].cast<int64_t>();
    t.strides[d] = strides[d].cast<int64_t>();
  }
  t.type_name = py::str(obj.attr("dtype")).cast<std::string>();
  t.type = scalar_type(t.type_name, &t.elem_size);
  if (t.type == ScalarType::kOther) t.elem_size = obj.attr("element_size")().cast<int64_t>();
  const py::object device = obj.attr("device");
  const std::string device_type = py::str(device.attr("type")).cast<std::string>();
  t.device = device_type == "cpu" ? DeviceType::kCPU : device_type == "cuda" ? DeviceType::kCUDA : DeviceType::kOther;
  const py::object index = device.attr("index");
  t.device_index = index.is_none() ? -1 : index.cast<int64_t>();
  if (t.device == DeviceType::kOther) fail(std::string(name) + " is on an unsupported device " + device_type);
  t.data = obj.attr("data_ptr")().cast<uintptr_t>();
  if (t.numel() == 0) return t;
  // The lowest and highest element the sizes and strides address, against the storage's bytes.
  int64_t lo = 0, hi = 0;
  for (int d = 0; d < ndim; ++d) {
    if (t.sizes[d] < 0) fail(std::string(name) + " has a negative size");
    const int64_t span = (t.sizes[d] - 1) * t.strides[d];
    (span < 0 ? lo : hi) += span;
  }
  const py::object storage = obj.attr("untyped_storage")();
  const auto begin = storage.attr("data_ptr")().cast<uintptr_t>();
  const auto nbytes = storage.attr("nbytes")().cast<uint64_t>();
  const uintptr_t first = t.data + lo * t.elem_size;
  const uintptr_t last = t.data + (hi + 1) * t.elem_size;
  if (first < begin || last > begin + nbytes || first > last) {
    fail(std::string(name) + "'s sizes " + shape_str(t) + " and strides address memory outside its storage");
  }
  return t;
}

// ---- checks on a TensorArg ----------------------------------------------------------------------

inline bool is_float(const TensorArg& t) {
  return t.type == ScalarType::kFloat32 || t.type == ScalarType::kFloat16 || t.type == ScalarType::kBFloat16;
}

inline void check_float(const TensorArg& t) {
  if (!is_float(t)) fail_type(std::string(t.name) + " must be float32, float16 or bfloat16, got " + t.type_name);
}

inline void check_type(const TensorArg& t, ScalarType type, const char* type_name) {
  if (t.type != type) fail_type(std::string(t.name) + " must be " + type_name + ", got " + t.type_name);
}

inline void check_same_type(const TensorArg& t, const TensorArg& like) {
  if (t.type != like.type) {
    fail_type(std::string(t.name) + " must have " + like.name + "'s dtype " + like.type_name + ", got " + t.type_name);
  }
}

// Sizes must equal `want`; -1 matches any size.
inline void check_shape(const TensorArg& t, std::initializer_list<int64_t> want) {
  int d = 0;
  bool ok = static_cast<int>(want.size()) == t.ndim;
  std::string expected = "[";
  for (int64_t w : want) {
    expected += (d ? ", " : "") + (w < 0 ? std::string("*") : std::to_string(w));
    if (ok && w >= 0 && t.sizes[d] != w) ok = false;
    ++d;
  }
  if (!ok) fail(std::string(t.name) + " must have shape " + expected + "], got " + shape_str(t));
}

inline void check_nonempty(const TensorArg& t) {
  if (t.numel() == 0) fail(std::string(t.name) + " must not be empty, got shape " + shape_str(t));
}

inline void check_last_dense(const TensorArg& t) {
  if (t.size(-1) > 1 && t.stride(-1) != 1) fail(std::string(t.name) + "'s last dim must be contiguous");
}

inline void check_contiguous(const TensorArg& t) {
  int64_t expected = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.sizes[d] > 1 && t.strides[d] != expected) fail(std::string(t.name) + " must be contiguous");
    expected *= t.sizes[d];
  }
}

// All tensors of a call on `device` (and one CUDA device).
class DeviceCheck {
 public:
  explicit DeviceCheck(DeviceType device) : device_(device) {}
  void operator()(const TensorArg& t) {
    const char* want = device_ == DeviceType::kCPU ? "cpu" : "cuda";
    if (t.device != device_) fail(std::string(t.name) + " must be a " + want + " tensor");
    if (first_ == nullptr) {
      first_ = t.name;
      index_ = t.device_index;
    } else if (t.device_index != index_) {
      fail(std::string(t.name) + " is on another device than " + first_ + ": all tensors must share one device");
    }
  }

 private:
  DeviceType device_;
  const char* first_ = nullptr;
  int64_t index_ = -1;
};

inline DType float_dtype(const TensorArg& t) {
  switch (t.type) {
    case ScalarType::kFloat16:
      return DType::kFloat16;
    case ScalarType::kBFloat16:
      return DType::kBFloat16;
    default:
      return DType::kFloat32;
  }
}

inline Reduce reduce_arg(const std::string& value, const char* name) {
  if (value == "mean") return Reduce::kMean;
  if (value == "max") return Reduce::kMax;
  fail(std::string(name) + " must be 'mean' or 'max', got '" + value + "'");
}

inline PoolType pool_type_arg(const std::string& value) {
  if (value == "max") return PoolType::kMax;
  if (value == "avg") return PoolType::kAvg;
  fail("pool_type must be 'max' or 'avg', got '" + value + "'");
}

inline void check_range(int64_t value, int64_t lo, int64_t hi, const char* name) {
  if (value < lo || value > hi) {
    fail(std::string(name) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
         std::to_string(value));
  }
}

}  // namespace lookaheadkv
