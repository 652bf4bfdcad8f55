// __half for the CPU emulator of the CUDA device code (see cuda_runtime.h here). Storage only,
// like the real build (-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__); the
// conversions are bit-exact with the GPU's cvt.rn.f16.f32 / cvt.f32.f16: round to nearest even,
// subnormals kept, overflow to inf, any NaN -> 0x7fff (CUDA's canonical NaN; torch's CPU
// conversion keeps the sign and gives 0x7e00 / 0xfe00: compare NaN-ness, not bits).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

struct __half {
  unsigned short __x;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t exp = (h.__x >> 10) & 0x1fu, man = h.__x & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / NaN (payload kept)
  } else if (exp == 0) {
    const float mag = static_cast<float>(man) * 0x1p-24f;  // zero or subnormal: exact
    return sign ? -mag : mag;
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  return __uint_as_float(u);
}

inline __half __float2half_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{0x7fff};
  if (a >= 0x38800000u) {                // |f| >= 2^-14: normal half, or overflow
    const uint32_t r = a - 0x38000000u;  // rebias the exponent (127 - 15) << 23
    uint32_t h = r >> 13;
    const uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    if (h > 0x7c00u || a >= 0x7f800000u) h = 0x7c00u;  // overflow (and inf) -> inf
    return __half{static_cast<unsigned short>(sign | h)};
  }
  if (a < 0x33000000u) return __half{static_cast<unsigned short>(sign)};  // < 2^-25: rounds to 0
  // subnormal half: units of 2^-24; f = m 2^(e - 150) with the implicit bit, 14 <= shift <= 24
  const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126u - e;
  uint32_t h = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (h & 1u))) ++h;  // may carry into the smallest normal
  return __half{static_cast<unsigned short>(sign | h)};
}

inline __half __float2half(float f) { return __float2half_rn(f); }
