// Masked token sampling (one fused MaskGIT step) and autoregressive sampling on the GPU
// (torch-free device code; launchers in sampling.cu).
//
// Contract: unif2ace/kernels/reference/sampling.py and the counter-based RNG and exact fp32 math of
// unif2ace/kernels/reference/rng.py, whose definition is csrc/common/rng.h (shared with the C++
// kernels). Every value is the reference's bit for bit: the fp32 arithmetic the reference does as
// separate operations goes through rng::fmul / fadd / fsub / fdiv (the __f*_rn intrinsics, which nvcc
// never contracts into FMAs), and the softmax of the draw is integer (fixed point).
//
// masked_step_sample_kernel: one CTA per (row, position) unit, three passes over the vocabulary
//   (4-wide vector loads when the row is 4-element aligned):
//   1. the max of the guided, sanitised, top-k-thresholded logits x and its first code (the greedy
//      pick), merged across the block with lowest-code tie-breaks;
//   2. the fixed-point sums S = sum exp_fixed(x - max) (the confidence's log-sum-exp) and, at a
//      temperature other than 1, Sz of the draw's scores z = min(x / T, FLT_MAX); integer sums, so
//      the block's summation order does not matter;
//   3. the draw: U = floor(r Sz / 2^64) for the row's 64 random bits r, then chunks of
//      kThreads * 4 consecutive codes with a block-wide prefix sum of their integer exponentials
//      until the running sum passes U (the code is the first where it does).
//   Writes the code and log p + tau * g' (stream-1 Gumbel).
// remask_kernel: one CTA per row (L <= kMaxL): masked count, n from the host's schedule value,
//   bitonic sort of unique 64-bit keys (order-preserving confidence bits << 32 | position) in
//   shared memory, positions with key <= key[n-1] are re-masked (ties -> lowest position).
// ar_sample_kernel: one CTA per row, the same three passes over the sanitised logits (the logprob's
//   sum) and the draw's scores min(x / T, FLT_MAX) kept where >= thr (or the first max when greedy).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"

// The counter-based RNG and the fp32 math: one definition shared with the C++ kernels.
#include "common/rng.h"

namespace unif2ace::cuda {
namespace sampling {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPer = 4;  // consecutive codes per thread in a chunk of the draw
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

// min(x / t, FLT_MAX), IEEE division.
__device__ __forceinline__ float scale(float x, float t) { return fminf(rng::fdiv(x, t), FLT_MAX); }

// ---------------------------------------------------------------------------------------------
// block-wide reductions (kThreads threads; results valid in every thread)

// The max and its first code: a larger max wins, an equal one keeps the lower code.
struct MaxIdx {
  float m;
  int64_t idx;
};

__device__ __forceinline__ void merge(MaxIdx& a, const MaxIdx& b) {
  if (b.m > a.m || (b.m == a.m && b.idx < a.idx)) a = b;
}

struct Shared {
  MaxIdx mi[kWarps];
  int64_t sum[kWarps];
  int64_t total;
  int64_t pick;
};

__device__ __forceinline__ MaxIdx block_max_first(MaxIdx v, Shared& sh) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    MaxIdx o;
    o.m = __shfl_xor_sync(0xffffffffu, v.m, off);
    o.idx = __shfl_xor_sync(0xffffffffu, v.idx, off);
    merge(v, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh.mi[warp] = v;
  __syncthreads();
  MaxIdx r = sh.mi[0];
  for (int w = 1; w < kWarps; ++w) merge(r, sh.mi[w]);
  __syncthreads();  // sh reusable
  return r;
}

// The exclusive prefix sum of v over the threads in order, and the block's total.
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t v, Shared& sh, int64_t* total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t inc = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int64_t o = __shfl_up_sync(0xffffffffu, inc, off);
    if (lane >= off) inc += o;
  }
  if (lane == 31) sh.sum[warp] = inc;
  __syncthreads();
  int64_t before = 0, all = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? sh.sum[w] : 0;
    all += sh.sum[w];
  }
  __syncthreads();  // sh reusable
  *total = all;
  return before + inc - v;
}

__device__ __forceinline__ int64_t block_sum(int64_t v, Shared& sh) {
  int64_t total;
  block_exclusive_scan(v, sh, &total);
  return total;
}

// ---------------------------------------------------------------------------------------------
// a row of logits: x(v), visited in passes

// The fp32 value of code v of a row (the guided combine when there is an unconditional row), with
// the code's fp32 x computed by the row type's `finish`.
template <typename T, bool kHasUnc>
struct Logits {
  const T* c;
  const T* u;
  float a, s;
  __device__ __forceinline__ float raw(float cv, float uv) const {
    return kHasUnc ? rng::fsub(rng::fmul(a, cv), rng::fmul(s, uv)) : cv;
  }
  __device__ __forceinline__ float at(int64_t v) const { return raw(to_f32(c[v]), kHasUnc ? to_f32(u[v]) : 0.f); }
  __device__ __forceinline__ bool aligned(int64_t V) const {
    return V % 4 == 0 && reinterpret_cast<uintptr_t>(c) % (4 * sizeof(T)) == 0 &&
           (!kHasUnc || reinterpret_cast<uintptr_t>(u) % (4 * sizeof(T)) == 0);
  }
  // the 4 values at v0 .. v0 + 3 (v0 a multiple of 4, all < V, aligned row)
  __device__ __forceinline__ void at4(int64_t v0, float* out) const {
    const Vec4<T> cv = *reinterpret_cast<const Vec4<T>*>(c + v0);
    Vec4<T> uv;
    if (kHasUnc) uv = *reinterpret_cast<const Vec4<T>*>(u + v0);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = raw(to_f32(cv.v[j]), kHasUnc ? to_f32(uv.v[j]) : 0.f);
  }
};

// f(raw value, v) for every code v < V of this thread (codes in increasing order per thread).
template <typename R, typename F>
__device__ __forceinline__ void for_each_code(const R& row, int64_t V, F&& f) {
  if (row.aligned(V)) {
    for (int64_t v0 = 4 * static_cast<int64_t>(threadIdx.x); v0 < V; v0 += 4 * kThreads) {
      float x[4];
      row.at4(v0, x);
#pragma unroll
      for (int j = 0; j < 4; ++j) f(x[j], v0 + j);
    }
  } else {
    for (int64_t v = threadIdx.x; v < V; v += kThreads) f(row.at(v), v);
  }
}

// The kPer raw values of this thread's codes v0 .. v0 + kPer - 1 of a chunk (-inf past V).
template <typename R>
__device__ __forceinline__ void chunk_codes(const R& row, int64_t V, int64_t v0, float* x) {
  if (row.aligned(V) && v0 + kPer <= V) {
    row.at4(v0, x);
  } else {
#pragma unroll
    for (int j = 0; j < kPer; ++j) x[j] = v0 + j < V ? row.at(v0 + j) : -INFINITY;
  }
}

// The code drawn from the fixed-point softmax of the scores zf(raw value) (max mz, sum Sz): the
// first v whose running sum exp_fixed(z_0 - mz) + ... passes U = floor(r Sz / 2^64), found chunk by
// chunk with a block-wide prefix sum. Every thread returns it.
template <typename R, typename ZF>
__device__ __forceinline__ int64_t draw_code(const R& row, int64_t V, ZF&& zf, float mz, int32_t kbias, uint64_t r,
                                             int64_t Sz, Shared& sh) {
  const int64_t U = static_cast<int64_t>(rng::mulhi_u64(r, static_cast<uint64_t>(Sz)));
  int64_t acc = 0;
  for (int64_t c0 = 0; c0 < V; c0 += static_cast<int64_t>(kPer) * kThreads) {
    const int64_t v0 = c0 + static_cast<int64_t>(kPer) * threadIdx.x;
    float x[kPer];
    int64_t q[kPer], mine = 0;
    chunk_codes(row, V, v0, x);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      q[j] = v0 + j < V ? rng::exp_fixed(rng::fsub(zf(x[j]), mz), kbias) : 0;
      mine += q[j];
    }
    int64_t total;
    const int64_t before = acc + block_exclusive_scan(mine, sh, &total);
    if (acc + total > U) {  // the same in every thread: the code is in this chunk
      if (before <= U && U < before + mine) {
        int64_t run = before;
        int j = 0;
        while (j < kPer - 1 && run + q[j] <= U) run += q[j++];
        sh.pick = v0 + j;
      }
      __syncthreads();
      return sh.pick;
    }
    acc += total;
  }
  return 0;  // not reached: U < Sz
}

// ---------------------------------------------------------------------------------------------
// the per-row work of both kernels

// (code, log p) of a row whose fp32 logits are xf(raw value) (-inf: filtered) and whose draw scores
// are zf(x) (non-decreasing in x; the top code kept): the three passes of the header comment. With
// own_scores the scores differ from the logits (a temperature other than 1, or a filter on the
// scores) and get their own sum. Valid in every thread.
template <typename R, typename XF, typename ZF>
__device__ __forceinline__ void sample_row(const R& row, int64_t V, XF xf, ZF zf, bool greedy, bool own_scores,
                                           int32_t kbias, float inv_scale, rng::KeyPair rk, Shared& sh, int64_t* code,
                                           float* lp) {
  MaxIdx mi{-INFINITY, 0};
  for_each_code(row, V, [&](float raw, int64_t v) {
    const float x = xf(raw);
    if (x > mi.m) mi = MaxIdx{x, v};  // codes in increasing order per thread: ties keep the first
  });
  mi = block_max_first(mi, sh);
  const bool finite = mi.m > -INFINITY;
  const float m0 = finite ? mi.m : 0.f;
  const float mz = zf(m0);
  int64_t S = 0, Sz = 0;
  for_each_code(row, V, [&](float raw, int64_t) {
    const float x = xf(raw);
    S += rng::exp_fixed(rng::fsub(x, m0), kbias);
    if (own_scores) Sz += rng::exp_fixed(rng::fsub(zf(x), mz), kbias);
  });
  S = block_sum(S, sh);
  Sz = own_scores ? block_sum(Sz, sh) : S;
  int64_t pick = mi.idx;
  if (!greedy) {
    pick = 0;  // every score -inf (x / T overflowed): code 0, as the reference
    if (finite && mz > -INFINITY) {
      pick = draw_code(row, V, [&](float raw) { return zf(xf(raw)); }, mz, kbias, rng::draw_at(rk, 0u), Sz, sh);
    }
  }
  const float x_pick = greedy ? mi.m : xf(row.at(pick));
  *code = finite ? pick : 0;
  *lp = finite ? rng::fsub(rng::fsub(x_pick, mi.m), rng::lse_rel_from_sum(S, inv_scale)) : -INFINITY;
}

// ---------------------------------------------------------------------------------------------
// kernel A

template <typename T, bool kHasUnc>
__global__ void __launch_bounds__(kThreads)
    masked_step_sample_kernel(const T* __restrict__ cond, const T* __restrict__ unc, int64_t stride_c, int64_t stride_u,
                              const int64_t* __restrict__ tokens_in, bool tokens_i32,
                              const bool* __restrict__ is_masked, const int64_t* __restrict__ sample_ids,
                              const float* __restrict__ thr, int64_t L, int64_t V, float a, float s, float temperature,
                              float tau, bool greedy, bool has_noise, rng::KeyPair k_token, rng::KeyPair k_conf,
                              int32_t kbias, float inv_scale, int64_t* __restrict__ sampled, float* __restrict__ conf) {
  __shared__ Shared sh;
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
  const Logits<T, kHasUnc> row{cond + unit * stride_c, kHasUnc ? unc + unit * stride_u : nullptr, a, s};
  const bool has_thr = thr != nullptr;
  const float th = has_thr ? thr[unit] : -INFINITY;
  const bool tempered = !greedy && temperature != 1.0f;
  auto xf = [=](float raw) {
    const float x = sanitize(raw);
    return has_thr && !(x >= th) ? -INFINITY : x;
  };
  auto zf = [=](float x) { return tempered ? scale(x, temperature) : x; };
  int64_t code;
  float lp;
  sample_row(row, V, xf, zf, greedy, tempered, kbias, inv_scale, rng::row_keys(k_token, sid, pos), sh, &code, &lp);
  if (threadIdx.x == 0) {
    if (has_noise) lp = rng::fadd(lp, rng::fmul(tau, rng::gumbel_at(rng::row_keys(k_conf, sid, pos), 0u)));
    sampled[unit] = code;
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
                     const int64_t* __restrict__ position, const float* __restrict__ thr, float temperature,
                     bool greedy, rng::KeyPair k_token, int32_t kbias, float inv_scale, int64_t* __restrict__ tokens,
                     float* __restrict__ logprobs) {
  __shared__ Shared sh;
  const int64_t r = blockIdx.x;
  const uint32_t sid = static_cast<uint32_t>(sample_ids[r]);
  const uint32_t pos = static_cast<uint32_t>(position[r]);
  const Logits<T, false> row{logits + r * stride, nullptr, 0.f, 0.f};
  const bool has_thr = thr != nullptr;
  const float th = has_thr ? thr[r] : -INFINITY;
  const bool tempered = !greedy && temperature != 1.0f;
  auto xf = [](float raw) { return sanitize(raw); };
  auto zf = [=](float x) {
    const float z = tempered ? scale(x, temperature) : x;
    return has_thr && !(z >= th) ? -INFINITY : z;
  };
  int64_t code;
  float lp;
  sample_row(row, V, xf, zf, greedy, !greedy && (tempered || has_thr), kbias, inv_scale,
             rng::row_keys(k_token, sid, pos), sh, &code, &lp);
  if (threadIdx.x == 0) {
    tokens[r] = code;
    logprobs[r] = lp;
  }
}

}  // namespace sampling
}  // namespace unif2ace::cuda
