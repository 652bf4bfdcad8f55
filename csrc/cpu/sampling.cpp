// Masked token sampling (one MaskGIT / Show-o step) and autoregressive sampling, C++ CPU kernels.
// Semantics: unif2ace/kernels/reference/sampling.py (the oracle); RNG and fp32 math:
// csrc/common/rng.h (bit for bit the reference's definitions).
//
//   masked_sample_step(cond [B, L, V], uncond [B, L, V]?, tokens [B, L] int64, is_masked [B, L] bool,
//                      sample_ids [B] int64, seed_lo, seed_hi, step_lo, step_hi, guidance_scale,
//                      temperature, tau, top_k (0: none), n_cap, mask_token_id)
//       -> (tokens int64, is_masked bool, sampled int64, confidence fp32), all [B, L]
//       uncond given = guided; tau = fp64 confidence-noise scale (0: none); n_cap = 0 at the last
//       step, else max(n_raw, 1): a row re-masks n = max(0, min(n_cap, masked_count - 1)).
//   ar_sample(logits [B, V], sample_ids [B] int64, position [B] int64, seed_lo, seed_hi,
//             temperature, top_k (0: none), top_p (>= 1: none), logprobs)
//       -> (tokens [B] int64, logprobs [B] fp32; NaN when logprobs is false)
//
// Work split: masked step, phase 1 at::parallel_for over the B*L positions (only input-masked
// ones do work), phase 2 over the B rows (selection of the n lowest confidences with nth_element
// on the row's masked positions; ties -> lowest position). AR: parallel over rows.
//
// Per position the logits are read from memory once (cond and uncond together): the combined,
// sanitised fp32 row goes to a thread-local buffer of V floats (cache resident) with its max, and
// the later passes -- top-k threshold (chunk maxima, then a selection among the few chunks that can
// hold the k largest), the fixed-point sum of exponentials, the draw -- run over that buffer. An AR
// row of fp32 logits with no NaN or infinity needs no sanitising: its passes read it in place (the
// next row is prefetched during the sum). AR top-k / top-p work on the list of surviving codes;
// top-p without top-k finds its nucleus by mass passes over the row and sorts only the few codes
// near the boundary (top_p_select), falling back to sorting every finite code only when a
// probability below 2^-29 could sway the decision; its kept codes (often most of the row) are then
// drawn as the codes above a threshold, by a masked sum and draw over the row.
//
// Exactness. Every value the reference rounds is rounded the same way here, so sampled codes,
// confidences and log-probabilities equal the reference's bit for bit: the guidance combine is two
// fp32 products and a difference, the temperature an IEEE division clamped at FLT_MAX, the
// exponentials, the log-sum-exp and the confidence noise the definitions of rng.h (no libm), the
// draw integer arithmetic -- and no FMA contraction anywhere (the pragma below). Only the top-p
// keep/drop decision uses its own fp32 softmax: it can differ from the reference's when the mass
// above a code is within ~1e-6 (relative) of top_p.
//
// Sampling is an inverse transform on the exact fixed-point softmax (rng.h): per row one vectorised
// pass sums the integer exponentials (recording 64-code chunk sums), which also gives the log-sum-exp
// of the confidence / logprob, and one 64-bit random draw picks the code -- found through the chunk
// sums and one chunk recomputed. At temperature 1 the same pass serves both; otherwise the tempered
// scores get their own pass. No random number per code: the cost is one exponential per code.
// Not reproduced: a temperature in (0, 7e-46), which rounds to fp32 0 -- the reference then scores
// x = 0 as 0/0 = NaN and torch.argmax picks the NaN; here NaN scores never win.

// The guidance combine (two products and a difference), x / T + g, log p + tau * g' and rng.h's fp32
// functions must round like the reference's separate fp32 operations: no FMA contraction in this
// file, whatever -march or target the build uses (GCC contracts a*b - c*d even in ISO mode once FMA
// is available).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
// IEEE semantics throughout: the NaN / infinity contract and clean_max's x - x test need them.
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "csrc/cpu/sampling.cpp must be compiled without -ffast-math / -ffinite-math-only"
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/rng.h"
#include "cpu/ops.h"
#include "cpu/vec_math.h"

namespace unif2ace::cpu {
namespace {

using namespace unif2ace::rng;

#ifndef U2A_INLINE
#define U2A_INLINE inline __attribute__((always_inline))
#endif

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kFltMax = std::numeric_limits<float>::max();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// top-p's own softmax (not part of the bit-exact contract, see the header)
U2A_INLINE float exp_or_zero(float d) {
  const float e = fast_exp(d);  // computed unconditionally: a select, not a branch, so it vectorises
  return select_f32(d > -87.0f, e, 0.0f);
}

// ------------------------------------------------------------------------------ row passes

// buf = sanitise(cond) or sanitise(a * cond - s * uncond) (NaN -> -inf, +inf -> FLT_MAX); returns
// the row max (-inf for a row with no finite value).
template <typename T, bool GUIDED>
U2A_INLINE float load_row(const T* __restrict__ c, const T* __restrict__ u, float a, float s, float* __restrict__ buf,
                          int64_t V) {
  float mx = -kInf;
#pragma omp simd reduction(max : mx)
  for (int64_t v = 0; v < V; ++v) {
    float x;
    if (GUIDED) {
      const float p1 = a * to_f32(c[v]);
      const float p2 = s * to_f32(u[v]);
      x = p1 - p2;
    } else {
      x = to_f32(c[v]);
    }
    x = x != x ? -kInf : x;
    x = x == kInf ? kFltMax : x;
    buf[v] = x;
    mx = mx > x ? mx : x;
  }
  return mx;
}

// The max of an fp32 row read in place, when sanitising would change nothing: true with *mx set
// when no value is NaN or +-inf (x - x is then 0 everywhere; a NaN or an infinity makes the sum
// NaN), false otherwise (the caller then sanitises into a buffer: load_row).
U2A_INLINE bool clean_max(const float* __restrict__ x, int64_t V, float* mx_out) {
  float mx = -kInf, bad = 0.0f;
#pragma omp simd reduction(max : mx) reduction(+ : bad)
  for (int64_t v = 0; v < V; ++v) {
    mx = mx > x[v] ? mx : x[v];
    bad += x[v] - x[v];
  }
  *mx_out = mx;
  return bad == 0.0f;
}

// min(x / t, FLT_MAX), IEEE division (-inf stays -inf); x itself when !DIV (t == 1).
template <bool DIV>
U2A_INLINE float score_of(float x, float t) {
  if (!DIV) return x;
  const float q = fdiv(x, t);
  return select_f32(q > kFltMax, kFltMax, q);  // a bit select: vectorises
}

// The fixed-point softmax of a V-entry row (rng.h): kbias = 127 + K for exp_fixed, inv = 2^-K.
struct FixedScale {
  int32_t kbias;
  float inv;
  explicit FixedScale(int64_t V) {
    const int K = sum_bits(V);
    kbias = 127 + K;
    inv = pow2_f32(-K);
  }
};

constexpr int64_t kChunk = 64;  // the fixed-point sums are recorded per chunk of codes

// The next row's logits (up to two arrays), fetched into the cache while this row computes: one
// chunk's worth of each (bpc bytes) per chunk of the sum, so the memory traffic of the next row
// overlaps the arithmetic of this one.
struct Prefetch {
  const char* a = nullptr;
  const char* b = nullptr;
  int64_t bpc = 0;
  U2A_INLINE void chunk(int64_t c) const {
    for (int64_t o = 0; o < bpc; o += 64) {
      if (a != nullptr) __builtin_prefetch(a + c * bpc + o);
      if (b != nullptr) __builtin_prefetch(b + c * bpc + o);
    }
  }
};

// q of a code with logit x: exp_fixed(score - m), score z = min(x / t, FLT_MAX) (DIV) or x; with
// ABOVE, 0 when z < thr -- the fixed-point softmax restricted to the codes with z >= thr (every
// other code has q = 0, as in the reference, which sets them to -inf).
template <bool DIV, bool ABOVE>
U2A_INLINE int64_t q_fixed(float x, float t, float m, float thr, int32_t kb) {
  const float z = score_of<DIV>(x, t);
  const int64_t q = exp_fixed(fsub(z, m), kb);
  if constexpr (ABOVE) {
    return z >= thr ? q : 0;
  } else {
    return q;
  }
}

// S = sum_v q_v (int64, exact, order-free) with m the max score; the sum of each 64-code chunk
// into sums[] when given (the draw's index). Without sums[] the whole row is one vector reduction
// (a horizontal reduction per chunk costs about a quarter of the loop); with it, full chunks run
// a fixed-count loop and only the last one a remainder.
template <bool DIV, bool ABOVE = false>
U2A_INLINE int64_t sum_fixed(const float* __restrict__ x, int64_t V, float t, float m, const FixedScale& fs,
                             int64_t* __restrict__ sums, const Prefetch& pf = Prefetch(), float thr = -kInf) {
  const int32_t kb = fs.kbias;
  if (sums == nullptr) {
    int64_t total = 0;
    for (int64_t c = 0, v0 = 0; v0 < V; ++c, v0 += 16 * kChunk) {
      // the next row, 16 chunks at a time (the last block may prefetch past its end: harmless)
      for (int64_t i = 0; i < 16; ++i) pf.chunk(16 * c + i);
      const int64_t n = std::min(16 * kChunk, V - v0);
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < n; ++j) total += q_fixed<DIV, ABOVE>(x[v0 + j], t, m, thr, kb);
    }
    return total;
  }
  int64_t total = 0;
  const int64_t full = V / kChunk;
  for (int64_t c = 0; c < full; ++c) {
    pf.chunk(c);
    const float* xc = x + c * kChunk;
    int64_t sc = 0;
#pragma omp simd reduction(+ : sc)
    for (int64_t j = 0; j < kChunk; ++j) sc += q_fixed<DIV, ABOVE>(xc[j], t, m, thr, kb);
    sums[c] = sc;
    total += sc;
  }
  if (full * kChunk < V) {
    const float* xc = x + full * kChunk;
    const int64_t n = V - full * kChunk;
    int64_t sc = 0;
#pragma omp simd reduction(+ : sc)
    for (int64_t j = 0; j < n; ++j) sc += q_fixed<DIV, ABOVE>(xc[j], t, m, thr, kb);
    sums[full] = sc;
    total += sc;
  }
  return total;
}

// The drawn code: the first v with q_0 + ... + q_v > U (U < S, the sum of sum_fixed with the same
// template arguments, whose chunk sums locate the chunk; the q of that chunk are recomputed). A
// draw restricted to the codes >= thr picks the code a draw over the list of those codes picks.
template <bool DIV, bool ABOVE = false>
U2A_INLINE int64_t draw_fixed(const float* x, int64_t V, float t, float m, const FixedScale& fs, const int64_t* sums,
                              int64_t U, float thr = -kInf) {
  int64_t acc = 0;
  for (int64_t c = 0, v0 = 0; v0 < V; ++c, v0 += kChunk) {
    if (acc + sums[c] <= U) {
      acc += sums[c];
      continue;
    }
    const int64_t n = std::min(kChunk, V - v0);
    for (int64_t j = 0; j < n; ++j) {
      acc += q_fixed<DIV, ABOVE>(x[v0 + j], t, m, thr, fs.kbias);
      if (acc > U) return v0 + j;
    }
  }
  return V - 1;  // not reached: U < S
}

// U = floor(r S / 2^64) of the row's 64 random bits r (stream 0, token 0).
U2A_INLINE int64_t draw_target(KeyPair rk, int64_t S) {
  return static_cast<int64_t>(mulhi_u64(draw_at(rk, 0u), static_cast<uint64_t>(S)));
}

// The code drawn from softmax(z) of a row with max x xmax, z = score_of(x) at temperature t, given
// S1 (the sum_fixed of x at temperature 1, whose chunk sums are in sums): at t == 1 that sum is the
// draw's, otherwise the scores' sum is formed (overwriting sums). Every z = -inf (x / t
// overflowed to -inf): code 0.
U2A_INLINE int64_t draw_row(const float* x, int64_t V, float t, float xmax, const FixedScale& fs, int64_t* sums,
                            int64_t S1, KeyPair rk) {
  if (t == 1.0f) return draw_fixed<false>(x, V, 1.0f, xmax, fs, sums, draw_target(rk, S1));
  const float mz = score_of<true>(xmax, t);
  if (!(mz > -kInf)) return 0;
  const int64_t S = sum_fixed<true>(x, V, t, mz, fs, sums);
  return draw_fixed<true>(x, V, t, mz, fs, sums, draw_target(rk, S));
}

// log p of a code with logit x in a row with max mx and lse_rel lse: (x - mx) - lse.
U2A_INLINE float log_p(float x, float mx, float lse) { return fsub(fsub(x, mx), lse); }

// z = min(x / t, FLT_MAX).
U2A_INLINE void scale_row(const float* __restrict__ x, float* __restrict__ z, int64_t V, float t) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) z[v] = score_of<true>(x[v], t);
}

// argmax with ties -> lowest index, given the row max mx (finite or FLT_MAX): the first v with
// x_v == mx, searched 64 codes at a time (vectorised compare, scalar scan of the hit chunk).
U2A_INLINE int64_t argmax_first(const float* x, int64_t V, float mx) {
  constexpr int64_t CH = 64;
  for (int64_t v0 = 0; v0 < V; v0 += CH) {
    const int64_t n = std::min<int64_t>(CH, V - v0);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = 0; j < n; ++j) hit |= static_cast<int>(x[v0 + j] == mx);
    if (!hit) continue;
    for (int64_t j = 0; j < n; ++j) {
      if (x[v0 + j] == mx) return v0 + j;
    }
  }
  return 0;
}

// The k-th largest value of x (counting duplicates), 0 < k < V; tmp holds V floats. Small k (at
// most a quarter of the 64-wide chunks): the chunk maxima first (vectorised); a value t that at
// least k of them reach is a lower bound of the answer (k chunks hold a value >= t), so only the
// chunks whose max is >= t can hold the k largest values: their values >= t are gathered (with
// their codes into gi, when given) and nth_element picks the k-th. Otherwise nth_element on a copy of the row. With
// `listed`: whether the gathered codes are in gi[0, *listed_n) (ascending; exactly the codes with a
// value >= t, a superset of those holding the k largest values), and t in *listed_t.
U2A_INLINE float kth_on_copy(const float* x, float* tmp, int64_t V, int64_t k) {
  std::memcpy(tmp, x, sizeof(float) * V);
  std::nth_element(tmp, tmp + (k - 1), tmp + V, std::greater<float>());
  return tmp[k - 1];
}

U2A_INLINE float kth_largest(const float* x, float* tmp, int64_t V, int64_t k, int64_t* gi = nullptr,
                             int64_t* listed_n = nullptr, float* listed_t = nullptr) {
  constexpr int64_t CH = 64;
  const int64_t nch = (V + CH - 1) / CH;
  if (listed_n != nullptr) *listed_n = -1;
  if (4 * k > nch) return kth_on_copy(x, tmp, V, k);
  float* cmax = tmp;       // nch chunk maxima
  float* sel = tmp + nch;  // a copy of them for the selection
  for (int64_t c = 0; c < nch; ++c) {
    const int64_t v0 = c * CH, n = std::min<int64_t>(CH, V - v0);
    float m = -kInf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = m > x[v0 + j] ? m : x[v0 + j];
    cmax[c] = m;
  }
  // t: a value that at least k chunk maxima reach, so at least k values are >= t and t <= the k-th
  // largest value. First guess (no selection over all nch maxima): the r-th largest of every 8th
  // chunk maximum, r = k / 8 + 4 (on average 8 r chunks reach it); when fewer than k reach it, the
  // k-th largest chunk maximum itself.
  const int64_t ns = (nch + 7) / 8, r = k / 8 + 4;
  float t = -kInf;
  int64_t reach = 0;
  if (r < ns) {
    for (int64_t i = 0; i < ns; ++i) sel[i] = cmax[8 * i];
    std::nth_element(sel, sel + (r - 1), sel + ns, std::greater<float>());
    t = sel[r - 1];
#pragma omp simd reduction(+ : reach)
    for (int64_t c = 0; c < nch; ++c) reach += cmax[c] >= t;
  }
  if (reach < k) {
    std::memcpy(sel, cmax, sizeof(float) * nch);
    std::nth_element(sel, sel + (k - 1), sel + nch, std::greater<float>());
    t = sel[k - 1];
    reach = 0;
#pragma omp simd reduction(+ : reach)
    for (int64_t c = 0; c < nch; ++c) reach += cmax[c] >= t;
  }
  if (2 * reach * CH > V - nch) return kth_on_copy(x, tmp, V, k);  // many ties at t: no room, no gain
  float* got = tmp + nch;                                          // the values >= t of the chunks that reach t
  int64_t m = 0;
  for (int64_t c = 0; c < nch; ++c) {
    if (!(cmax[c] >= t)) continue;
    const int64_t v0 = c * CH, n = std::min<int64_t>(CH, V - v0);
    uint64_t bits = 0;  // bit j: x[v0 + j] >= t (a vectorised compare), then one step per set bit
#pragma omp simd reduction(| : bits)
    for (int64_t j = 0; j < n; ++j) bits |= static_cast<uint64_t>(x[v0 + j] >= t) << j;
    for (; bits != 0; bits &= bits - 1) {
      const int64_t v = v0 + __builtin_ctzll(bits);
      got[m] = x[v];
      if (gi != nullptr) gi[m] = v;
      ++m;
    }
  }
  // fewer than k: only if the row changed under us (an fp32 row is read in place, pass by pass)
  if (m < k) return kth_on_copy(x, tmp, V, k);
  if (listed_n != nullptr) *listed_n = m;
  if (listed_t != nullptr) *listed_t = t;
  float* part = got + m;  // nth_element on a copy: got stays in code order
  std::memcpy(part, got, sizeof(float) * m);
  std::nth_element(part, part + (k - 1), part + m, std::greater<float>());
  return part[k - 1];
}

// Keep x_v iff x_v >= the k-th largest value of the row (ties kept), else -inf; 0 < k < V.
void top_k_filter(float* x, float* tmp, int64_t V, int64_t k) {
  const float kth = kth_largest(x, tmp, V, k);
  for (int64_t v = 0; v < V; ++v) x[v] = x[v] >= kth ? x[v] : -kInf;
}

// ------------------------------------------------------------------------------ masked step

struct StepArgs {
  const void* cond;
  const void* unc;
  int64_t cs0, cs1, us0, us1, L, V;
  float a, s, t;  // guidance (1 + s), s; temperature (> 0 samples, else greedy)
  bool sample;
  int64_t top_k;  // 0: none
  bool noise;
  float tau;
  KeyPair k_token, k_conf;  // call keys: stream 0 (token), stream 1 (confidence)
  const int64_t* tokens;
  const bool* masked;
  const int64_t* ids;
  int64_t* sampled;
  float* conf;
};

// Scratch of one thread: the row, the top-k copy, the chunk sums.
struct RowScratch {
  std::vector<float> buf, tmp;
  std::vector<int64_t> sums;
  RowScratch(int64_t V, bool need_tmp) : buf(V), tmp(need_tmp ? V : 0), sums((V + kChunk - 1) / kChunk) {}
};

template <typename T, bool GUIDED>
U2A_INLINE void step_positions_impl(const StepArgs& p, int64_t begin, int64_t end, RowScratch& rs) {
  const T* cond = static_cast<const T*>(p.cond);
  const T* unc = static_cast<const T*>(p.unc);
  const int64_t V = p.V;
  const FixedScale fs(V);
  float* buf = rs.buf.data();
  int64_t* sums = rs.sums.data();
  for (int64_t q = begin; q < end; ++q) {
    if (!p.masked[q]) {
      p.sampled[q] = p.tokens[q];
      p.conf[q] = kInf;
      continue;
    }
    const int64_t b = q / p.L, i = q - b * p.L;
    const T* c = cond + b * p.cs0 + i * p.cs1;
    const T* u = GUIDED ? unc + b * p.us0 + i * p.us1 : nullptr;
    const float mx = load_row<T, GUIDED>(c, u, p.a, p.s, buf, V);
    const uint32_t sid = static_cast<uint32_t>(static_cast<uint64_t>(p.ids[b]));
    const uint32_t pos = static_cast<uint32_t>(i);
    float lp;
    int64_t pick;
    if (!(mx > -kInf)) {  // no finite value: code 0, log p = -inf
      pick = 0;
      lp = -kInf;
    } else {
      if (p.top_k > 0 && p.top_k < V) top_k_filter(buf, rs.tmp.data(), V, p.top_k);  // keeps the max
      Prefetch pf;                                                                   // the next position's rows
      if (q + 1 < end) {
        const int64_t b1 = (q + 1) / p.L, i1 = q + 1 - b1 * p.L;
        pf.a = reinterpret_cast<const char*>(cond + b1 * p.cs0 + i1 * p.cs1);
        pf.b = GUIDED ? reinterpret_cast<const char*>(unc + b1 * p.us0 + i1 * p.us1) : nullptr;
        pf.bpc = kChunk * static_cast<int64_t>(sizeof(T));
      }
      // the chunk sums are the draw's index only at temperature 1 (draw_row forms its own otherwise)
      const int64_t S = sum_fixed<false>(buf, V, 1.0f, mx, fs, p.sample && p.t == 1.0f ? sums : nullptr, pf);
      pick =
          p.sample ? draw_row(buf, V, p.t, mx, fs, sums, S, row_keys(p.k_token, sid, pos)) : argmax_first(buf, V, mx);
      lp = log_p(buf[pick], mx, lse_rel_from_sum(S, fs.inv));
    }
    if (p.noise) lp = fadd(lp, fmul(p.tau, gumbel_at(row_keys(p.k_conf, sid, pos), 0u)));
    p.sampled[q] = pick;
    p.conf[q] = lp;
  }
}

// The row loops compiled once per instruction set, cpu_isa() picking (contraction off in all):
// run_isa<F>(args...) calls the always-inline F::run(args...) inside a function compiled for the
// machine's AVX-512, AVX2 or baseline x86-64.
template <typename F, typename... A>
U2A_TARGET_AVX512 void run_avx512(const A&... a) {
  F::run(a...);
}
template <typename F, typename... A>
U2A_TARGET_AVX2 void run_avx2(const A&... a) {
  F::run(a...);
}
template <typename F, typename... A>
void run_base(const A&... a) {
  F::run(a...);
}
template <typename F, typename... A>
void run_isa(const A&... a) {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      run_avx512<F>(a...);
      break;
    case Isa::kAvx2:
      run_avx2<F>(a...);
      break;
    default:
      run_base<F>(a...);
  }
}

template <typename T, bool GUIDED>
struct StepPositions {
  U2A_INLINE static void run(const StepArgs& p, int64_t begin, int64_t end, RowScratch* rs) {
    step_positions_impl<T, GUIDED>(p, begin, end, *rs);
  }
};

void check_words(const char* op, const char* what, int64_t lo, int64_t hi) {
  TORCH_CHECK(lo >= 0 && lo <= 0xFFFFFFFFll && hi >= 0 && hi <= 0xFFFFFFFFll, op, ": ", what, "_lo and ", what,
              "_hi must be 32-bit words in [0, 2^32), got ", lo, " and ", hi);
}

// The call keys of both streams of (seed, step).
std::pair<KeyPair, KeyPair> stream_call_keys(int64_t seed_lo, int64_t seed_hi, int64_t step_lo, int64_t step_hi) {
  const uint32_t a = static_cast<uint32_t>(seed_lo), b = static_cast<uint32_t>(seed_hi);
  const uint32_t c = static_cast<uint32_t>(step_lo), d = static_cast<uint32_t>(step_hi);
  return {call_keys(a, b, c, d, STREAM_TOKEN), call_keys(a, b, c, d, STREAM_CONFIDENCE)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_sample_step(
    const at::Tensor& cond_in, const std::optional<at::Tensor>& uncond_opt, const at::Tensor& tokens_in,
    const at::Tensor& is_masked_in, const at::Tensor& sample_ids_in, int64_t seed_lo, int64_t seed_hi, int64_t step_lo,
    int64_t step_hi, double guidance_scale, double temperature, double tau, int64_t top_k, int64_t n_cap,
    int64_t mask_token_id) {
  const char* op = "unif2ace_cpu::masked_sample_step";
  TORCH_CHECK(cond_in.device().is_cpu() && cond_in.dim() == 3, op, ": cond must be a 3-D CPU tensor [B, L, V], got ",
              cond_in.sizes(), " on ", cond_in.device());
  const int64_t B = cond_in.size(0), L = cond_in.size(1), V = cond_in.size(2);
  TORCH_CHECK(V >= 1, op, ": the vocabulary dimension must be non-empty");
  const bool guided = uncond_opt.has_value();
  if (guided) {
    TORCH_CHECK(uncond_opt->sizes() == cond_in.sizes() && uncond_opt->scalar_type() == cond_in.scalar_type() &&
                    uncond_opt->device().is_cpu(),
                op, ": uncond must match cond's shape ", cond_in.sizes(), " and dtype ", cond_in.scalar_type(),
                ", got ", uncond_opt->sizes(), " ", uncond_opt->scalar_type());
  }
  TORCH_CHECK(tokens_in.sizes() == at::IntArrayRef({B, L}) && tokens_in.scalar_type() == at::kLong, op,
              ": tokens must be int64 [B, L] = [", B, ", ", L, "], got ", tokens_in.scalar_type(), " ",
              tokens_in.sizes());
  TORCH_CHECK(is_masked_in.sizes() == at::IntArrayRef({B, L}) && is_masked_in.scalar_type() == at::kBool, op,
              ": is_masked must be bool [B, L], got ", is_masked_in.scalar_type(), " ", is_masked_in.sizes());
  TORCH_CHECK(sample_ids_in.dim() == 1 && sample_ids_in.size(0) == B && sample_ids_in.scalar_type() == at::kLong, op,
              ": sample_ids must be int64 [B] with B = ", B, ", got ", sample_ids_in.scalar_type(), " ",
              sample_ids_in.sizes());
  check_words(op, "seed", seed_lo, seed_hi);
  check_words(op, "step", step_lo, step_hi);
  TORCH_CHECK(temperature >= 0.0 && tau >= 0.0 && top_k >= 0 && n_cap >= 0, op,
              ": temperature, tau, top_k and n_cap must be >= 0");

  const at::Tensor cond = cond_in.stride(2) == 1 ? cond_in : cond_in.contiguous();
  at::Tensor unc;
  if (guided) unc = uncond_opt->stride(2) == 1 ? *uncond_opt : uncond_opt->contiguous();
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor is_masked = is_masked_in.contiguous();
  const at::Tensor ids = sample_ids_in.contiguous();

  at::Tensor tok_out = at::empty({B, L}, tokens.options());
  at::Tensor mask_out = at::empty({B, L}, is_masked.options());
  at::Tensor sampled = at::empty({B, L}, tokens.options());
  at::Tensor conf = at::empty({B, L}, cond.options().dtype(at::kFloat));
  if (B * L == 0) return {tok_out, mask_out, sampled, conf};

  StepArgs p;
  p.cond = cond.const_data_ptr();
  p.unc = guided ? unc.const_data_ptr() : nullptr;
  p.cs0 = cond.stride(0);
  p.cs1 = cond.stride(1);
  p.us0 = guided ? unc.stride(0) : 0;
  p.us1 = guided ? unc.stride(1) : 0;
  p.L = L;
  p.V = V;
  p.a = static_cast<float>(1.0 + guidance_scale);
  p.s = static_cast<float>(guidance_scale);
  p.t = static_cast<float>(temperature);
  p.sample = temperature > 0.0;
  p.top_k = top_k;
  p.noise = tau != 0.0;
  p.tau = static_cast<float>(tau);
  std::tie(p.k_token, p.k_conf) = stream_call_keys(seed_lo, seed_hi, step_lo, step_hi);
  p.tokens = tokens.const_data_ptr<int64_t>();
  p.masked = is_masked.const_data_ptr<bool>();
  p.ids = ids.const_data_ptr<int64_t>();
  p.sampled = sampled.data_ptr<int64_t>();
  p.conf = conf.data_ptr<float>();

  // phase 1: every (row, position)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / V);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cond.scalar_type(), "masked_sample_step", [&] {
    at::parallel_for(0, B * L, grain, [&](int64_t b, int64_t e) {
      RowScratch rs(V, top_k > 0 && top_k < V);
      RowScratch* prs = &rs;
      if (guided) {
        run_isa<StepPositions<scalar_t, true>>(p, b, e, prs);
      } else {
        run_isa<StepPositions<scalar_t, false>>(p, b, e, prs);
      }
    });
  });

  // phase 2: per row, re-mask the n lowest-confidence positions (ties -> lowest position)
  const int64_t* tin = p.tokens;
  const bool* min_ = p.masked;
  const int64_t* smp = p.sampled;
  const float* cf = p.conf;
  int64_t* tout = tok_out.data_ptr<int64_t>();
  bool* mout = mask_out.data_ptr<bool>();
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t rb, int64_t re) {
    std::vector<std::pair<float, int64_t>> cand;
    for (int64_t b = rb; b < re; ++b) {
      const int64_t o = b * L;
      cand.clear();
      for (int64_t i = 0; i < L; ++i) {
        mout[o + i] = false;
        tout[o + i] = min_[o + i] ? smp[o + i] : tin[o + i];
        if (min_[o + i]) cand.emplace_back(cf[o + i], i);
      }
      const int64_t cnt = static_cast<int64_t>(cand.size());
      const int64_t n = std::max<int64_t>(0, std::min<int64_t>(n_cap, cnt - 1));
      if (n == 0) continue;
      // pairs compare by (confidence, position): the stable-sort rank of the reference
      std::nth_element(cand.begin(), cand.begin() + (n - 1), cand.end());
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = cand[j].second;
        mout[o + i] = true;
        tout[o + i] = mask_token_id;
      }
    }
  });
  return {tok_out, mask_out, sampled, conf};
}

namespace {

// ------------------------------------------------------------------------------ AR sampling

struct ArScratch {
  std::vector<float> x, z, tmp, p, cp;
  std::vector<int64_t> cand, order, kept, sums, gi;
  std::vector<std::pair<float, float>> zp;
};

// The code drawn from softmax(z) restricted to the codes in ``idx`` (ascending; z_v stored there),
// whose largest z is mz: the fixed-point draw of rng.h over the list (the reference's over the whole
// row, where every other code has q = 0).
U2A_INLINE int64_t draw_list(const float* z, const std::vector<int64_t>& idx, float mz, const FixedScale& fs,
                             KeyPair rk) {
  int64_t S = 0;
  for (const int64_t v : idx) S += exp_fixed(fsub(z[v], mz), fs.kbias);
  const int64_t U = draw_target(rk, S);
  int64_t acc = 0;
  for (const int64_t v : idx) {
    acc += exp_fixed(fsub(z[v], mz), fs.kbias);
    if (acc > U) return v;
  }
  return idx.empty() ? 0 : idx.back();  // not reached: U < S
}

// Top-p over the candidates s.cand (ascending codes; every other code has probability 0 or is
// known to be dropped) of z, into s.kept (ascending). As the reference: p = fp32 softmax of z
// (``sum`` = the row's sum of exp(z - mz)), candidates ordered by (z desc, code asc), running fp64
// sum c_j, excl_j = c_j - p_j, a tie group's mass above = excl at its first member; keep iff < top_p.
U2A_INLINE void top_p_keep(ArScratch& s, const float* z, float mz, float sum, double top_p) {
  float* p = s.p.data();
  for (const int64_t v : s.cand) p[v] = exp_or_zero(z[v] - mz) / sum;
  s.order.assign(s.cand.begin(), s.cand.end());
  std::sort(s.order.begin(), s.order.end(),
            [z](int64_t a, int64_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); });
  double c = 0.0, group_excl = 0.0;
  s.kept.clear();
  for (size_t j = 0; j < s.order.size(); ++j) {
    const int64_t v = s.order[j];
    const double pv = static_cast<double>(p[v]);
    c += pv;
    if (j == 0 || z[v] != z[s.order[j - 1]]) group_excl = c - pv;
    if (group_excl < top_p) s.kept.push_back(v);
  }
  std::sort(s.kept.begin(), s.kept.end());
}

// s.cand = the codes v with zthr <= z_v < zcap, z_v = score_of(x_v) > -inf, ascending, with z_v
// stored at s.z[v] (x may be s.z itself when !DIV): 64 codes at a time, a vectorised test first.
template <bool DIV>
U2A_INLINE void gather_candidates(ArScratch& s, const float* x, int64_t V, float t, float zthr, float zcap = kInf) {
  constexpr int64_t CH = 64;
  float* z = s.z.data();
  s.cand.clear();
  for (int64_t v0 = 0; v0 < V; v0 += CH) {
    const int64_t n = std::min<int64_t>(CH, V - v0);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = 0; j < n; ++j) {
      const float zz = score_of<DIV>(x[v0 + j], t);
      hit |= static_cast<int>((zz >= zthr) & (zz < zcap) & (zz > -kInf));
    }
    if (!hit) continue;
    for (int64_t j = 0; j < n; ++j) {
      const float zz = score_of<DIV>(x[v0 + j], t);
      z[v0 + j] = zz;  // only read back at candidates
      if (zz >= zthr && zz < zcap && zz > -kInf) s.cand.push_back(v0 + j);
    }
  }
}

// g(t) = sum of p_v over the codes with z_v >= t, in fp64, and (when count is given) their number:
// vectorised passes (a bit select in fp32, then the widening; the count in a loop of its own, or
// GCC keeps both scalar).
U2A_INLINE double mass_from(const float* __restrict__ z, const float* __restrict__ p, int64_t V, float t,
                            int64_t* count) {
  double g = 0.0;
#pragma omp simd reduction(+ : g)
  for (int64_t v = 0; v < V; ++v) g += static_cast<double>(select_f32(z[v] >= t, p[v], 0.0f));
  if (count == nullptr) return g;
  int64_t n = 0;
#pragma omp simd reduction(+ : n)
  for (int64_t v = 0; v < V; ++v) n += static_cast<int64_t>(z[v] >= t);
  *count = n;
  return g;
}

// The (z, p) of the codes with lo <= z < hi, in code order, into (oz, op); their number. 64 codes at
// a time: a vectorised compare's bit mask, then one step per code copied. In place (oz == z) works:
// each write lands at or before the code just read.
U2A_INLINE int64_t copy_between(const float* z, const float* p, int64_t n, float lo, float hi, float* oz, float* op) {
  int64_t m = 0;
  for (int64_t v0 = 0; v0 < n; v0 += 64) {
    const int64_t c = std::min<int64_t>(64, n - v0);
    uint64_t bits = 0;
#pragma omp simd reduction(| : bits)
    for (int64_t j = 0; j < c; ++j) bits |= static_cast<uint64_t>((z[v0 + j] >= lo) & (z[v0 + j] < hi)) << j;
    for (; bits != 0; bits &= bits - 1) {
      const int64_t v = v0 + __builtin_ctzll(bits);
      const float zv = z[v], pv = p[v];
      oz[m] = zv;
      op[m] = pv;
      ++m;
    }
  }
  return m;
}

// An fp32 p >= 2^-29 is a multiple of 2^-52, so any sum of such values below 2 is exact in fp64, in
// any order.
constexpr float kExactP = 0x1p-29f;

// Top-p on a whole row z (max mz, ``sum`` = the row's sum of exp(z - mz)) without sorting it: the
// kept codes are those with z >= *zstar; false when it cannot decide exactly (the caller then sorts). With g(w) = the
// mass of the codes with z >= w, g grows as w falls, and top_p_keep keeps exactly the codes with
// z >= z* = the largest value w with g(w) >= top_p, provided its running sums are exact -- true
// when every code with z >= z* has p >= 2^-29 (checked at the end; then every sum below is exact
// too, and equals top_p_keep's sorted fp64 prefix sums). Found by a bracket lo <= z* < hi: row
// passes at thresholds p ~ 16^-j, then the codes in [lo, hi) copied out and the bracket bisected on
// that copy until few remain, which are sorted and walked group by group from g(hi).
U2A_INLINE bool top_p_select(ArScratch& s, const float* z, int64_t V, float mz, float sum, double top_p,
                             float* zstar_out) {
  float* p = s.p.data();  // holds exp_or_zero(z - mz) (top_p_row)
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) p[v] = p[v] / sum;
  float lo = -kInf, hi = kInf;  // g(lo) >= top_p > g(hi) (g(+inf) = 0)
  double g_hi = 0.0;
  const float base = mz + std::log(sum);  // the z of p = 1 (only a guess: any threshold is valid)
  for (int j = 0; j <= 8 && lo == -kInf; ++j) {
    const float t = j == 0 ? mz : base - static_cast<float>(j) * 2.77258872f;  // p ~ 16^-j
    if (!(t < hi)) continue;
    const double g = mass_from(z, p, V, t, nullptr);
    if (g >= top_p) {
      lo = t;
    } else {
      hi = t;
      g_hi = g;
    }
  }
  if (lo == -kInf) return false;  // the mass of p >~ 2^-32 is below top_p
  float* cz = s.tmp.data();       // the codes in [lo, hi): z, p
  float* cp = s.cp.data();
  int64_t m = copy_between(z, p, V, lo, hi, cz, cp);
  // Bisection on the copy. It holds every code in [lo, hi) (and maybe codes of a former, wider
  // bracket); g_top is the mass >= the bracket's top when it was last copied. When fewer than a
  // quarter of the copy remain in the bracket, the copy is compacted to [lo, hi).
  double g_top = g_hi;
  int64_t n_lo = m, n_hi = 0;  // counts in the copy
  for (int it = 0; it < 40 && hi < kInf && n_lo - n_hi > 64; ++it) {
    const float t = 0.5f * lo + 0.5f * hi;
    if (!(t > lo && t < hi)) break;
    int64_t n = 0;
    const double g = g_top + mass_from(cz, cp, m, t, &n);
    if (g >= top_p) {
      lo = t;
      n_lo = n;
    } else {
      hi = t;
      g_hi = g;
      n_hi = n;
    }
    if (4 * (n_lo - n_hi) < m) {
      m = copy_between(cz, cp, m, lo, hi, cz, cp);
      g_top = g_hi;
      n_lo = m;
      n_hi = 0;
    }
  }
  m = copy_between(cz, cp, m, lo, hi, cz, cp);
  std::vector<std::pair<float, float>>& zp = s.zp;  // (z, p) in [lo, hi), z descending
  zp.clear();
  for (int64_t i = 0; i < m; ++i) zp.emplace_back(cz[i], cp[i]);
  std::sort(zp.begin(), zp.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  double g = g_hi;
  float zstar = kInf;
  for (size_t j = 0; j < zp.size() && zstar == kInf;) {
    const float w = zp[j].first;
    for (; j < zp.size() && zp[j].first == w; ++j) g += static_cast<double>(zp[j].second);
    if (g >= top_p) zstar = w;
  }
  if (zstar == kInf) return false;
  float pmin = kInf;  // the least p of a kept code
#pragma omp simd reduction(min : pmin)
  for (int64_t v = 0; v < V; ++v) {
    const float q = select_f32(z[v] >= zstar, p[v], kInf);
    pmin = pmin < q ? pmin : q;
  }
  if (!(pmin >= kExactP)) return false;
  *zstar_out = zstar;
  return true;
}

// Top-p on a whole row z (max mz): true with the kept codes those with z >= *zstar (top_p_select),
// else false with them in s.kept (top_p_keep on every finite code).
U2A_INLINE bool top_p_row(ArScratch& s, const float* z, int64_t V, float mz, double top_p, float* zstar) {
  float* e = s.p.data();
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t v = 0; v < V; ++v) {
    e[v] = exp_or_zero(z[v] - mz);
    sum += e[v];
  }
  if (top_p_select(s, z, V, mz, sum, top_p, zstar)) return true;
  gather_candidates<false>(s, z, V, 1.0f, -kInf);
  top_p_keep(s, z, mz, sum, top_p);
  return false;
}

struct ArArgs {
  const void* logits;
  int64_t ld, V;
  float t;
  bool greedy;
  int64_t top_k;
  double top_p;
  KeyPair k;     // call keys of stream 0 (token), step 0
  bool want_lp;  // false: logprobs not asked for (NaN written; the exact row sum is formed only for a draw)
  const int64_t* ids;
  const int64_t* pos;
  int64_t* tokens;
  float* logprobs;
};

// One row: x = sanitised logits (logprobs), z = min(x / T, FLT_MAX); top-k leaves the list of
// codes >= the k-th largest z, top-p the kept subset of that list (or of the row's candidates);
// the fixed-point draw over the list, or over the whole row when nothing is filtered.
template <typename T>
U2A_INLINE void ar_rows_impl(const ArArgs& a, int64_t begin, int64_t end, ArScratch& s) {
  const int64_t V = a.V;
  const FixedScale fs(V);
  int64_t* sums = s.sums.data();
  const bool do_k = a.top_k > 0 && a.top_k < V;
  const bool do_p = a.top_p < 1.0;
  for (int64_t b = begin; b < end; ++b) {
    const T* row = static_cast<const T*>(a.logits) + b * a.ld;
    // x: the sanitised fp32 row -- the logits themselves when they are fp32 and finite (no copy)
    const float* x = s.x.data();
    float mx;
    if constexpr (std::is_same_v<T, float>) {
      if (clean_max(row, V, &mx)) {
        x = row;
      } else {
        mx = load_row<T, false>(row, nullptr, 0.0f, 0.0f, s.x.data(), V);
      }
    } else {
      mx = load_row<T, false>(row, nullptr, 0.0f, 0.0f, s.x.data(), V);
    }
    if (!(mx > -kInf)) {
      a.tokens[b] = 0;
      a.logprobs[b] = a.want_lp ? -kInf : kNaN;
      continue;
    }
    Prefetch pf;  // the next row
    if (b + 1 < end) {
      pf.a = reinterpret_cast<const char*>(row + a.ld);
      pf.bpc = kChunk * static_cast<int64_t>(sizeof(T));
    }
    // the chunk sums are the draw's index only for an unfiltered draw at temperature 1
    const bool row_draw = !a.greedy && !do_k && !do_p && a.t == 1.0f;
    // the temperature-1 sum: the log-probability's, and the draw's when it is row_draw (without
    // logprobs, greedy, top-k and top-p need no pass over every code's exponential)
    const int64_t S = a.want_lp || row_draw ? sum_fixed<false>(x, V, 1.0f, mx, fs, row_draw ? sums : nullptr, pf) : 0;
    int64_t pick;
    if (a.greedy) {
      pick = argmax_first(x, V, mx);
    } else {
      const uint32_t sid = static_cast<uint32_t>(static_cast<uint64_t>(a.ids[b]));
      const uint32_t pos = static_cast<uint32_t>(static_cast<uint64_t>(a.pos[b]));
      const KeyPair rk = row_keys(a.k, sid, pos);
      const float mz = score_of<true>(mx, a.t);  // the max of z (the division is monotone)
      if (!do_k && !do_p) {
        pick = draw_row(x, V, a.t, mx, fs, sums, S, rk);
      } else if (!(mz > -kInf)) {  // every z = -inf (x / T overflowed): the reference draws code 0
        pick = 0;
      } else {
        float* z = s.z.data();
        if (do_k) {
          // the k-th largest z is the score of the k-th largest x (the division is monotone), and
          // z_v >= kth exactly when x_v >= x_lo, the least x with score(x) >= kth: kth_x itself, or a
          // few floats below it when x / T rounds several x to kth. When every such code is among
          // the listed ones (x_lo >= their threshold), they are picked from that list; otherwise
          // (or when x_lo is not found within 64 floats) a pass over the row gathers them.
          int64_t listed = -1;
          float listed_t = kInf;
          const float kth_x = kth_largest(x, s.tmp.data(), V, a.top_k, s.gi.data(), &listed, &listed_t);
          const float kth = score_of<true>(kth_x, a.t);
          float x_lo = kth_x;
          bool from_list = listed >= 0 && kth > -kInf;
          for (int i = 0; from_list && a.t != 1.0f; ++i) {
            const float y = std::nextafter(x_lo, -kInf);
            if (!(score_of<true>(y, a.t) >= kth)) break;
            x_lo = y;
            from_list = i < 64;
          }
          if (from_list && x_lo >= listed_t) {
            s.cand.clear();
            for (int64_t i = 0; i < listed; ++i) {
              const int64_t v = s.gi[i];
              if (x[v] >= x_lo) {
                z[v] = score_of<true>(x[v], a.t);
                s.cand.push_back(v);
              }
            }
          } else if (a.t == 1.0f) {
            gather_candidates<false>(s, x, V, 1.0f, kth);
          } else {
            gather_candidates<true>(s, x, V, a.t, kth);
          }
          if (do_p) {
            float sum = 0.0f;
            for (const int64_t v : s.cand) sum += exp_or_zero(z[v] - mz);
            top_p_keep(s, z, mz, sum, a.top_p);
          }
          pick = draw_list(z, do_p ? s.kept : s.cand, mz, fs, rk);
        } else {
          scale_row(x, z, V, a.t);
          float zstar;
          if (top_p_row(s, z, V, mz, a.top_p, &zstar)) {  // the kept codes: z >= zstar, often most of the row
            const int64_t Sp = sum_fixed<false, true>(z, V, 1.0f, mz, fs, sums, Prefetch(), zstar);
            pick = draw_fixed<false, true>(z, V, 1.0f, mz, fs, sums, draw_target(rk, Sp), zstar);
          } else {
            pick = draw_list(z, s.kept, mz, fs, rk);
          }
        }
      }
    }
    a.tokens[b] = pick;
    a.logprobs[b] = a.want_lp ? log_p(x[pick], mx, lse_rel_from_sum(S, fs.inv)) : kNaN;
  }
}

template <typename T>
struct ArRows {
  U2A_INLINE static void run(const ArArgs& a, int64_t begin, int64_t end, ArScratch* s) {
    ar_rows_impl<T>(a, begin, end, *s);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> ar_sample(const at::Tensor& logits_in, const at::Tensor& sample_ids_in,
                                             const at::Tensor& position_in, int64_t seed_lo, int64_t seed_hi,
                                             double temperature, int64_t top_k, double top_p, bool want_logprobs) {
  const char* op = "unif2ace_cpu::ar_sample";
  TORCH_CHECK(logits_in.device().is_cpu() && logits_in.dim() == 2, op, ": logits must be a 2-D CPU tensor [B, V], got ",
              logits_in.sizes(), " on ", logits_in.device());
  const int64_t B = logits_in.size(0), V = logits_in.size(1);
  TORCH_CHECK(V >= 1, op, ": the vocabulary dimension must be non-empty");
  for (const auto& pr : {std::make_pair("sample_ids", &sample_ids_in), std::make_pair("position", &position_in)}) {
    TORCH_CHECK(pr.second->dim() == 1 && pr.second->size(0) == B && pr.second->scalar_type() == at::kLong, op, ": ",
                pr.first, " must be int64 [B] with B = ", B, ", got ", pr.second->scalar_type(), " ",
                pr.second->sizes());
  }
  check_words(op, "seed", seed_lo, seed_hi);
  TORCH_CHECK(temperature >= 0.0 && top_k >= 0 && top_p > 0.0, op,
              ": temperature and top_k must be >= 0 and top_p > 0");
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor ids = sample_ids_in.contiguous();
  const at::Tensor pos = position_in.contiguous();
  at::Tensor tokens = at::empty({B}, ids.options());
  at::Tensor logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs};

  ArArgs a;
  a.logits = logits.const_data_ptr();
  a.ld = logits.stride(0);
  a.V = V;
  a.t = static_cast<float>(temperature);
  a.greedy = temperature == 0.0 || top_k == 1;
  a.top_k = top_k;
  a.top_p = top_p;
  a.k = stream_call_keys(seed_lo, seed_hi, 0, 0).first;  // ar_sample: step 0
  a.want_lp = want_logprobs;
  a.ids = ids.const_data_ptr<int64_t>();
  a.pos = pos.const_data_ptr<int64_t>();
  a.tokens = tokens.data_ptr<int64_t>();
  a.logprobs = logprobs.data_ptr<float>();
  const bool filter = !a.greedy && ((top_k > 0 && top_k < V) || top_p < 1.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ar_sample", [&] {
    at::parallel_for(0, B, std::max<int64_t>(1, (int64_t{1} << 14) / V), [&](int64_t b, int64_t e) {
      ArScratch s;
      s.x.resize(V);
      s.sums.resize((V + kChunk - 1) / kChunk);
      if (filter) {
        s.z.resize(V);
        s.tmp.resize(V);
        s.gi.resize(V);
      }
      if (filter && top_p < 1.0) {
        s.p.resize(V);
        s.cp.resize(V);
      }
      ArScratch* ps = &s;
      run_isa<ArRows<scalar_t>>(a, b, e, ps);
    });
  });
  return {tokens, logprobs};
}

// ------------------------------------------------------------------------------ test hooks

// The RNG words of (seed, step, stream, sample, position, token) for 1-D int64 tensors of one length.
std::tuple<at::Tensor, at::Tensor> sampling_rng_words(const at::Tensor& sample, const at::Tensor& position,
                                                      const at::Tensor& token, int64_t seed_lo, int64_t seed_hi,
                                                      int64_t step_lo, int64_t step_hi, int64_t stream) {
  const char* op = "unif2ace_cpu::sampling_rng_words";
  TORCH_CHECK(sample.dim() == 1 && position.sizes() == sample.sizes() && token.sizes() == sample.sizes() &&
                  sample.scalar_type() == at::kLong && position.scalar_type() == at::kLong &&
                  token.scalar_type() == at::kLong,
              op, ": sample, position and token must be int64 1-D tensors of one length");
  check_words(op, "seed", seed_lo, seed_hi);
  check_words(op, "step", step_lo, step_hi);
  const at::Tensor sa = sample.contiguous(), po = position.contiguous(), to = token.contiguous();
  const int64_t n = sa.size(0);
  at::Tensor hi = at::empty({n}, sa.options()), lo = at::empty({n}, sa.options());
  const auto keys = stream_call_keys(seed_lo, seed_hi, step_lo, step_hi);
  const KeyPair k = stream == 0 ? keys.first : keys.second;
  const int64_t *ps = sa.const_data_ptr<int64_t>(), *pp = po.const_data_ptr<int64_t>(),
                *pt = to.const_data_ptr<int64_t>();
  int64_t *ph = hi.data_ptr<int64_t>(), *pl = lo.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t s32 = static_cast<uint32_t>(static_cast<uint64_t>(ps[j]));
    const uint32_t p32 = static_cast<uint32_t>(static_cast<uint64_t>(pp[j]));
    const uint32_t t32 = static_cast<uint32_t>(static_cast<uint64_t>(pt[j]));
    const KeyPair rk = row_keys(k, s32, p32);
    ph[j] = element(rk.hi, t32);
    pl[j] = element(rk.lo, t32);
  }
  return {hi, lo};
}

// The fp32 Gumbel of the words (hi, lo), int64 tensors in [0, 2^32).
at::Tensor sampling_gumbel_from_words(const at::Tensor& hi_in, const at::Tensor& lo_in) {
  TORCH_CHECK(hi_in.dim() == 1 && lo_in.sizes() == hi_in.sizes() && hi_in.scalar_type() == at::kLong &&
                  lo_in.scalar_type() == at::kLong,
              "unif2ace_cpu::sampling_gumbel_from_words: hi and lo must be int64 1-D tensors of one length");
  const at::Tensor hi = hi_in.contiguous(), lo = lo_in.contiguous();
  const int64_t n = hi.size(0);
  at::Tensor g = at::empty({n}, hi.options().dtype(at::kFloat));
  const int64_t *ph = hi.const_data_ptr<int64_t>(), *pl = lo.const_data_ptr<int64_t>();
  float* pg = g.data_ptr<float>();
  for (int64_t j = 0; j < n; ++j) pg[j] = gumbel_from_words(static_cast<uint32_t>(ph[j]), static_cast<uint32_t>(pl[j]));
  return g;
}

// rng.h's fp32 functions, for tests: (log_f32(x) for x > 0, exp_fixed(x, K = 40) for x <= 0)
// elementwise on a 1-D fp32 tensor, and lse_rel of each row of rows [R, V] (a finite max per row).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sampling_f32_math(const at::Tensor& x_in, const at::Tensor& rows_in) {
  TORCH_CHECK(
      x_in.dim() == 1 && x_in.scalar_type() == at::kFloat && rows_in.dim() == 2 && rows_in.scalar_type() == at::kFloat,
      "unif2ace_cpu::sampling_f32_math: x must be 1-D fp32, rows 2-D fp32");
  const at::Tensor x = x_in.contiguous(), rows = rows_in.contiguous();
  const int64_t n = x.size(0), R = rows.size(0), V = rows.size(1);
  at::Tensor lg = at::empty({n}, x.options()), ex = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor lse = at::empty({R}, x.options());
  const float* px = x.const_data_ptr<float>();
  float *pl = lg.data_ptr<float>(), *ps = lse.data_ptr<float>();
  int64_t* pe = ex.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    pl[j] = px[j] > 0.0f ? log_f32(px[j]) : 0.0f;
    pe[j] = px[j] <= 0.0f ? exp_fixed(px[j], 127 + 40) : 0;
  }
  const FixedScale fs(V);
  for (int64_t r = 0; r < R; ++r) {
    const float* row = rows.const_data_ptr<float>() + r * V;
    float mx = -kInf;
    for (int64_t v = 0; v < V; ++v) mx = row[v] > mx ? row[v] : mx;
    ps[r] = lse_rel_from_sum(sum_fixed<false>(row, V, 1.0f, mx, fs, nullptr), fs.inv);
  }
  return {lg, ex, lse};
}

}  // namespace unif2ace::cpu
