// Device helpers shared by every CUDA kernel header (torch-free): dtype conversions to and from
// the fp32 the kernels compute in, and full-warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Dynamic shared memory (the launch's smem bytes) as `T* name`: `extern __shared__ T name[]` on
// the GPU; the CPU emulator (csrc/cuda/emu) hands out its per-block buffer instead, since a
// block-scope `extern __shared__` array has no host C++ equivalent.
#ifdef UNIF2ACE_CUDA_EMU
#define UNIF2ACE_DYNAMIC_SHARED(T, name) T* const name = ::unif2ace::emu::dynamic_shared<T>()
#else
#define UNIF2ACE_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace unif2ace::cuda {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// fp32 -> T, round to nearest even
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// sum / max over the 32 lanes of a full warp; every lane gets the result
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

}  // namespace unif2ace::cuda
