// How the CPU kernels read and write each dtype, in loops the compiler can vectorize.
//
// c10::BFloat16 converts through branchy scalar code that keeps GCC from vectorizing the loops
// around it, so a bf16 pass would run far below fp32's bandwidth (docs/performance.md). Here
// bf16 is its raw bits, widened by a shift and
// narrowed with branch-free round-to-nearest-even (NaN stays a quiet NaN): c10's results.
// fp16 keeps c10::Half: GCC 12's _Float16 converts through libgcc calls without AVX512-FP16,
// which measured slower still; fp16 on a CPU is rare.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace eofd {

struct Bf16Bits {
  uint16_t bits;
};

// The CPU kernels' 16-bit element types (same size and bits as the tensors'), for
// dispatch_dtypes (include/dtype_pairs.h).
struct CpuElements {
  using half = c10::Half;
  using bfloat16 = Bf16Bits;
};

inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(c10::Half x) { return static_cast<float>(x); }
inline float widen(Bf16Bits x) { return __builtin_bit_cast(float, uint32_t{x.bits} << 16); }

template <typename T, typename acc_t>
inline T narrow(acc_t x) {
  return static_cast<T>(x);
}
template <>
inline Bf16Bits narrow<Bf16Bits, float>(float x) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return Bf16Bits{static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded)};
}
// A double (an fp64 pair's accumulator) rounds to float first, as torch's casts do (c10's
// 16-bit types are built from a float; c10::Half's generic narrow above converts so too): the
// bits of the promoted call's fp64 result cast to the side's dtype.
template <>
inline Bf16Bits narrow<Bf16Bits, double>(double x) {
  return narrow<Bf16Bits>(static_cast<float>(x));
}

}  // namespace eofd
