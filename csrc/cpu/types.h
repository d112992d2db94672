// Storage types of the CPU kernels: raw pointers only, so this compiles without torch headers.
#pragma once
#include <cstdint>

namespace fastcore {
namespace cpu {

// 16-bit float storage; arithmetic always happens in float.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

// Statistics, accumulators and dW/dB: double for double inputs, float otherwise.
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <typename T> using acc_t = typename acc<T>::type;

}  // namespace cpu
}  // namespace fastcore
