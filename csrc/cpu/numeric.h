// Scalar building blocks of the CPU kernels: float16/bfloat16 <-> float32 conversion, a
// vectorisable exp, and the NaN-propagating max. Everything is branch-free plain C++ so that
// loops calling these functions auto-vectorise (no intrinsics, no -ffast-math).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "common.h"
#include "cpu/isa.h"

namespace lookaheadkv::cpu::LOOKAHEADKV_ISA {

// Storage types of the half-precision dtypes: raw IEEE bits.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_float(float x) { return x; }

inline float to_float(BFloat16 x) { return bits_float(uint32_t(x.bits) << 16); }

// IEEE half -> float, exact for every input (the branch-free method torch uses in
// c10::detail::fp16_ieee_to_fp32_value, so conversions agree with torch bit for bit).
inline float to_float(Half x) {
  const uint32_t w = uint32_t(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized);
  return bits_float(sign | magnitude);
}

template <class T>
T from_float(float f);

template <>
inline float from_float<float>(float f) {
  return f;
}

// Round to nearest even; NaN -> quiet NaN (torch's c10::BFloat16 rounding).
template <>
inline BFloat16 from_float<BFloat16>(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return BFloat16{uint16_t(f != f ? 0x7FC0u : rounded)};
}

// Round to nearest even, overflow -> inf, NaN -> NaN (c10::detail::fp16_ieee_from_fp32_value).
template <>
inline Half from_float<Half>(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return Half{uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

// exp(x) for x <= 0 (softmax arguments x - max), vectorisable: Cephes' expf polynomial, relative
// error < 1e-7 over all x in [-87.33, 0]. exp(-inf) = 0, exp(NaN) = NaN; for
// x < -87.33 (results below ~1.18e-38, i.e. about FLT_MIN) it returns 0, far below any probability
// that matters. x > 0 is outside the domain (it returns 1).
inline float exp_nonpositive(float x) {
  const float lo = -87.33f;    // exp(lo) > FLT_MIN: 2^n below stays a normal float
  float xc = x < lo ? lo : x;  // NaN passes through (the comparison is false) and stays NaN
  xc = xc > 0.0f ? 0.0f : xc;
  // t = x·log2(e) + (1.5·2^23 + 127): round to nearest n in the low mantissa bits of t, biased by
  // 127, so that bits(t) << 23 is the float 2^n.
  const float magic = 12583039.0f;
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * (r * r) + r + 1.0f;
  const float y = e * bits_float(float_bits(t) << 23);
  return x < lo ? 0.0f : y;
}

// max that returns NaN when either operand is NaN (torch's amax / max_pool semantics).
inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 64-byte aligned float scratch (whole cache lines, full-width vector loads never split lines).
struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using FloatBuffer = std::unique_ptr<float[], AlignedFree>;

inline FloatBuffer alloc_floats(int64_t count) {
  const size_t bytes = size_t(round_up(count > 0 ? count : 1, 16)) * sizeof(float);
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  return FloatBuffer(static_cast<float*>(p));
}

// Calls f with a value of the storage type of `dtype` (float, Half or BFloat16).
template <class F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16:
      return f(Half{});
    case DType::kBFloat16:
      return f(BFloat16{});
    case DType::kFloat32:
    default:
      return f(float{});
  }
}

}  // namespace lookaheadkv::cpu::LOOKAHEADKV_ISA
