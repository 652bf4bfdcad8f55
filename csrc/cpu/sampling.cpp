// Masked token sampling (one MaskGIT / Show-o step) and autoregressive sampling, C++ CPU kernels.
// Semantics: unif2ace/kernels/reference/sampling.py (the oracle); RNG: csrc/common/rng.h (bit for bit
// the reference's counter-based generator).
//
//   masked_sample_step(cond [B, L, V], uncond [B, L, V]?, tokens [B, L] int64, is_masked [B, L] bool,
//                      sample_ids [B] int64, seed_lo, seed_hi, guidance_scale, temperature, tau,
//                      top_k (0: none), n_cap, mask_token_id)
//       -> (tokens int64, is_masked bool, sampled int64, confidence fp32), all [B, L]
//       uncond given = guided; tau = fp64 confidence-noise scale (0: none); n_cap = 0 at the last
//       step, else max(n_raw, 1): a row re-masks n = max(0, min(n_cap, masked_count - 1)).
//   ar_sample(logits [B, V], sample_ids [B] int64, position [B] int64, seed_lo, seed_hi,
//             temperature, top_k (0: none), top_p (>= 1: none)) -> (tokens [B] int64, logprobs [B] fp32)
//
// Work split: masked step, phase 1 at::parallel_for over the B*L positions (only input-masked
// ones do work), phase 2 over the B rows (selection of the n lowest confidences with nth_element
// on the row's masked positions; ties -> lowest position). AR: parallel over rows.
//
// Per position the logits are read from memory once (cond and uncond together): the combined,
// sanitised fp32 row goes to a thread-local buffer of V floats (cache resident), and the later
// passes -- top-k threshold (a k-element heap for k <= 512, else nth_element on a copy), sum-exp,
// Gumbel-max -- run over that buffer. AR top-k / top-p work on the list of surviving codes; top-p
// sorts only a superset of its nucleus (the 1024, 4096, ... largest codes), never the row.
//
// Exactness. Every value the reference rounds is rounded the same way here: the guidance combine
// is two fp32 products and a difference (no FMA: contraction is off for this file, and the hot
// loops are compiled for baseline x86-64 and for AVX2 without FMA), the temperature is an IEEE
// division clamped at FLT_MAX, the Gumbel noise is computed in float64 from the 64 random bits and
// cast to fp32, and the score x/T + g is an fp32 sum compared with ties -> lowest code. So sampled
// codes equal the reference's bit for bit (up to a libm ulp in float64 moving an fp32 rounding,
// ~2^-28 per Gumbel value). The exact Gumbel is evaluated only for codes whose fp32 upper bound
// (rng.h: gumbel_upper_f32, from the high word alone, vectorised) beats the running best, which
// cannot change the argmax. log-softmax (confidence, AR logprobs) uses a polynomial exp
// (|rel err| < 2e-7) summed in fp32: equal to the reference within fp32 tolerance, not bit for bit.
// Top-p probabilities likewise: a keep/drop decision can differ from the reference only when the
// mass above a code is within ~1e-6 (relative) of top_p.
// Not reproduced: a temperature in (0, 7e-46), which rounds to fp32 0 -- the reference then scores
// x = 0 as 0/0 = NaN and torch.argmax picks the NaN; here NaN scores never win.

// The guidance combine (two products and a difference), x / T + g and log p + tau * g' must round
// like the reference's separate fp32 operations: no FMA contraction in this file, whatever -march
// or target the build uses (GCC contracts a*b - c*d even in ISO mode once FMA is available).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/rng.h"
#include "cpu/vec_math.h"

namespace {

using namespace unif2ace::rng;

#ifndef U2A_INLINE
#define U2A_INLINE inline __attribute__((always_inline))
#endif

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kFltMax = std::numeric_limits<float>::max();

using unif2ace::cpu::fast_exp;  // exp for x in [-87, 88]; callers map x < -87 to 0 themselves
using unif2ace::cpu::to_f32;

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

U2A_INLINE float sum_exp(const float* __restrict__ x, int64_t V, float mx) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < V; ++v) s += exp_or_zero(x[v] - mx);
  return s;
}

// z = min(x / t, FLT_MAX), IEEE division (-inf stays -inf).
U2A_INLINE void scale_row(const float* __restrict__ x, float* __restrict__ z, int64_t V, float t) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    const float q = x[v] / t;
    z[v] = q > kFltMax ? kFltMax : q;
  }
}

// argmax with ties -> lowest index, given the row max mx (finite or FLT_MAX): the first v with
// x_v == mx.
U2A_INLINE int64_t argmax_first(const float* x, int64_t V, float mx) {
  for (int64_t v = 0; v < V; ++v) {
    if (x[v] == mx) return v;
  }
  return 0;
}

// argmax_v (min(x_v / t, FLT_MAX) + g_v) (DIV) or argmax_v (x_v + g_v), g_v the fp32 Gumbel of the
// words (element(rk.hi, v), element(rk.lo, v)); ties -> lowest v, 0 if every score is -inf. A tile's
// exact scores are computed only where the fp32 upper bound beats the running best: a code with
// bound <= best has exact score <= bound <= best and cannot win (only a strictly larger score
// replaces the best).
template <bool DIV>
U2A_INLINE int64_t gumbel_argmax(const float* __restrict__ x, int64_t V, float t, KeyPair rk) {
  constexpr int TILE = 256;
  alignas(64) float bnd[TILE];
  float best = -kInf;
  int64_t best_i = 0;
  for (int64_t v0 = 0; v0 < V; v0 += TILE) {
    const int n = static_cast<int>(std::min<int64_t>(TILE, V - v0));
    const float* xt = x + v0;
    const uint32_t tok0 = static_cast<uint32_t>(v0);
    float tmax = -kInf;
#pragma omp simd reduction(max : tmax)
    for (int j = 0; j < n; ++j) {
      float sc = xt[j];
      if (DIV) {
        sc = sc / t;
        sc = sc > kFltMax ? kFltMax : sc;
      }
      const float b = sc + gumbel_upper_f32(element(rk.hi, tok0 + static_cast<uint32_t>(j)));
      bnd[j] = b;
      tmax = tmax > b ? tmax : b;
    }
    if (!(tmax > best)) continue;
    for (int j = 0; j < n; ++j) {
      if (!(bnd[j] > best)) continue;
      const uint32_t tok = tok0 + static_cast<uint32_t>(j);
      float sc = xt[j];
      if (DIV) {
        sc = sc / t;
        sc = sc > kFltMax ? kFltMax : sc;
      }
      const float score = sc + gumbel_at(rk, tok);
      if (score > best) {
        best = score;
        best_i = v0 + j;
      }
    }
  }
  return best_i;
}

// The k-th largest value of x (counting duplicates), 0 < k < V. Small k: a min-heap of the k
// largest seen, skipping 64-wide tiles whose max cannot enter it (O(V) compares, no copy of the
// row); otherwise nth_element on a copy in tmp.
float kth_largest(const float* x, float* tmp, int64_t V, int64_t k) {
  if (k <= 512) {
    std::vector<float> heap(x, x + k);
    std::make_heap(heap.begin(), heap.end(), std::greater<float>());
    float hmin = heap.front();
    constexpr int64_t TILE = 64;
    int64_t v = k;
    for (; v < V && (v % TILE) != 0; ++v) {
      if (x[v] > hmin) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
        heap.back() = x[v];
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
        hmin = heap.front();
      }
    }
    for (; v < V; v += TILE) {
      const int64_t n = std::min<int64_t>(TILE, V - v);
      float tmax = -kInf;
      for (int64_t j = 0; j < n; ++j) tmax = tmax > x[v + j] ? tmax : x[v + j];
      if (!(tmax > hmin)) continue;
      for (int64_t j = 0; j < n; ++j) {
        if (x[v + j] > hmin) {
          std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
          heap.back() = x[v + j];
          std::push_heap(heap.begin(), heap.end(), std::greater<float>());
          hmin = heap.front();
        }
      }
    }
    return hmin;
  }
  std::memcpy(tmp, x, sizeof(float) * V);
  std::nth_element(tmp, tmp + (k - 1), tmp + V, std::greater<float>());
  return tmp[k - 1];
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
  KeyPair k_token, k_conf;  // seed/stream keys: stream 0 (token), stream 1 (confidence)
  const int64_t* tokens;
  const bool* masked;
  const int64_t* ids;
  int64_t* sampled;
  float* conf;
};

template <typename T, bool GUIDED>
U2A_INLINE void step_positions_impl(const StepArgs& p, int64_t begin, int64_t end, float* buf, float* tmp) {
  const T* cond = static_cast<const T*>(p.cond);
  const T* unc = static_cast<const T*>(p.unc);
  const int64_t V = p.V;
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
      if (p.top_k > 0 && p.top_k < V) top_k_filter(buf, tmp, V, p.top_k);
      const float lse_rel = std::log(sum_exp(buf, V, mx));
      if (p.sample) {
        const KeyPair rk = row_keys(p.k_token, sid, pos);
        // x / 1 == x exactly: skip the division at temperature 1
        pick = p.t == 1.0f ? gumbel_argmax<false>(buf, V, 1.0f, rk) : gumbel_argmax<true>(buf, V, p.t, rk);
      } else {
        pick = argmax_first(buf, V, mx);  // top-k keeps the max
      }
      lp = (buf[pick] - mx) - lse_rel;
    }
    if (p.noise) {
      const float g1 =
          gumbel_from_words(element(row_key(p.k_conf.hi, sid, pos), 0u), element(row_key(p.k_conf.lo, sid, pos), 0u));
      const float ng = p.tau * g1;
      lp = lp + ng;
    }
    p.sampled[q] = pick;
    p.conf[q] = lp;
  }
}

template <typename T, bool GUIDED>
__attribute__((target("avx2"))) void step_positions_avx2(const StepArgs& p, int64_t b, int64_t e, float* buf,
                                                         float* tmp) {
  step_positions_impl<T, GUIDED>(p, b, e, buf, tmp);
}
template <typename T, bool GUIDED>
void step_positions_base(const StepArgs& p, int64_t b, int64_t e, float* buf, float* tmp) {
  step_positions_impl<T, GUIDED>(p, b, e, buf, tmp);
}

bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}

void check_seed(const char* op, int64_t seed_lo, int64_t seed_hi) {
  TORCH_CHECK(seed_lo >= 0 && seed_lo <= 0xFFFFFFFFll && seed_hi >= 0 && seed_hi <= 0xFFFFFFFFll, op,
              ": seed_lo and seed_hi must be 32-bit words in [0, 2^32), got ", seed_lo, " and ", seed_hi);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_sample_step(
    const at::Tensor& cond_in, const std::optional<at::Tensor>& uncond_opt, const at::Tensor& tokens_in,
    const at::Tensor& is_masked_in, const at::Tensor& sample_ids_in, int64_t seed_lo, int64_t seed_hi,
    double guidance_scale, double temperature, double tau, int64_t top_k, int64_t n_cap, int64_t mask_token_id) {
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
  check_seed(op, seed_lo, seed_hi);
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

  const uint32_t slo = static_cast<uint32_t>(seed_lo), shi = static_cast<uint32_t>(seed_hi);
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
  p.k_token = stream_keys(slo, shi, STREAM_TOKEN);
  p.k_conf = stream_keys(slo, shi, STREAM_CONFIDENCE);
  p.tokens = tokens.const_data_ptr<int64_t>();
  p.masked = is_masked.const_data_ptr<bool>();
  p.ids = ids.const_data_ptr<int64_t>();
  p.sampled = sampled.data_ptr<int64_t>();
  p.conf = conf.data_ptr<float>();

  // phase 1: every (row, position)
  const bool avx2 = have_avx2();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / V);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cond.scalar_type(), "masked_sample_step", [&] {
    auto fn = guided ? (avx2 ? step_positions_avx2<scalar_t, true> : step_positions_base<scalar_t, true>)
                     : (avx2 ? step_positions_avx2<scalar_t, false> : step_positions_base<scalar_t, false>);
    at::parallel_for(0, B * L, grain, [&](int64_t b, int64_t e) {
      std::vector<float> buf(V);
      std::vector<float> tmp(top_k > 0 && top_k < V ? V : 0);
      fn(p, b, e, buf.data(), tmp.data());
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

// ------------------------------------------------------------------------------ AR sampling

struct ArScratch {
  std::vector<float> x, z, tmp, p;
  std::vector<int64_t> cand, order, kept;
};

// Gumbel-max over the codes in ``idx`` (ascending): argmax (z_v + g_v), ties -> lowest v; the
// exact Gumbel only where the fp32 bound beats the running best (as gumbel_argmax).
U2A_INLINE int64_t gumbel_argmax_list(const float* z, const std::vector<int64_t>& idx, KeyPair rk) {
  float best = -kInf;
  int64_t best_i = 0;
  for (const int64_t v : idx) {
    const uint32_t tok = static_cast<uint32_t>(v);
    const uint32_t hi = element(rk.hi, tok);
    if (!(z[v] + gumbel_upper_f32(hi) > best)) continue;
    const float score = z[v] + gumbel_from_words(hi, element(rk.lo, tok));
    if (score > best) {
      best = score;
      best_i = v;
    }
  }
  return best_i;
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

// Candidates for top-p on a whole row z: the m largest (m = 1024, x4 while needed) once their
// mass reaches top_p -- every code below them has at least that much mass strictly above it and is
// dropped -- or every finite code. Returns the row's sum of exp(z - mz).
U2A_INLINE float top_p_candidates(ArScratch& s, const float* z, int64_t V, float mz, double top_p) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t v = 0; v < V; ++v) sum += exp_or_zero(z[v] - mz);
  int64_t live = 0;
  for (int64_t v = 0; v < V; ++v) live += z[v] > -kInf;
  float thr = -kInf;
  for (int64_t m = 1024; m < live; m *= 4) {
    const float t = kth_largest(z, s.tmp.data(), V, m);
    double mass = 0.0;
    for (int64_t v = 0; v < V; ++v) mass += z[v] >= t ? static_cast<double>(exp_or_zero(z[v] - mz) / sum) : 0.0;
    if (mass >= top_p) {
      thr = t;
      break;
    }
  }
  s.cand.clear();
  for (int64_t v = 0; v < V; ++v) {
    if (z[v] > -kInf && z[v] >= thr) s.cand.push_back(v);
  }
  return sum;
}

struct ArArgs {
  const void* logits;
  int64_t ld, V;
  float t;
  bool greedy;
  int64_t top_k;
  double top_p;
  KeyPair k;  // seed/stream keys of stream 0 (token)
  const int64_t* ids;
  const int64_t* pos;
  int64_t* tokens;
  float* logprobs;
};

// One row: x = sanitised logits (logprobs), z = min(x / T, FLT_MAX); top-k leaves the list of
// codes >= the k-th largest z, top-p the kept subset of that list (or of the row's candidates);
// Gumbel-max over the list, or over the whole row (vectorised) when nothing is filtered.
template <typename T>
U2A_INLINE void ar_rows_impl(const ArArgs& a, int64_t begin, int64_t end, ArScratch& s) {
  const int64_t V = a.V;
  float* x = s.x.data();
  const bool do_k = a.top_k > 0 && a.top_k < V;
  const bool do_p = a.top_p < 1.0;
  for (int64_t b = begin; b < end; ++b) {
    const T* row = static_cast<const T*>(a.logits) + b * a.ld;
    const float mx = load_row<T, false>(row, nullptr, 0.0f, 0.0f, x, V);
    if (!(mx > -kInf)) {
      a.tokens[b] = 0;
      a.logprobs[b] = -kInf;
      continue;
    }
    const float lse_rel = std::log(sum_exp(x, V, mx));
    int64_t pick;
    if (a.greedy) {
      pick = argmax_first(x, V, mx);
    } else {
      float* z = s.z.data();
      scale_row(x, z, V, a.t);
      const uint32_t sid = static_cast<uint32_t>(static_cast<uint64_t>(a.ids[b]));
      const uint32_t pos = static_cast<uint32_t>(static_cast<uint64_t>(a.pos[b]));
      const KeyPair rk = row_keys(a.k, sid, pos);
      float mz = -kInf;
      for (int64_t v = 0; v < V; ++v) mz = z[v] > mz ? z[v] : mz;
      if (!do_k && !do_p) {
        pick = gumbel_argmax<false>(z, V, 1.0f, rk);
      } else if (!(mz > -kInf)) {  // every z = -inf (x / T underflowed): the reference draws code 0
        pick = 0;
      } else {
        float sum = 0.0f;
        if (do_k) {
          const float kth = kth_largest(z, s.tmp.data(), V, a.top_k);
          s.cand.clear();
          for (int64_t v = 0; v < V; ++v) {
            if (z[v] >= kth && z[v] > -kInf) {
              s.cand.push_back(v);
              sum += exp_or_zero(z[v] - mz);
            }
          }
        } else {
          sum = top_p_candidates(s, z, V, mz, a.top_p);
        }
        if (do_p) {
          top_p_keep(s, z, mz, sum, a.top_p);
          pick = gumbel_argmax_list(z, s.kept, rk);
        } else {
          pick = gumbel_argmax_list(z, s.cand, rk);
        }
      }
    }
    a.tokens[b] = pick;
    a.logprobs[b] = (x[pick] - mx) - lse_rel;
  }
}

template <typename T>
__attribute__((target("avx2"))) void ar_rows_avx2(const ArArgs& a, int64_t b, int64_t e, ArScratch& s) {
  ar_rows_impl<T>(a, b, e, s);
}
template <typename T>
void ar_rows_base(const ArArgs& a, int64_t b, int64_t e, ArScratch& s) {
  ar_rows_impl<T>(a, b, e, s);
}

std::tuple<at::Tensor, at::Tensor> ar_sample(const at::Tensor& logits_in, const at::Tensor& sample_ids_in,
                                             const at::Tensor& position_in, int64_t seed_lo, int64_t seed_hi,
                                             double temperature, int64_t top_k, double top_p) {
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
  check_seed(op, seed_lo, seed_hi);
  TORCH_CHECK(temperature >= 0.0 && top_k >= 0 && top_p > 0.0, op,
              ": temperature and top_k must be >= 0 and top_p > 0");
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor ids = sample_ids_in.contiguous();
  const at::Tensor pos = position_in.contiguous();
  at::Tensor tokens = at::empty({B}, ids.options());
  at::Tensor logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs};

  const uint32_t slo = static_cast<uint32_t>(seed_lo), shi = static_cast<uint32_t>(seed_hi);
  ArArgs a;
  a.logits = logits.const_data_ptr();
  a.ld = logits.stride(0);
  a.V = V;
  a.t = static_cast<float>(temperature);
  a.greedy = temperature == 0.0 || top_k == 1;
  a.top_k = top_k;
  a.top_p = top_p;
  a.k = stream_keys(slo, shi, STREAM_TOKEN);
  a.ids = ids.const_data_ptr<int64_t>();
  a.pos = pos.const_data_ptr<int64_t>();
  a.tokens = tokens.data_ptr<int64_t>();
  a.logprobs = logprobs.data_ptr<float>();
  const bool avx2 = have_avx2();
  const bool need_tmp = !a.greedy && ((top_k > 0 && top_k < V) || top_p < 1.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ar_sample", [&] {
    auto fn = avx2 ? ar_rows_avx2<scalar_t> : ar_rows_base<scalar_t>;
    at::parallel_for(0, B, std::max<int64_t>(1, (int64_t{1} << 14) / V), [&](int64_t b, int64_t e) {
      ArScratch s;
      s.x.resize(V);
      if (!a.greedy) s.z.resize(V);
      if (need_tmp) s.tmp.resize(V);
      if (!a.greedy && top_p < 1.0) s.p.resize(V);
      fn(a, b, e, s);
    });
  });
  return {tokens, logprobs};
}

// ------------------------------------------------------------------------------ RNG test hooks

// The RNG words of (seed, stream, sample, position, token) for 1-D int64 tensors of one length.
std::tuple<at::Tensor, at::Tensor> sampling_rng_words(const at::Tensor& sample, const at::Tensor& position,
                                                      const at::Tensor& token, int64_t seed_lo, int64_t seed_hi,
                                                      int64_t stream) {
  const char* op = "unif2ace_cpu::sampling_rng_words";
  TORCH_CHECK(sample.dim() == 1 && position.sizes() == sample.sizes() && token.sizes() == sample.sizes() &&
                  sample.scalar_type() == at::kLong && position.scalar_type() == at::kLong &&
                  token.scalar_type() == at::kLong,
              op, ": sample, position and token must be int64 1-D tensors of one length");
  check_seed(op, seed_lo, seed_hi);
  const at::Tensor sa = sample.contiguous(), po = position.contiguous(), to = token.contiguous();
  const int64_t n = sa.size(0);
  at::Tensor hi = at::empty({n}, sa.options()), lo = at::empty({n}, sa.options());
  const uint32_t st = static_cast<uint32_t>(stream);
  const KeyPair k = stream_keys(static_cast<uint32_t>(seed_lo), static_cast<uint32_t>(seed_hi), st);
  const int64_t *ps = sa.const_data_ptr<int64_t>(), *pp = po.const_data_ptr<int64_t>(),
                *pt = to.const_data_ptr<int64_t>();
  int64_t *ph = hi.data_ptr<int64_t>(), *pl = lo.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t s32 = static_cast<uint32_t>(static_cast<uint64_t>(ps[j]));
    const uint32_t p32 = static_cast<uint32_t>(static_cast<uint64_t>(pp[j]));
    const uint32_t t32 = static_cast<uint32_t>(static_cast<uint64_t>(pt[j]));
    ph[j] = element(row_key(k.hi, s32, p32), t32);
    pl[j] = element(row_key(k.lo, s32, p32), t32);
  }
  return {hi, lo};
}

// (exact fp32 Gumbel, fp32 upper bound) of the words (hi, lo), int64 tensors in [0, 2^32).
std::tuple<at::Tensor, at::Tensor> sampling_gumbel_from_words(const at::Tensor& hi_in, const at::Tensor& lo_in) {
  TORCH_CHECK(hi_in.dim() == 1 && lo_in.sizes() == hi_in.sizes() && hi_in.scalar_type() == at::kLong &&
                  lo_in.scalar_type() == at::kLong,
              "unif2ace_cpu::sampling_gumbel_from_words: hi and lo must be int64 1-D tensors of one length");
  const at::Tensor hi = hi_in.contiguous(), lo = lo_in.contiguous();
  const int64_t n = hi.size(0);
  at::Tensor g = at::empty({n}, hi.options().dtype(at::kFloat)), ub = at::empty({n}, hi.options().dtype(at::kFloat));
  const int64_t *ph = hi.const_data_ptr<int64_t>(), *pl = lo.const_data_ptr<int64_t>();
  float *pg = g.data_ptr<float>(), *pu = ub.data_ptr<float>();
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t h = static_cast<uint32_t>(ph[j]), l = static_cast<uint32_t>(pl[j]);
    pg[j] = gumbel_from_words(h, l);
    pu[j] = gumbel_upper_f32(h);
  }
  return {g, ub};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(unif2ace_cpu, m) {
  m.def(
      "masked_sample_step(Tensor cond, Tensor? uncond, Tensor tokens, Tensor is_masked, Tensor sample_ids, "
      "int seed_lo, int seed_hi, float guidance_scale, float temperature, float tau, int top_k, int n_cap, "
      "int mask_token_id) -> (Tensor, Tensor, Tensor, Tensor)",
      &masked_sample_step);
  m.def(
      "ar_sample(Tensor logits, Tensor sample_ids, Tensor position, int seed_lo, int seed_hi, float temperature, "
      "int top_k, float top_p) -> (Tensor, Tensor)",
      &ar_sample);
  m.def(
      "sampling_rng_words(Tensor sample, Tensor position, Tensor token, int seed_lo, int seed_hi, int stream) "
      "-> (Tensor, Tensor)",
      &sampling_rng_words);
  m.def("sampling_gumbel_from_words(Tensor hi, Tensor lo) -> (Tensor, Tensor)", &sampling_gumbel_from_words);
}
