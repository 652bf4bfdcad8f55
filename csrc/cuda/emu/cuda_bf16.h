// __nv_bfloat16 for the CPU emulator of the CUDA device code (see cuda_runtime.h here).
// Storage only, like the real build (torch compiles with -D__CUDA_NO_BFLOAT16_CONVERSIONS__ and
// -D__CUDA_NO_BFLOAT16_OPERATORS__): conversions go through the functions below, bit-exact with
// the GPU's cvt.rn.bf16.f32 (round to nearest even; subnormals kept; any NaN -> 0x7fff, CUDA's
// canonical NaN, where torch's CPU conversion gives 0x7fc0: compare NaN-ness, not bits).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

struct __nv_bfloat16 {
  unsigned short __x;
};
typedef __nv_bfloat16 nv_bfloat16;

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<uint32_t>(h.__x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
  u += 0x7fffu + ((u >> 16) & 1u);  // carries into the exponent: rounds up to the next binade / inf
  return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}

inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
