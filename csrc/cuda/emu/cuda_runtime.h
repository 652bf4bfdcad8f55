// The CUDA runtime as seen by the device code, emulated on the CPU (test-only; issue 17).
//
// This directory shadows the toolkit's <cuda_runtime.h>, <cuda_bf16.h>, <cuda_fp16.h> and
// <math_constants.h> (put it first on the include path and define UNIF2ACE_CUDA_EMU), so that the
// torch-free device code csrc/cuda/*.cuh and the unchanged bindings csrc/cuda/*.cu compile with g++
// and run on CPU tensors. unif2ace/testing/cuda_emu.py builds them into the test-only library
// torch.ops.unif2ace_cuda_emu; it is never a user backend. Only what the kernels use is here.
//
// Execution model (csrc/cuda/emu/emu.cpp):
//   - a launch runs its blocks one after another on the calling thread (deterministic; pytest
//     runs files in parallel already); inside a block every CUDA thread is a fiber with its own
//     stack, scheduled cooperatively: a fiber runs until it reaches __syncthreads(), a warp
//     primitive or its end. So barriers and warp exchanges are real rendezvous, not lockstep
//     assumptions, and the order in which threads run between them can be changed
//     (UNIF2ACE_EMU_ORDER=forward|reverse|random) to expose races on shared memory;
//   - misuse is an error (a C++ exception -> RuntimeError naming the kernel, block, threads and
//     source lines), never a hang: a divergent __syncthreads (threads waiting at different
//     barriers), a deadlock (no thread can proceed, e.g. a warp exchange whose partner waits at
//     a barrier), a warp mask naming an exited or non-existent lane or not the caller,
//     lanes of one mask meeting at different warp primitives, an invalid launch configuration,
//     dynamic shared memory over the limit (48 KiB unless opted in with cudaFuncSetAttribute;
//     227 KiB on sm_90), a launch running longer than UNIF2ACE_EMU_TIMEOUT_S (default 120 s; a
//     thread that never yields is caught by a watchdog that aborts the process instead of
//     hanging CI);
//   - exited threads leave barriers (as on sm_70+); shuffles follow PTX shfl.sync exactly
//     (width segments, out-of-segment sources return the caller's value); a source lane outside
//     the mask gives all-ones bits (NaN / -1: "undefined" on the GPU); __activemask() returns
//     the lanes of the warp that reach it together: its callers wait until every other live lane
//     of the warp has either called it too or blocked elsewhere (those count as diverged);
//   - static __shared__ variables are thread_local statics (one block runs at a time per OS
//     thread); dynamic shared memory is a per-launch buffer, filled with 0xff bytes at the start
//     of every block, reached through UNIF2ACE_DYNAMIC_SHARED (csrc/cuda/common.cuh) because g++
//     cannot express a block-scope `extern __shared__ T x[]`.
// Numerics: fp32/fp64 arithmetic is IEEE on both sides, but nvcc contracts a * b + c into FMAs by
// default and this build does not (-ffp-contract=off), and libdevice's expf / logf / exp / log /
// log1p differ from glibc's by up to 1-2 ulp: results agree to the GPU tests' tolerances, not
// bitwise (bf16/fp16 conversions and the __f*_rn intrinsics are bit-exact). Float atomics run
// in program order, so they are deterministic here and not on the GPU.
#pragma once

#ifndef UNIF2ACE_CUDA_EMU
#error \
    "csrc/cuda/emu emulates CUDA on the CPU for tests: build it with -DUNIF2ACE_CUDA_EMU (unif2ace/testing/cuda_emu.py)"
#endif

#include <math.h>  // expf, logf, ... and isnan in the global namespace, as in device code

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ thread_local  // block scope: a static per OS thread = per running block

// ------------------------------------------------------------------------------ vector types
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// ------------------------------------------------------------------------------ runtime API
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace unif2ace::emu {

// What device code sees of the running CUDA thread.
struct ThreadCtx {
  uint3 tid;   // threadIdx
  uint3 bid;   // blockIdx
  dim3 bdim;   // blockDim
  dim3 gdim;   // gridDim
  int linear;  // x + y * Dx + z * Dx * Dy: warp = linear / 32, lane = linear % 32
};
ThreadCtx& current();  // raises outside a kernel

void syncthreads(const char* file, int line);

enum class WarpOp : int {
  kShflIdx,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
  kMatchAny,
  kSyncwarp,
  kActivemask
};
// One lane's part of a warp primitive: blocks until every lane of `mask` has arrived, returns
// this lane's result (bits of the exchanged value, or the vote).
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);
unsigned active_mask(const char* file, int line);
void* dynamic_shared_base();
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);

using KernelThunk = void (*)(const void* kernel, void* params);
void run_grid(const void* kernel, KernelThunk thunk, void* params, dim3 grid, dim3 block, size_t smem);

// kernel<<<grid, block, smem>>>(args...): the arguments are converted to the kernel's parameter
// types once, and every CUDA thread calls the kernel with its own copy (by value, as on the GPU).
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  using Params = std::tuple<std::decay_t<P>...>;
  Params params(std::forward<A>(args)...);
  KernelThunk thunk = [](const void* k, void* p) {
    std::apply(reinterpret_cast<void (*)(P...)>(const_cast<void*>(k)), *static_cast<Params*>(p));
  };
  run_grid(reinterpret_cast<const void*>(kernel), thunk, &params, grid, block, smem);
}

template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_base());
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp primitives exchange 1..8-byte values");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace unif2ace::emu

#define threadIdx (::unif2ace::emu::current().tid)
#define blockIdx (::unif2ace::emu::current().bid)
#define blockDim (::unif2ace::emu::current().bdim)
#define gridDim (::unif2ace::emu::current().gdim)
constexpr int warpSize = 32;

template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::unif2ace::emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}

// ------------------------------------------------------------------------------ synchronisation
// The call site (file, line) travels as default arguments: barriers must be reached at the same
// __syncthreads() by every thread, and error messages name where each thread waits.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::unif2ace::emu::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::unif2ace::emu::warp_op(::unif2ace::emu::WarpOp::kSyncwarp, mask, 0, 0, 32, file, line);
}
inline unsigned __activemask(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::unif2ace::emu::active_mask(file, line);
}

// ------------------------------------------------------------------------------ warp primitives
#define UNIF2ACE_EMU_SHFL(NAME, OP)                                                                       \
  template <typename T>                                                                                   \
  inline T NAME(unsigned mask, T var, int arg, int width = warpSize, const char* file = __builtin_FILE(), \
                int line = __builtin_LINE()) {                                                            \
    return ::unif2ace::emu::from_bits<T>(::unif2ace::emu::warp_op(                                        \
        ::unif2ace::emu::WarpOp::OP, mask, ::unif2ace::emu::to_bits(var), arg, width, file, line));       \
  }
UNIF2ACE_EMU_SHFL(__shfl_sync, kShflIdx)
UNIF2ACE_EMU_SHFL(__shfl_up_sync, kShflUp)
UNIF2ACE_EMU_SHFL(__shfl_down_sync, kShflDown)
UNIF2ACE_EMU_SHFL(__shfl_xor_sync, kShflXor)
#undef UNIF2ACE_EMU_SHFL

inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(
      ::unif2ace::emu::warp_op(::unif2ace::emu::WarpOp::kBallot, mask, pred != 0, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(::unif2ace::emu::warp_op(::unif2ace::emu::WarpOp::kAny, mask, pred != 0, 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(::unif2ace::emu::warp_op(::unif2ace::emu::WarpOp::kAll, mask, pred != 0, 0, 32, file, line));
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value, const char* file = __builtin_FILE(),
                                 int line = __builtin_LINE()) {
  static_assert(std::is_arithmetic_v<T> && sizeof(T) >= 4, "__match_any_sync takes 32/64-bit ints and floats");
  return static_cast<unsigned>(::unif2ace::emu::warp_op(::unif2ace::emu::WarpOp::kMatchAny, mask,
                                                        ::unif2ace::emu::to_bits(value), 0, 32, file, line));
}

// ------------------------------------------------------------------------------ bit intrinsics
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}

// ------------------------------------------------------------------------------ atomics
// std::atomic_ref is C++20 and the real build is C++17: these are the GCC builtins it is made of
// (sequentially consistent here; the GPU's are relaxed, which only allows more interleavings).
namespace unif2ace::emu {
template <typename T, typename F>
inline T atomic_update(T* p, F f) {  // CAS loop: returns the old value
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (!__atomic_compare_exchange_n(p, &old, f(old), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename F, typename T>
inline T atomic_update_fp(T* p, F f) {  // float/double: CAS on the bits
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U* q = reinterpret_cast<U*>(p);
  return from_bits<T>(atomic_update(q, [&](U old) { return static_cast<U>(to_bits(f(from_bits<T>(old)))); }));
}
}  // namespace unif2ace::emu

#define UNIF2ACE_EMU_ATOMIC_INT(T)                                                          \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }      \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }    \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }      \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }        \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }      \
  inline T atomicMax(T* p, T v) {                                                           \
    return ::unif2ace::emu::atomic_update(p, [v](T o) { return o < v ? v : o; });           \
  }                                                                                         \
  inline T atomicMin(T* p, T v) {                                                           \
    return ::unif2ace::emu::atomic_update(p, [v](T o) { return v < o ? v : o; });           \
  }                                                                                         \
  inline T atomicCAS(T* p, T compare, T v) {                                                \
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    return compare; /* the old value either way */                                          \
  }
UNIF2ACE_EMU_ATOMIC_INT(int)
UNIF2ACE_EMU_ATOMIC_INT(unsigned int)
UNIF2ACE_EMU_ATOMIC_INT(unsigned long long)
#undef UNIF2ACE_EMU_ATOMIC_INT
inline long long atomicMax(long long* p, long long v) {
  return ::unif2ace::emu::atomic_update(p, [v](long long o) { return o < v ? v : o; });
}
inline long long atomicMin(long long* p, long long v) {
  return ::unif2ace::emu::atomic_update(p, [v](long long o) { return v < o ? v : o; });
}
inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
inline unsigned int atomicSub(unsigned int* p, unsigned int v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
inline float atomicAdd(float* p, float v) {
  return ::unif2ace::emu::atomic_update_fp(p, [v](float o) { return o + v; });
}
inline double atomicAdd(double* p, double v) {
  return ::unif2ace::emu::atomic_update_fp(p, [v](double o) { return o + v; });
}
inline float atomicExch(float* p, float v) {
  return ::unif2ace::emu::atomic_update_fp(p, [v](float) { return v; });
}

// ------------------------------------------------------------------------------ arithmetic intrinsics
// The *_rn forms are single IEEE operations (round to nearest even), never contracted: what nvcc
// guarantees for them, and what every float operation is in this build (-ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

inline int __float_as_int(float x) { return ::unif2ace::emu::from_bits<int>(::unif2ace::emu::to_bits(x)); }
inline unsigned int __float_as_uint(float x) {
  return ::unif2ace::emu::from_bits<unsigned int>(::unif2ace::emu::to_bits(x));
}
inline float __int_as_float(int x) { return ::unif2ace::emu::from_bits<float>(::unif2ace::emu::to_bits(x)); }
inline float __uint_as_float(unsigned int x) { return ::unif2ace::emu::from_bits<float>(::unif2ace::emu::to_bits(x)); }
inline long long __double_as_longlong(double x) {
  return ::unif2ace::emu::from_bits<long long>(::unif2ace::emu::to_bits(x));
}
inline double __longlong_as_double(long long x) {
  return ::unif2ace::emu::from_bits<double>(::unif2ace::emu::to_bits(x));
}

// Read-only data cache load: a plain load on the CPU.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
