// Masked token sampling (one fused MaskGIT step) and autoregressive sampling on the GPU
// (torch-free device code; launchers in sampling.cu).
//
// Contract: unif2ace/kernels/reference/sampling.py and the counter-based RNG of
// unif2ace/kernels/reference/rng.py, whose definition is csrc/common/rng.h (shared with the C++ kernels). The Gumbel
// noise is the exact one of the reference (float64 math, cast to fp32), but it is only evaluated for codes that can
// still win: rng::gumbel_upper_f32(hi) bounds the fp32 Gumbel from above, so a code with fl(z + bound) <= the running
// best is skipped.
//
// masked_step_sample_kernel: one CTA per (row, position) unit, streaming the vocabulary with
//   4-wide vector loads when the row is 4-element aligned; per thread (max, sum-exp) of the
//   guided, sanitised, top-k-thresholded logits and (best score, code, raw logit), codes visited
//   in increasing order per thread; warp shuffles then shared memory merge the states with
//   lowest-index tie-breaks. Writes the sampled code and log p + tau * g' (stream 1).
// remask_kernel: one CTA per row (L <= kMaxL): masked count, n from the host's schedule value,
//   bitonic sort of unique 64-bit keys (order-preserving confidence bits << 32 | position) in
//   shared memory, positions with key <= key[n-1] are re-masked (ties -> lowest position).
// ar_sample_kernel: one CTA per row: online (max, sum-exp) of the untempered logits for the
//   logprob, Gumbel-max over min(x / T, FLT_MAX) >= thr (or argmax when greedy).
// Arithmetic that the reference does as separate fp32 ops uses __fmul_rn / __fadd_rn so nvcc
// does not contract it into FMAs (bit-identical tokens with the reference).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"

// The counter-based RNG: one definition shared with the C++ kernels (host/device header).
#include "common/rng.h"

namespace unif2ace::cuda {
namespace sampling {

constexpr int kThreads = 256;
constexpr int kRemaskThreads = 1024;
constexpr int kMaxL = 4096;

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

__device__ __forceinline__ float sanitize(float x) {
  if (x != x) return -INFINITY;
  return x == INFINITY ? FLT_MAX : x;
}

struct State {
  float m;      // running max of x
  float s;      // sum exp(x - m)
  float best;   // best score
  int64_t idx;  // its code
  float bx;     // its raw (filtered) logit
};

__device__ __forceinline__ State state_init() { return State{-INFINITY, 0.f, -INFINITY, 0, -INFINITY}; }

__device__ __forceinline__ void merge(State& a, const State& b) {
  const float M = fmaxf(a.m, b.m);
  if (M == -INFINITY) {
    a.s = 0.f;
  } else {
    a.s = a.s * expf(a.m - M) + b.s * expf(b.m - M);
  }
  a.m = M;
  if (b.best > a.best || (b.best == a.best && b.idx < a.idx)) {
    a.best = b.best;
    a.idx = b.idx;
    a.bx = b.bx;
  }
}

__device__ __forceinline__ State warp_merge(State st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    State o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.best = __shfl_xor_sync(0xffffffffu, st.best, off);
    o.idx = __shfl_xor_sync(0xffffffffu, st.idx, off);
    o.bx = __shfl_xor_sync(0xffffffffu, st.bx, off);
    merge(st, o);
  }
  return st;
}

// Block-wide merge; the result is valid in thread 0. `sh` holds kThreads/32 states.
__device__ __forceinline__ State block_merge(State st, State* sh) {
  st = warp_merge(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < static_cast<int>(blockDim.x / 32) ? sh[lane] : state_init();
    st = warp_merge(st);
  }
  return st;
}

// Per-element update. x: the sanitised (and filtered) logit used for log p; z: the value whose
// Gumbel-max is taken (ignored when greedy); the Gumbel words come from the two row keys.
struct Params {
  float temperature;
  bool greedy;
  rng::KeyPair rk;  // the row keys of the token stream
};

// The Params of one row: its token-stream row keys from the host's keys[0], keys[1]
// (rng::seed_stream_keys of stream 0).
__device__ __forceinline__ Params row_params(const int64_t* keys, uint32_t sid, uint32_t pos, float temperature,
                                             bool greedy) {
  const rng::KeyPair k{static_cast<uint32_t>(keys[0]), static_cast<uint32_t>(keys[1])};
  return Params{temperature, greedy, rng::row_keys(k, sid, pos)};
}

__device__ __forceinline__ void online(State& st, float x) {
  if (x > st.m) {
    st.s = st.s * expf(st.m - x) + 1.f;  // st.m = -inf: 0 * 0 + 1
    st.m = x;
  } else if (x > -INFINITY) {
    st.s += expf(x - st.m);
  }
}

__device__ __forceinline__ void pick(State& st, float x, float z, int64_t v, const Params& p) {
  float score;
  if (p.greedy) {
    score = z;
  } else {
    if (!(z > -INFINITY)) return;
    const uint32_t t = static_cast<uint32_t>(v);
    const uint32_t hi = rng::element(p.rk.hi, t);
    if (__fadd_rn(z, rng::gumbel_upper_f32(hi)) <= st.best) return;  // cannot win
    const uint32_t lo = rng::element(p.rk.lo, t);
    score = __fadd_rn(z, rng::gumbel_from_words(hi, lo));
  }
  if (score > st.best) {  // codes are visited in increasing order per thread: ties keep the first
    st.best = score;
    st.idx = v;
    st.bx = x;
  }
}

__device__ __forceinline__ float scale(float x, float temperature) { return fminf(__fdiv_rn(x, temperature), FLT_MAX); }

// ---------------------------------------------------------------------------------------------
// kernel A

template <typename T, bool kHasUnc>
__global__ void __launch_bounds__(kThreads)
    masked_step_sample_kernel(const T* __restrict__ cond, const T* __restrict__ unc, int64_t stride_c, int64_t stride_u,
                              const int64_t* __restrict__ tokens_in, bool tokens_i32,
                              const bool* __restrict__ is_masked, const int64_t* __restrict__ sample_ids,
                              const int64_t* __restrict__ keys, const float* __restrict__ thr, int64_t L, int64_t V,
                              float a, float s, float temperature, float tau, bool greedy, bool has_noise,
                              int64_t* __restrict__ sampled, float* __restrict__ conf) {
  __shared__ State sh[kThreads / 32];
  const int64_t unit = blockIdx.x;
  const int64_t b = unit / L, i = unit - b * L;
  const int64_t tok =
      tokens_i32 ? static_cast<int64_t>(reinterpret_cast<const int32_t*>(tokens_in)[unit]) : tokens_in[unit];
  if (!is_masked[unit]) {
    if (threadIdx.x == 0) {
      sampled[unit] = tok;
      conf[unit] = INFINITY;
    }
    return;
  }
  const uint32_t sid = static_cast<uint32_t>(sample_ids[b]);
  const uint32_t pos = static_cast<uint32_t>(i);
  const Params p = row_params(keys, sid, pos, temperature, greedy);
  const bool has_thr = thr != nullptr;
  const float th = has_thr ? thr[unit] : -INFINITY;
  const T* c_row = cond + unit * stride_c;
  const T* u_row = kHasUnc ? unc + unit * stride_u : nullptr;
  State st = state_init();
  auto visit = [&](float c, float u, int64_t v) {
    float x = c;
    if (kHasUnc) x = __fsub_rn(__fmul_rn(a, c), __fmul_rn(s, u));
    x = sanitize(x);
    if (has_thr && !(x >= th)) x = -INFINITY;
    online(st, x);
    pick(st, x, greedy ? x : scale(x, temperature), v, p);
  };
  const bool vec = (V % 4 == 0) && (reinterpret_cast<uintptr_t>(c_row) % (4 * sizeof(T)) == 0) &&
                   (!kHasUnc || reinterpret_cast<uintptr_t>(u_row) % (4 * sizeof(T)) == 0);
  if (vec) {
    for (int64_t v0 = 4 * static_cast<int64_t>(threadIdx.x); v0 < V; v0 += 4 * static_cast<int64_t>(blockDim.x)) {
      const Vec4<T> cv = *reinterpret_cast<const Vec4<T>*>(c_row + v0);
      Vec4<T> uv;
      if (kHasUnc) uv = *reinterpret_cast<const Vec4<T>*>(u_row + v0);
#pragma unroll
      for (int j = 0; j < 4; ++j) visit(to_f32(cv.v[j]), kHasUnc ? to_f32(uv.v[j]) : 0.f, v0 + j);
    }
  } else {
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      visit(to_f32(c_row[v]), kHasUnc ? to_f32(u_row[v]) : 0.f, v);
    }
  }
  st = block_merge(st, sh);
  if (threadIdx.x == 0) {
    const bool finite = st.m > -INFINITY;
    float lp = finite ? __fsub_rn(__fsub_rn(st.bx, st.m), logf(st.s)) : -INFINITY;
    if (has_noise) {
      const rng::KeyPair k1{static_cast<uint32_t>(keys[2]), static_cast<uint32_t>(keys[3])};
      lp = __fadd_rn(lp, __fmul_rn(tau, rng::gumbel_at(rng::row_keys(k1, sid, pos), 0u)));
    }
    sampled[unit] = finite ? st.idx : 0;
    conf[unit] = lp;
  }
}

// ---------------------------------------------------------------------------------------------
// kernel B

__device__ __forceinline__ uint64_t conf_key(float c, int64_t i) {
  c = c + 0.0f;  // -0.0 -> +0.0 (torch's sort treats them as equal)
  const uint32_t bits = __float_as_uint(c);
  const uint32_t k = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(k) << 32) | static_cast<uint64_t>(i);
}

__global__ void __launch_bounds__(kRemaskThreads)
    remask_kernel(const float* __restrict__ conf, const bool* __restrict__ is_masked,
                  const int64_t* __restrict__ tokens_in, bool tokens_i32, const int64_t* __restrict__ sampled,
                  int64_t L, int64_t P, int64_t n_sched, bool last, int64_t mask_token_id,
                  int64_t* __restrict__ tokens_out, bool* __restrict__ mask_out, int64_t* __restrict__ sampled_out) {
  __shared__ uint64_t keys[kMaxL];
  __shared__ int count_sh;
  const int64_t row = blockIdx.x;
  const int64_t base = row * L;
  if (threadIdx.x == 0) count_sh = 0;
  __syncthreads();
  int cnt = 0;
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) {
    if (j < L) {
      keys[j] = conf_key(conf[base + j], j);
      cnt += is_masked[base + j] ? 1 : 0;
    } else {
      keys[j] = ~uint64_t(0);
    }
  }
  atomicAdd(&count_sh, cnt);
  __syncthreads();
  // bitonic sort, ascending, P a power of two
  for (int64_t k = 2; k <= P; k <<= 1) {
    for (int64_t jj = k >> 1; jj > 0; jj >>= 1) {
      for (int64_t t = threadIdx.x; t < P; t += blockDim.x) {
        const int64_t partner = t ^ jj;
        if (partner > t) {
          const uint64_t x = keys[t], y = keys[partner];
          const bool up = (t & k) == 0;
          if ((x > y) == up) {
            keys[t] = y;
            keys[partner] = x;
          }
        }
      }
      __syncthreads();
    }
  }
  const int64_t count = count_sh;
  int64_t n = last ? 0 : count - 1 < n_sched ? count - 1 : n_sched;
  n = n < 0 ? 0 : n;
  const uint64_t kth = n > 0 ? keys[n - 1] : 0;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const bool m = is_masked[base + j];
    const int64_t tok =
        tokens_i32 ? static_cast<int64_t>(reinterpret_cast<const int32_t*>(tokens_in)[base + j]) : tokens_in[base + j];
    const int64_t smp = m ? sampled[base + j] : tok;
    const bool nm = m && n > 0 && conf_key(conf[base + j], j) <= kth;
    sampled_out[base + j] = smp;
    mask_out[base + j] = nm;
    tokens_out[base + j] = nm ? mask_token_id : smp;
  }
}

// ---------------------------------------------------------------------------------------------
// autoregressive sampling

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ar_sample_kernel(const T* __restrict__ logits, int64_t stride, int64_t V, const int64_t* __restrict__ sample_ids,
                     const int64_t* __restrict__ position, const int64_t* __restrict__ keys,
                     const float* __restrict__ thr, float temperature, bool greedy, int64_t* __restrict__ tokens,
                     float* __restrict__ logprobs) {
  __shared__ State sh[kThreads / 32];
  const int64_t row = blockIdx.x;
  const uint32_t sid = static_cast<uint32_t>(sample_ids[row]);
  const uint32_t pos = static_cast<uint32_t>(position[row]);
  const Params p = row_params(keys, sid, pos, temperature, greedy);
  const bool has_thr = thr != nullptr;
  const float th = has_thr ? thr[row] : -INFINITY;
  const T* x_row = logits + row * stride;
  State st = state_init();
  auto visit = [&](float raw, int64_t v) {
    const float x = sanitize(raw);
    online(st, x);
    float z = x;
    if (!greedy) {
      z = scale(x, temperature);
      if (has_thr && !(z >= th)) z = -INFINITY;
    }
    pick(st, x, z, v, p);
  };
  const bool vec = (V % 4 == 0) && (reinterpret_cast<uintptr_t>(x_row) % (4 * sizeof(T)) == 0);
  if (vec) {
    for (int64_t v0 = 4 * static_cast<int64_t>(threadIdx.x); v0 < V; v0 += 4 * static_cast<int64_t>(blockDim.x)) {
      const Vec4<T> xv = *reinterpret_cast<const Vec4<T>*>(x_row + v0);
#pragma unroll
      for (int j = 0; j < 4; ++j) visit(to_f32(xv.v[j]), v0 + j);
    }
  } else {
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) visit(to_f32(x_row[v]), v);
  }
  st = block_merge(st, sh);
  if (threadIdx.x == 0) {
    const bool finite = st.m > -INFINITY;
    tokens[row] = finite ? st.idx : 0;
    logprobs[row] = finite ? __fsub_rn(__fsub_rn(st.bx, st.m), logf(st.s)) : -INFINITY;
  }
}

}  // namespace sampling
}  // namespace unif2ace::cuda
