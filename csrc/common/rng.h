// The counter-based RNG of the sampling ops, bit for bit as defined in
// unif2ace/kernels/reference/rng.py (that docstring is the contract; every +, * wraps mod 2^32).
// Torch-free and usable from host C++ and CUDA device code alike (UNIF2ACE_HD).
//
//   mix32, seed_stream_key, row_key, element   the uint32 word generator
//   KeyPair, stream_keys, row_keys             the same keys for both words of a draw (hi, lo)
//   exponential_from_words / gumbel_from_words Exponential(1) and Gumbel(0, 1) from the 64 bits
//                                              (hi, lo), in double like the reference, Gumbel cast
//                                              to fp32 (matches the reference up to libm ulps in
//                                              double, i.e. bit-identical in fp32 except with
//                                              probability ~2^-28 per value)
//   gumbel_at(row keys, token)                 gumbel_from_words of one (row, token)
//   gumbel_upper_f32(hi)                       a cheap fp32 upper bound of the Gumbel of (hi, *),
//                                              from hi alone: used to skip the exact evaluation of
//                                              codes that cannot win a Gumbel-max (see below)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define UNIF2ACE_HD __host__ __device__ __forceinline__
#else
#define UNIF2ACE_HD inline __attribute__((always_inline))
#endif

namespace unif2ace {
namespace rng {

constexpr uint32_t M1 = 0x21F0AAADu;
constexpr uint32_t M2 = 0xD35A2D97u;
constexpr uint32_t GOLDEN = 0x9E3779B9u;
constexpr uint32_t ELEM_ADD = 0x632BE5ABu;
constexpr uint32_t STREAM_TOKEN = 0;
constexpr uint32_t STREAM_CONFIDENCE = 1;

UNIF2ACE_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= M1;
  x ^= x >> 15;
  x *= M2;
  x ^= x >> 15;
  return x;
}

// The part of row_key that depends only on (seed, stream, word): a per-call constant.
UNIF2ACE_HD uint32_t seed_stream_key(uint32_t seed_lo, uint32_t seed_hi, uint32_t stream, uint32_t word) {
  const uint32_t h = mix32(seed_hi ^ (GOLDEN * (2u * stream + word + 1u)));
  return mix32(h ^ seed_lo);
}

// row_key from the seed/stream key, the low 32 bits of the sample id and the position word.
UNIF2ACE_HD uint32_t row_key(uint32_t stream_key, uint32_t sample_lo, uint32_t position) {
  return mix32(mix32(stream_key ^ sample_lo) ^ position);
}

UNIF2ACE_HD uint32_t element(uint32_t row_key, uint32_t token) { return mix32(mix32(row_key ^ token) + ELEM_ADD); }

// A key of each of the two words of a draw: word 0 makes the high, word 1 the low 32 bits.
struct KeyPair {
  uint32_t hi, lo;
};

// seed_stream_key of both words of `stream`.
UNIF2ACE_HD KeyPair stream_keys(uint32_t seed_lo, uint32_t seed_hi, uint32_t stream) {
  return {seed_stream_key(seed_lo, seed_hi, stream, 0u), seed_stream_key(seed_lo, seed_hi, stream, 1u)};
}

// row_key of both words.
UNIF2ACE_HD KeyPair row_keys(KeyPair stream, uint32_t sample_lo, uint32_t position) {
  return {row_key(stream.hi, sample_lo, position), row_key(stream.lo, sample_lo, position)};
}

// Exponential(1) from the 64 bits (hi, lo), float64, both tails at full precision:
//   hi <  2^31: u = w      = (hi + (lo + 0.5) 2^-32) 2^-32,  E = -log1p(-u)
//   hi >= 2^31: u = 1 - w  = (~hi + (~lo + 0.5) 2^-32) 2^-32, E = -log(u)
// ((l + 0.5) * 2^-32 + h) * 2^-32 is the reference's operation order; only the addition rounds
// (so an FMA contraction, as nvcc does by default, gives the same value: the product is exact).
UNIF2ACE_HD double exponential_from_words(uint32_t hi, uint32_t lo) {
  const double s = 2.3283064365386963e-10;  // 2^-32
  const bool low_half = hi < 0x80000000u;
  const double h = static_cast<double>(low_half ? hi : ~hi);
  const double l = static_cast<double>(low_half ? lo : ~lo);
  const double u = ((l + 0.5) * s + h) * s;
  return low_half ? -::log1p(-u) : -::log(u);
}

// Gumbel(0, 1) = -log(E), in float64, cast to fp32 (round to nearest).
UNIF2ACE_HD float gumbel_from_words(uint32_t hi, uint32_t lo) {
  return static_cast<float>(-::log(exponential_from_words(hi, lo)));
}

// The fp32 Gumbel of (row, token), given the row's keys.
UNIF2ACE_HD float gumbel_at(KeyPair row, uint32_t token) {
  return gumbel_from_words(element(row.hi, token), element(row.lo, token));
}

// ------------------------------------------------------------------------- fp32 upper bound
//
// Gumbel-max needs the exact fp32 score x_v + g_v only for codes that can still beat the running
// best. g is decreasing in the uniform w, and w >= hi 2^-32 (lower half) / 1 - w <= (~hi + 1) 2^-32
// (upper half), so evaluating the Gumbel at that end of hi's interval bounds g from above whatever
// lo is. It is evaluated in fp32 with a polynomial log: against the float64 value at the interval
// end its error is within +-2.5e-6 (measured over 5e7 random and 5e6 edge words: near 0, 2^26,
// 2^31, 2^32), by analysis below ~2e-5 (the rounding of 1 - u, u >= 2^-6, with E >= 0.0157), so
// GUMBEL_BOUND_MARGIN = 1e-3 on top keeps it a strict upper bound of the fp32 Gumbel with a wide
// safety factor (tests/test_rng.py checks it on random and extreme words). hi == 0
// (w < 2^-32, g up to 45.05) gives 3e38: always evaluated exactly. Branch-free, so loops over it
// vectorise.

constexpr float GUMBEL_BOUND_MARGIN = 1e-3f;

UNIF2ACE_HD int32_t f32_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_int(x);
#else
  int32_t i;
  std::memcpy(&i, &x, sizeof(i));
  return i;
#endif
}

UNIF2ACE_HD float bits_f32(int32_t i) {
#ifdef __CUDA_ARCH__
  return __int_as_float(i);
#else
  float x;
  std::memcpy(&x, &i, sizeof(x));
  return x;
#endif
}

// log(x) for normal x > 0: x = 2^e m with m in [sqrt(1/2), sqrt(2)) split off with integer ops
// only, log m = 2 atanh(f), f = (m-1)/(m+1), |f| < 0.172 (odd series to f^11: |err| < 1e-9).
// Every operation is unconditional (no float compares or conditional float arithmetic, which
// GCC will not if-convert under -ftrapping-math), so loops over it vectorise.
UNIF2ACE_HD float log_pos_f32(float x) {
  const int32_t ix = f32_bits(x);
  const int32_t e = (ix - 0x3f3504f3) >> 23;  // arithmetic shift: floor
  const int32_t mb = ix - static_cast<int32_t>(static_cast<uint32_t>(e) << 23);
  const float m = bits_f32(mb);
  const float f = (m - 1.0f) / (m + 1.0f);
  const float f2 = f * f;
  float p = 1.0f / 11.0f;
  p = p * f2 + 1.0f / 9.0f;
  p = p * f2 + 1.0f / 7.0f;
  p = p * f2 + 1.0f / 5.0f;
  p = p * f2 + 1.0f / 3.0f;
  p = p * f2 + 1.0f;
  return static_cast<float>(e) * 0.693147180559945f + 2.0f * f * p;
}

// c ? a : b on the bit patterns (both sides already computed: a plain select that vectorises).
UNIF2ACE_HD float select_f32(bool c, float a, float b) {
  const int32_t m = -static_cast<int32_t>(c);
  return bits_f32((f32_bits(a) & m) | (f32_bits(b) & ~m));
}

UNIF2ACE_HD float gumbel_upper_f32(uint32_t hi) {
  const bool low_half = hi < 0x80000000u;
  const bool zero = hi == 0u;
  const bool tiny = hi < (1u << 26);                            // u < 2^-6
  const float s = 2.3283064365386963e-10f;                      // 2^-32
  const int32_t h = static_cast<int32_t>(low_half ? hi : ~hi);  // < 2^31
  const float hf = static_cast<float>(h);
  // lower half: E = -log1p(-u), u = hi 2^-32 in [2^-32, 1/2); a series below 2^-6, else -log(1 - u)
  const float u = hf * s;
  const float series = u * (1.0f + u * (0.5f + u * (1.0f / 3.0f + u * (0.25f + u * 0.2f))));
  // upper half: E = -log(w'), w' = (~hi + 1) 2^-32 in (0, 1/2]; one log serves both halves
  const float w = select_f32(low_half, 1.0f - u, (hf + 1.0f) * s);
  const float e_any = select_f32(low_half & tiny, series, -log_pos_f32(w));
  const float e = select_f32(zero, 1.0f, e_any);  // hi == 0: u = 0 has no logarithm; replaced below
  return select_f32(zero, 3e38f, GUMBEL_BOUND_MARGIN - log_pos_f32(e));
}

}  // namespace rng
}  // namespace unif2ace
