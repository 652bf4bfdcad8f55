// Scalar math shared by the C++ CPU kernels, written so GCC auto-vectorises the loops that call
// it: dtype loads to fp32 and a branch-free exp. Header-only, no torch beyond c10 scalar types.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace unif2ace::cpu {

#ifndef U2A_INLINE
#define U2A_INLINE inline __attribute__((always_inline))
#endif

U2A_INLINE float to_f32(float v) { return v; }
U2A_INLINE float to_f32(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
U2A_INLINE float to_f32(c10::Half v) { return static_cast<float>(v); }

// fp32 -> T, round to nearest even. bf16 by integer ops on the bits (branch-free, so loops storing
// bf16 vectorise; c10's conversion does not), bit-identical to c10::BFloat16(float) including its
// NaN (0x7FC0); Half through c10.
template <typename T>
U2A_INLINE T from_f32(float v) {
  return static_cast<T>(v);
}
template <>
U2A_INLINE c10::BFloat16 from_f32<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan_m = -static_cast<uint32_t>((u & 0x7FFFFFFFu) > 0x7F800000u);
  return c10::BFloat16(static_cast<uint16_t>((rounded & ~nan_m) | (0x7FC0u & nan_m)), c10::BFloat16::from_bits());
}

// exp(x) for x in [-87, 88] (clamped outside; -inf -> exp(-87) ~ 1.6e-38): Cody-Waite reduction
// x = k ln2 + r, |r| <= ln2/2, degree-6 Taylor polynomial for exp(r), scale by 2^k through the
// exponent bits. Branch-free and without float compares or float->int conversions (which may trap,
// so GCC would not vectorise them): the clamp works on the bit pattern, k comes from the
// round-to-nearest magic number.
U2A_INLINE float fast_exp(float x) {
  int32_t ix;
  std::memcpy(&ix, &x, sizeof(ix));
  constexpr int32_t LO = static_cast<int32_t>(0xC2AE0000u);  // -87.0f; larger unsigned = more negative
  constexpr int32_t HI = 0x42B00000;                         // 88.0f
  const int32_t lo_m = -static_cast<int32_t>(static_cast<uint32_t>(ix) > static_cast<uint32_t>(LO));
  ix = (ix & ~lo_m) | (LO & lo_m);
  const int32_t hi_m = -static_cast<int32_t>(ix > HI);
  ix = (ix & ~hi_m) | (HI & hi_m);
  std::memcpy(&x, &ix, sizeof(x));
  const float t = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: round(x / ln2) in the low bits
  int32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const float kf = t - 12582912.0f;
  float r = x - kf * 0.693145751953125f;
  r = r - kf * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (tb - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// fast_exp with IEEE special values, for callers whose arguments may be NaN or infinite: NaN -> NaN
// (propagated, not clamped), x < -87 (-inf included) -> 0, x > 88 (+inf included) -> +inf; in
// between exactly fast_exp. Integer selects on the bit pattern only, so it vectorises like fast_exp.
U2A_INLINE float fast_exp_special(float x) {
  int32_t ix;
  std::memcpy(&ix, &x, sizeof(ix));
  const float e = fast_exp(x);
  int32_t ie;
  std::memcpy(&ie, &e, sizeof(ie));
  const int32_t nan_m = -static_cast<int32_t>((ix & 0x7FFFFFFF) > 0x7F800000);
  const int32_t lo_m = -static_cast<int32_t>(static_cast<uint32_t>(ix) > 0xC2AE0000u);  // below -87
  const int32_t hi_m = -static_cast<int32_t>(ix > 0x42B00000);                          // above 88
  ie &= ~lo_m;
  ie = (ie & ~hi_m) | (0x7F800000 & hi_m);
  ie = (ie & ~nan_m) | (ix & nan_m);
  float r;
  std::memcpy(&r, &ie, sizeof(r));
  return r;
}

// ------------------------------------------------------------------------------------------------
// Run-time ISA choice for loops compiled several times: the baseline x86-64 copy, one with
// U2A_TARGET_AVX2 (AVX2 + FMA) and one with U2A_TARGET_AVX512 (AVX-512 F/DQ/VL/BW); cpu_isa()
// says which copy this CPU runs (detected once).

enum class Isa { kBase, kAvx2, kAvx512 };

#define U2A_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#define U2A_TARGET_AVX2 __attribute__((target("avx2,fma")))

inline Isa cpu_isa() {
  static const Isa isa = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
                             ? Isa::kAvx512
                         : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? Isa::kAvx2
                                                                                             : Isa::kBase;
  return isa;
}

}  // namespace unif2ace::cpu
