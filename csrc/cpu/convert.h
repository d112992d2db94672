// Conversions between the 16-bit storage types and float, shared by the CPU kernels.
#pragma once
#include <cstdint>
#include <cstring>

#include "types.h"

namespace fastcore {
namespace cpu {

inline float to_acc(bf16 v) { return __builtin_bit_cast(float, uint32_t(v.bits) << 16); }

inline float to_acc(f16 v) {
  uint32_t sign = uint32_t(v.bits & 0x8000u) << 16, exp = (v.bits >> 10) & 0x1fu, man = v.bits & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: renormalise
    exp = 113;
    while (!(man & 0x400u)) { man <<= 1; --exp; }
    u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }

template <typename T> inline T from_acc(acc_t<T> v);

template <> inline f16 from_acc<f16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};
  if (u >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // rounds past 65504: inf
  if (u >= 0x38800000u) {  // normal half: rebias the exponent, round to nearest even
    const uint32_t h = ((u + 0xfffu + ((u >> 13) & 1u)) >> 13) - (112u << 10);
    return f16{uint16_t(sign | h)};
  }
  if (u < 0x33000000u) return f16{sign};  // rounds to zero
  // subnormal half: shift the implicit-one mantissa into place, round to nearest even
  const uint32_t e = u >> 23, m = (u & 0x7fffffu) | 0x800000u, shift = 126u - e;
  uint32_t h = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (h & 1u))) ++h;
  return f16{uint16_t(sign | h)};
}

// float -> bf16 bits, rounded to nearest even, NaN kept a NaN; branch-free so loops vectorise.
inline uint16_t bf16_bits(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet_nan = (u >> 16) | 0x40u;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

template <> inline bf16 from_acc<bf16>(float v) { return bf16{bf16_bits(v)}; }
template <> inline float from_acc<float>(float v) { return v; }
template <> inline double from_acc<double>(double v) { return v; }

}  // namespace cpu
}  // namespace fastcore
