// The counter-based RNG and the exactly defined fp32 math of the sampling ops, bit for bit as
// defined in unif2ace/kernels/reference/rng.py (that docstring is the contract; every uint32 +, *
// wraps mod 2^32). Torch-free and usable from host C++ and CUDA device code alike (UNIF2ACE_HD).
//
//   mix32, call_key, row_key, element          the uint32 word generator
//   KeyPair, call_keys, row_keys, draw_at      the keys of both words of a draw (hi, lo); a draw
//   fmul, fadd, fsub, fdiv                     one IEEE fp32 operation each, never contracted
//   atanh2_f32, log_f32                        the defined fp32 functions
//   gumbel_from_words, gumbel_at               fp32 Gumbel(0, 1) from the 64 bits (hi, lo)
//   sum_bits, exp_fixed, lse_rel_from_sum      the exact fixed-point softmax (log-sum-exp)
//   mulhi_u64                                  the high word of a 64 x 64-bit product (the draw)
//
// Host code that includes this header must compile it without floating-point contraction (GCC
// contracts a * b + c into an FMA in C++ whenever the target has one: csrc/cpu/sampling.cpp turns it
// off with a pragma before its includes); device code uses the __f*_rn intrinsics, which nvcc never
// contracts.
#pragma once

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

// The part of row_key fixed per call: (seed, step, stream, word).
UNIF2ACE_HD uint32_t call_key(uint32_t seed_lo, uint32_t seed_hi, uint32_t step_lo, uint32_t step_hi, uint32_t stream,
                              uint32_t word) {
  uint32_t h = mix32(seed_hi ^ (GOLDEN * (2u * stream + word + 1u)));
  h = mix32(h ^ seed_lo);
  h = mix32(h ^ step_lo);
  return mix32(h ^ step_hi);
}

// row_key from the call key, the low 32 bits of the sample id and the position word.
UNIF2ACE_HD uint32_t row_key(uint32_t key, uint32_t sample_lo, uint32_t position) {
  return mix32(mix32(key ^ sample_lo) ^ position);
}

UNIF2ACE_HD uint32_t element(uint32_t row_key, uint32_t token) { return mix32(mix32(row_key ^ token) + ELEM_ADD); }

// A key of each of the two words of a draw: word 0 makes the high, word 1 the low 32 bits.
struct KeyPair {
  uint32_t hi, lo;
};

// call_key of both words of `stream`.
UNIF2ACE_HD KeyPair call_keys(uint32_t seed_lo, uint32_t seed_hi, uint32_t step_lo, uint32_t step_hi, uint32_t stream) {
  return {call_key(seed_lo, seed_hi, step_lo, step_hi, stream, 0u),
          call_key(seed_lo, seed_hi, step_lo, step_hi, stream, 1u)};
}

// row_key of both words.
UNIF2ACE_HD KeyPair row_keys(KeyPair key, uint32_t sample_lo, uint32_t position) {
  return {row_key(key.hi, sample_lo, position), row_key(key.lo, sample_lo, position)};
}

// The 64 random bits hi * 2^32 + lo of (row, token).
UNIF2ACE_HD uint64_t draw_at(KeyPair row, uint32_t token) {
  return (static_cast<uint64_t>(element(row.hi, token)) << 32) | element(row.lo, token);
}

// floor(a * b / 2^64).
UNIF2ACE_HD uint64_t mulhi_u64(uint64_t a, uint64_t b) {
#ifdef __CUDA_ARCH__
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// ------------------------------------------------------------------------- IEEE fp32 pieces

#ifdef __CUDA_ARCH__
UNIF2ACE_HD float fmul(float a, float b) { return __fmul_rn(a, b); }
UNIF2ACE_HD float fadd(float a, float b) { return __fadd_rn(a, b); }
UNIF2ACE_HD float fsub(float a, float b) { return __fsub_rn(a, b); }
UNIF2ACE_HD float fdiv(float a, float b) { return __fdiv_rn(a, b); }
UNIF2ACE_HD int32_t f32_bits(float x) { return __float_as_int(x); }
UNIF2ACE_HD float bits_f32(int32_t i) { return __int_as_float(i); }
#else
UNIF2ACE_HD float fmul(float a, float b) { return a * b; }
UNIF2ACE_HD float fadd(float a, float b) { return a + b; }
UNIF2ACE_HD float fsub(float a, float b) { return a - b; }
UNIF2ACE_HD float fdiv(float a, float b) { return a / b; }
template <typename To, typename From>
UNIF2ACE_HD To bit_cast_(From x) {
  To y;
  std::memcpy(&y, &x, sizeof(y));
  return y;
}
UNIF2ACE_HD int32_t f32_bits(float x) { return bit_cast_<int32_t>(x); }
UNIF2ACE_HD float bits_f32(int32_t i) { return bit_cast_<float>(i); }
#endif

// c ? a : b on the bit patterns (both sides already computed: a plain select that vectorises).
UNIF2ACE_HD float select_f32(bool c, float a, float b) {
  const int32_t m = -static_cast<int32_t>(c);
  return bits_f32((f32_bits(a) & m) | (f32_bits(b) & ~m));
}

constexpr float LN2_HI = 0.693145751953125f;
constexpr float LN2_LO = 1.428606765330187045e-06f;
constexpr float LOG2E = 1.44269504088896341f;
constexpr float ROUND_MAGIC = 12582912.0f;  // 1.5 * 2^23
constexpr float EXP_MIN = -87.0f;
// exp(r) ~ 1 + r (C1 + r (C2 + r (C3 + r (C4 + r C5)))) on |r| <= ln2 / 2 (minimax, fp32 values)
constexpr float EXP_C1 = 0.9999997019767761f;
constexpr float EXP_C2 = 0.4999915063381195f;
constexpr float EXP_C3 = 0.1666763573884964f;
constexpr float EXP_C4 = 0.04189793020486832f;
constexpr float EXP_C5 = 0.008290314115583897f;

// 2 atanh(f), |f| <= 1/3: (f + f) * P(f^2), P the series to f^12 / 13.
UNIF2ACE_HD float atanh2_f32(float f) {
  const float t = fmul(f, f);
  float p = 1.0f / 13.0f;
  p = fadd(fmul(p, t), 1.0f / 11.0f);
  p = fadd(fmul(p, t), 1.0f / 9.0f);
  p = fadd(fmul(p, t), 1.0f / 7.0f);
  p = fadd(fmul(p, t), 1.0f / 5.0f);
  p = fadd(fmul(p, t), 1.0f / 3.0f);
  p = fadd(fmul(p, t), 1.0f);
  return fmul(fadd(f, f), p);
}

// log(x) for a positive normal x: x = 2^e m with m in [sqrt(1/2), sqrt(2)) split off with integer
// ops, log m = 2 atanh((m - 1) / (m + 1)). Branch-free (vectorises).
UNIF2ACE_HD float log_f32(float x) {
  const int32_t ix = f32_bits(x);
  const int32_t e = (ix - 0x3F3504F3) >> 23;  // arithmetic shift: floor
  const float m = bits_f32(ix - e * (1 << 23));
  const float f = fdiv(fsub(m, 1.0f), fadd(m, 1.0f));
  const float ef = static_cast<float>(e);
  return fadd(fmul(ef, LN2_HI), fadd(fmul(ef, LN2_LO), atanh2_f32(f)));
}

// Gumbel(0, 1) from the 64 bits (hi, lo): u = w (lower half) or 1 - w (upper half, complemented
// words), E = atanh2(u / (2 - u)) = -log1p(-u) or -log(u), g = -log(E). Both halves are computed
// (branch-free); the int32 casts are exact (h < 2^31).
UNIF2ACE_HD float gumbel_from_words(uint32_t hi, uint32_t lo) {
  const bool low_half = hi < 0x80000000u;
  const uint32_t h = low_half ? hi : ~hi;
  const uint32_t l = low_half ? lo : ~lo;
  const float s = 2.3283064365386963e-10f;  // 2^-32
  const float lf = static_cast<float>(static_cast<int64_t>(l));
  const float u = fmul(fadd(static_cast<float>(static_cast<int32_t>(h)), fmul(fadd(lf, 0.5f), s)), s);
  const float e_low = atanh2_f32(fdiv(u, fsub(2.0f, u)));
  const float e_high = -log_f32(u);
  return -log_f32(select_f32(low_half, e_low, e_high));
}

// The fp32 Gumbel of (row, token), given the row's keys.
UNIF2ACE_HD float gumbel_at(KeyPair row, uint32_t token) {
  return gumbel_from_words(element(row.hi, token), element(row.lo, token));
}

// ------------------------------------------------------------------------- exact softmax
//
// q_v = trunc(exp(x_v - m) 2^K) (exp_fixed), S = sum q_v (int64, exact and order-free), lse_rel =
// log_f32(f32(S) 2^-K), log p_v = (x_v - m) - lse_rel; K = min(40, 62 - bit_length(V)). A code is
// drawn as the first v with q_0 + ... + q_v > mulhi_u64(r, S), r the row's 64 random bits.

UNIF2ACE_HD int sum_bits(int64_t V) {
  int bl = 0;
  for (uint64_t v = static_cast<uint64_t>(V); v != 0; v >>= 1) ++bl;
  return 62 - bl < 40 ? 62 - bl : 40;
}

// 2^k as a float, -126 <= k <= 127 (exact).
UNIF2ACE_HD float pow2_f32(int k) { return bits_f32((k + 127) * (1 << 23)); }

// trunc(exp(d) 2^K) for d <= 0 (or -inf; d < -87 is taken as -87), kbias = 127 + K: Cody-Waite
// reduction d = k ln2 + r with k from the round-to-nearest magic number, a degree-5 minimax
// polynomial p(r) (relative error 1.7e-7 on |r| <= ln2 / 2), then p 2^(k+K) (exact: the integer
// k + K added to p's exponent field; p 2^(k+K) >= 2^-87 stays normal) and the truncation to an
// integer. Branch-free.
UNIF2ACE_HD int64_t exp_fixed(float d, int32_t kbias) {
  d = d > EXP_MIN ? d : EXP_MIN;
  const float t = fadd(fmul(d, LOG2E), ROUND_MAGIC);
  const float k = fsub(t, ROUND_MAGIC);
  const float r = fsub(fsub(d, fmul(k, LN2_HI)), fmul(k, LN2_LO));
  float p = EXP_C5;
  p = fadd(fmul(p, r), EXP_C4);
  p = fadd(fmul(p, r), EXP_C3);
  p = fadd(fmul(p, r), EXP_C2);
  p = fadd(fmul(p, r), EXP_C1);
  p = fadd(fmul(p, r), 1.0f);
  // t's low mantissa bits hold k (t = 1.5 2^23 + k): shifted into the exponent field they add k
  const int32_t shift = static_cast<int32_t>(static_cast<uint32_t>(f32_bits(t)) << 23) + (kbias - 127) * (1 << 23);
  return static_cast<int64_t>(bits_f32(f32_bits(p) + shift));
}

// lse_rel from the fixed-point sum S (>= 2^K) and inv_scale = 2^-K.
UNIF2ACE_HD float lse_rel_from_sum(int64_t S, float inv_scale) {
  return log_f32(fmul(static_cast<float>(S), inv_scale));
}

}  // namespace rng
}  // namespace unif2ace
