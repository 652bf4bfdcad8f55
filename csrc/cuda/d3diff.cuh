// D3Diff loss row kernels on the GPU (torch-free device code): per-row max, log-sum-exp relative to
// it and target logit (forward), softmax/one-hot gradient (backward). The loss itself is assembled
// in PyTorch from the three [N] vectors (unif2ace/kernels/_custom_ops/d3diff.py, RowStats); contract
// as csrc/cpu/d3diff.cpp and docs/kernels.md §A:
//
//   lse_gather:          m_i = max_v x_iv, r_i = log sum_v exp(x_iv - m_i), tgt_i = x_i[t_i];
//                        0, 0, 0 where t_i == ignore_index (the row is not read); tgt_i = NaN for a
//                        target outside [0, V) (never read out of bounds); NaN in a row reaches r_i
//                        (fmaxf skips it in the max, the sums keep it); a row without a value
//                        above -inf gets m = r = -inf (the rescale is guarded, no -inf - (-inf))
//   lse_gather_backward: g_iv = grad_lse_i * exp((x_iv - m_i) - r_i) + grad_tgt_i * [v == t_i]
//                        (0 on ignored rows; no one-hot term for an out-of-range target)
//
// Geometry: ROW_THREADS threads per row (32: one warp, for small V; 256/512: a CTA), ROWS rows
// per CTA. Loads and stores are 128-bit vectors of VEC = 16 / sizeof(T) elements: a scalar head
// up to the first 16-byte boundary of the row, the vector body, a scalar tail (rows of any
// length, any element offset). fp32 math on every dtype: per-thread online (max, sum-exp),
// merged with warp shuffles and, for CTA rows, one shared-memory round. 64-bit indexing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include <math_constants.h>
#include "cuda/common.cuh"

namespace unif2ace::cuda {
namespace d3diff {

// 16 bytes of T, loaded/stored as one uint4.
template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// Running (max, sum of exp(x - max)); m = -inf means nothing above -inf so far (s = 0, or NaN
// once a NaN was folded in: fmaxf skips NaN in m, the sum keeps it).
struct MaxSum {
  float m;
  float s;
};

// The shift of the sums: the max, or 0 while it is -inf (every term is then 0 or NaN: no
// -inf - (-inf) turns an empty or all -inf part into a NaN, and a NaN is not dropped).
__device__ __forceinline__ float shift_of(float m) { return m == -CUDART_INF_F ? 0.0f : m; }

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  const float sh = shift_of(m);
  return MaxSum{m, a.s * expf(a.m - sh) + b.s * expf(b.m - sh)};
}

// Fold k values (already fp32) into the running pair: one rescale per group.
template <int K>
__device__ __forceinline__ void fold(MaxSum& acc, const float (&x)[K]) {
  float gm = x[0];
#pragma unroll
  for (int k = 1; k < K; ++k) gm = fmaxf(gm, x[k]);
  const float m = fmaxf(acc.m, gm);
  const float sh = shift_of(m);
  float s = acc.s * expf(acc.m - sh);
#pragma unroll
  for (int k = 0; k < K; ++k) s += expf(x[k] - sh);
  acc = MaxSum{m, s};
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum b;
    b.m = __shfl_xor_sync(0xffffffffu, a.m, off);
    b.s = __shfl_xor_sync(0xffffffffu, a.s, off);
    a = merge(a, b);
  }
  return a;
}

// Elements before the first 16-byte boundary of p (0 .. VEC-1), capped at n.
template <typename T>
__device__ __forceinline__ int64_t head_len(const T* p, int64_t n) {
  constexpr int VEC = Vec<T>::N;
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) & 15u) / sizeof(T));
  const int64_t h = mis == 0 ? 0 : VEC - mis;
  return h < n ? h : n;
}

// (max, sum-exp) of one row across the ROW_THREADS threads of this row; `lane` in [0, ROW_THREADS).
template <typename T, int ROW_THREADS>
__device__ __forceinline__ MaxSum row_maxsum_thread(const T* __restrict__ row, int64_t V, int lane) {
  constexpr int VEC = Vec<T>::N;
  MaxSum acc{-CUDART_INF_F, 0.0f};
  const int64_t head = head_len(row, V);
  if (lane < head) {
    const float x[1] = {to_f32(row[lane])};
    fold<1>(acc, x);
  }
  const int64_t nvec = (V - head) / VEC;
  const Vec<T>* body = reinterpret_cast<const Vec<T>*>(row + head);
  for (int64_t j = lane; j < nvec; j += ROW_THREADS) {
    Vec<T> raw;
    *reinterpret_cast<uint4*>(&raw) = __ldg(reinterpret_cast<const uint4*>(body + j));
    float x[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[k] = to_f32(raw.v[k]);
    fold<VEC>(acc, x);
  }
  for (int64_t v = head + nvec * VEC + lane; v < V; v += ROW_THREADS) {
    const float x[1] = {to_f32(row[v])};
    fold<1>(acc, x);
  }
  return acc;
}

// Merge across the row's threads. For ROW_THREADS > 32 the row owns the whole CTA (ROWS == 1);
// `smem` holds ROW_THREADS / 32 pairs. Every thread of the row gets the result.
template <int ROW_THREADS>
__device__ __forceinline__ MaxSum row_reduce(MaxSum acc, MaxSum* smem) {
  acc = warp_merge(acc);
  if constexpr (ROW_THREADS > 32) {
    constexpr int WARPS = ROW_THREADS / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) smem[warp] = acc;
    __syncthreads();
    MaxSum r = lane < WARPS ? smem[lane] : MaxSum{-CUDART_INF_F, 0.0f};
    r = warp_merge(r);
    __syncthreads();  // smem may be reused by the caller
    return r;
  } else {
    return acc;
  }
}

template <typename T, int ROW_THREADS, int ROWS>
__global__ void __launch_bounds__(ROW_THREADS* ROWS)
    lse_gather_kernel(const T* __restrict__ logits, int64_t ld, const int64_t* __restrict__ target, int64_t N,
                      int64_t V, int64_t ignore_index, float* __restrict__ row_max, float* __restrict__ lse_rel,
                      float* __restrict__ tgt) {
  static_assert(ROW_THREADS == 32 || ROWS == 1, "CTA-wide rows take the whole CTA");
  __shared__ MaxSum smem[ROW_THREADS > 32 ? ROW_THREADS / 32 : 1];
  const int lane = threadIdx.x % ROW_THREADS;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / ROW_THREADS;
  if (i >= N) return;  // whole rows (warps / the CTA) exit together
  const int64_t t = target[i];
  if (t == ignore_index) {
    if (lane == 0) {
      row_max[i] = 0.0f;
      lse_rel[i] = 0.0f;
      tgt[i] = 0.0f;
    }
    return;
  }
  const T* row = logits + i * ld;
  const MaxSum r = row_reduce<ROW_THREADS>(row_maxsum_thread<T, ROW_THREADS>(row, V, lane), smem);
  if (lane == 0) {
    row_max[i] = r.m;
    lse_rel[i] = logf(r.s);
    tgt[i] = (t >= 0 && t < V) ? to_f32(row[t]) : CUDART_NAN_F;
  }
}

template <typename T>
__device__ __forceinline__ T grad_at(float x, float mx, float lrel, float gl, float gt, int64_t v, int64_t t) {
  float g = gl * expf((x - mx) - lrel);
  if (v == t) g += gt;
  return from_f32<T>(g);
}

// out is a contiguous [N, V] tensor; vectorised when the input row and the output row have the
// same offset from a 16-byte boundary (always for contiguous logits), else scalar (coalesced).
template <typename T, int ROW_THREADS, int ROWS>
__global__ void __launch_bounds__(ROW_THREADS* ROWS)
    lse_gather_backward_kernel(const T* __restrict__ logits, int64_t ld, const int64_t* __restrict__ target,
                               const float* __restrict__ row_max, const float* __restrict__ lse_rel,
                               const float* __restrict__ grad_lse, const float* __restrict__ grad_tgt, int64_t N,
                               int64_t V, int64_t ignore_index, T* __restrict__ out) {
  static_assert(ROW_THREADS == 32 || ROWS == 1, "CTA-wide rows take the whole CTA");
  constexpr int VEC = Vec<T>::N;
  const int lane = threadIdx.x % ROW_THREADS;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / ROW_THREADS;
  if (i >= N) return;
  const int64_t t = target[i];
  T* orow = out + i * V;
  const int64_t head = head_len(orow, V);
  const int64_t nvec = (V - head) / VEC;
  Vec<T>* obody = reinterpret_cast<Vec<T>*>(orow + head);
  if (t == ignore_index) {
    const T z = from_f32<T>(0.0f);
    for (int64_t v = lane; v < head; v += ROW_THREADS) orow[v] = z;
    Vec<T> zv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) zv.v[k] = z;
    for (int64_t j = lane; j < nvec; j += ROW_THREADS) {
      *reinterpret_cast<uint4*>(obody + j) = *reinterpret_cast<const uint4*>(&zv);
    }
    for (int64_t v = head + nvec * VEC + lane; v < V; v += ROW_THREADS) orow[v] = z;
    return;
  }
  const T* row = logits + i * ld;
  const float mx = row_max[i], lrel = lse_rel[i], gl = grad_lse[i], gt = grad_tgt[i];
  const bool same_phase = ((reinterpret_cast<uintptr_t>(row) ^ reinterpret_cast<uintptr_t>(orow)) & 15u) == 0;
  if (!same_phase) {
    for (int64_t v = lane; v < V; v += ROW_THREADS) orow[v] = grad_at<T>(to_f32(row[v]), mx, lrel, gl, gt, v, t);
    return;
  }
  for (int64_t v = lane; v < head; v += ROW_THREADS) orow[v] = grad_at<T>(to_f32(row[v]), mx, lrel, gl, gt, v, t);
  const Vec<T>* ibody = reinterpret_cast<const Vec<T>*>(row + head);
  for (int64_t j = lane; j < nvec; j += ROW_THREADS) {
    Vec<T> raw, res;
    *reinterpret_cast<uint4*>(&raw) = __ldg(reinterpret_cast<const uint4*>(ibody + j));
    const int64_t v0 = head + j * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) res.v[k] = grad_at<T>(to_f32(raw.v[k]), mx, lrel, gl, gt, v0 + k, t);
    *reinterpret_cast<uint4*>(obody + j) = *reinterpret_cast<const uint4*>(&res);
  }
  for (int64_t v = head + nvec * VEC + lane; v < V; v += ROW_THREADS) {
    orow[v] = grad_at<T>(to_f32(row[v]), mx, lrel, gl, gt, v, t);
  }
}

}  // namespace d3diff
}  // namespace unif2ace::cuda
