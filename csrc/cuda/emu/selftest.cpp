// Self-test kernels of the CPU emulator (tests/test_cuda_emu.py), registered as
// torch.ops.unif2ace_cuda_emu._emu_*; compiled into the emulated library only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "cuda/dispatch.h"

namespace unif2ace::emu {
namespace {

// ------------------------------------------------------------------------------ warp primitives
// One block of `n` threads; every warp calls the primitive with the same `mask` (lanes outside it
// skip and keep their input). Shuffles exchange `x` (any of int32/int64/float32/float64/float16/
// bfloat16), votes use x != 0, match uses x.
enum Op { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kMatch, kActive };

template <typename T>
__global__ void warp_kernel(int op, unsigned mask, int arg, int width, const T* x, int64_t* vote, T* out) {
  const int t = threadIdx.x, lane = t % 32;
  out[t] = x[t];
  vote[t] = -1;
  if (!((mask >> lane) & 1u)) return;
  switch (op) {
    case kShfl:
      out[t] = __shfl_sync(mask, x[t], arg, width);
      break;
    case kShflUp:
      out[t] = __shfl_up_sync(mask, x[t], arg, width);
      break;
    case kShflDown:
      out[t] = __shfl_down_sync(mask, x[t], arg, width);
      break;
    case kShflXor:
      out[t] = __shfl_xor_sync(mask, x[t], arg, width);
      break;
    case kBallot:
      vote[t] = __ballot_sync(mask, to_bits(x[t]) != 0);
      break;
    case kAny:
      vote[t] = __any_sync(mask, to_bits(x[t]) != 0);
      break;
    case kAll:
      vote[t] = __all_sync(mask, to_bits(x[t]) != 0);
      break;
    case kMatch:
      if constexpr (sizeof(T) >= 4) vote[t] = __match_any_sync(mask, x[t]);
      break;
    default:
      vote[t] = __activemask();
      break;
  }
}

std::tuple<at::Tensor, at::Tensor> warp_op_test(const std::string& name, const at::Tensor& x, int64_t mask, int64_t arg,
                                                int64_t width) {
  static const char* names[] = {"shfl", "shfl_up", "shfl_down", "shfl_xor", "ballot", "any", "all", "match", "active"};
  int op = -1;
  for (int i = 0; i < 9; ++i) {
    if (name == names[i]) op = i;
  }
  TORCH_CHECK(op >= 0, "unknown warp op ", name);
  TORCH_CHECK(x.is_cpu() && x.dim() == 1 && x.is_contiguous(), "x must be a contiguous CPU vector");
  const int n = static_cast<int>(x.size(0));
  at::Tensor out = at::empty_like(x);
  at::Tensor vote = at::empty({n}, x.options().dtype(at::kLong));
  const unsigned m = static_cast<unsigned>(mask);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    launch(warp_kernel<T>, 1, n, 0, op, m, static_cast<int>(arg), static_cast<int>(width),
           reinterpret_cast<const T*>(x.const_data_ptr()), vote.mutable_data_ptr<int64_t>(),
           reinterpret_cast<T*>(out.mutable_data_ptr()));
  };
  TORCH_CHECK((cuda::dispatch_types<int, int64_t, float, double, at::Half, at::BFloat16>(x.scalar_type(), run)),
              "unsupported dtype ", x.scalar_type());
  return {out, vote};
}

// ------------------------------------------------------------------------------ barriers, shared memory
// Per-block sums of x [blocks * n] by a shared-memory tree (one barrier per level) in static or
// dynamic shared memory; a 3-D block exercises the thread numbering.
__global__ void block_sum_kernel(const float* x, float* out, bool dynamic) {
  __shared__ float st[1024];
  float* dyn = dynamic_shared<float>();
  float* s = dynamic ? dyn : st;
  const int n = blockDim.x * blockDim.y * blockDim.z;
  const int t = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
  s[t] = x[blockIdx.x * n + t];
  __syncthreads();
  for (int half = 1; half < n; half <<= 1) {
    float v = 0.f;
    if (t % (2 * half) == 0 && t + half < n) v = s[t] + s[t + half];
    __syncthreads();
    if (t % (2 * half) == 0 && t + half < n) s[t] = v;
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

at::Tensor block_sum_test(const at::Tensor& x, int64_t bx, int64_t by, int64_t bz, bool dynamic) {
  const int64_t n = bx * by * bz, blocks = x.numel() / n;
  at::Tensor out = at::empty({blocks}, x.options());
  launch(block_sum_kernel, dim3(static_cast<unsigned>(blocks)),
         dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by), static_cast<unsigned>(bz)),
         dynamic ? n * sizeof(float) : 0, x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), dynamic);
  return out;
}

// Writes (threadIdx, blockIdx, blockDim, gridDim, lane, warp) of every thread: [threads, 14].
__global__ void geometry_kernel(int64_t* out) {
  const int64_t block = blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y;
  const int64_t n = blockDim.x * blockDim.y * blockDim.z;
  const int64_t t = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
  int64_t* o = out + (block * n + t) * 14;
  const int64_t v[14] = {
      threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z, blockDim.x,
      blockDim.y,  blockDim.z,  gridDim.x,   gridDim.y,  gridDim.z,  t % 32,     __popc(__activemask())};
  for (int i = 0; i < 14; ++i) o[i] = v[i];
}

at::Tensor geometry_test(std::vector<int64_t> grid, std::vector<int64_t> block) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "grid and block are 3 ints each");
  const int64_t total = grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2];
  at::Tensor out = at::zeros({std::max<int64_t>(total, 1), 14}, at::kLong);
  auto u = [](int64_t v) { return static_cast<unsigned>(v); };
  launch(geometry_kernel, dim3(u(grid[0]), u(grid[1]), u(grid[2])), dim3(u(block[0]), u(block[1]), u(block[2])), 0,
         out.mutable_data_ptr<int64_t>());
  return out;
}

// ------------------------------------------------------------------------------ atomics
// [blocks x threads] threads; each adds / maxes / mins / CASes into the accumulators of out:
// int add, unsigned add, ull add, float add, double add, int max, int min, CAS counter, exch, or, xor,
// sub, unsigned max.
__global__ void atomics_kernel(int* i, unsigned* u, unsigned long long* ull, float* f, double* d) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&i[0], 1);
  atomicAdd(&u[0], 2u);
  atomicAdd(&ull[0], 3ull);
  atomicAdd(&f[0], 0.5f);
  atomicAdd(&d[0], 0.25);
  atomicMax(&i[1], t);
  atomicMin(&i[2], -t);
  int old = i[3], seen;
  while ((seen = atomicCAS(&i[3], old, old + 1)) != old) old = seen;
  atomicExch(&i[4], 7);
  atomicOr(&u[1], 1u << (t % 32));
  atomicXor(&u[2], 1u << (t % 32));
  atomicSub(&i[5], 2);
  atomicMax(&u[3], static_cast<unsigned>(t) * 3u);
  atomicAnd(&u[4], ~(1u << (t % 32)));
}

std::vector<at::Tensor> atomics_test(int64_t blocks, int64_t threads) {
  at::Tensor i = at::zeros({6}, at::kInt), u = at::zeros({5}, at::kInt), ull = at::zeros({1}, at::kLong);
  at::Tensor f = at::zeros({1}, at::kFloat), d = at::zeros({1}, at::kDouble);
  u.fill_(0);
  u[4].fill_(-1);
  launch(atomics_kernel, static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, i.mutable_data_ptr<int>(),
         reinterpret_cast<unsigned*>(u.mutable_data_ptr<int>()),
         reinterpret_cast<unsigned long long*>(ull.mutable_data_ptr<int64_t>()), f.mutable_data_ptr<float>(),
         d.mutable_data_ptr<double>());
  return {i, u, ull, f, d};
}

// ------------------------------------------------------------------------------ faults
// Kernels that misuse the programming model; each launch must end in a clear error.
__global__ void fault_kernel(int which, int* out) {
  const int t = threadIdx.x, lane = t % 32;
  switch (which) {
    case 0:  // divergent barrier: two different __syncthreads()
      if (t < 16) {
        __syncthreads();
      } else {
        __syncthreads();
      }
      break;
    case 1:  // half a warp at a barrier, the other half in a full-warp shuffle: deadlock
      if (lane < 16) {
        __syncthreads();
      } else {
        out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
      }
      break;
    case 2:  // lane 0 exits, the others shuffle with a full mask
      if (lane == 0) return;
      out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
      break;
    case 3:  // the caller is not in its mask
      out[t] = __shfl_sync(0xfffffffeu, t, 1);
      break;
    case 4:  // lanes of one mask at different primitives
      if (lane < 16) {
        out[t] = __ballot_sync(0xffffffffu, 1);
      } else {
        out[t] = __shfl_sync(0xffffffffu, t, 0);
      }
      break;
    case 5:  // a full mask in a partial warp (blockDim 48): lanes 16..31 of warp 1 do not exist
      out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
      break;
    case 6:  // livelock: lanes spin on a flag nobody sets, synchronising all along
      while (__ldg(&out[1023]) == 0) __syncwarp();
      break;
    case 7:  // race: read a neighbour's shared-memory slot without a barrier
    {
      int* s = dynamic_shared<int>();
      s[t] = t;
      out[t] = s[(t + 1) % blockDim.x];
      break;
    }
    case 8:  // a width that is not a power of two
      out[t] = __shfl_down_sync(0xffffffffu, t, 1, 12);
      break;
    default:  // dynamic shared memory: writes all of it
    {
      int* s = dynamic_shared<int>();
      s[t] = t;
      __syncthreads();
      out[t] = s[(t + 1) % blockDim.x];
      break;
    }
  }
}

at::Tensor fault_test(int64_t which, int64_t threads, int64_t smem, int64_t opt_in) {
  at::Tensor out = at::zeros({1024}, at::kInt);
  if (opt_in > 0) cudaFuncSetAttribute(fault_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in);
  launch(fault_kernel, 1, static_cast<unsigned>(threads), static_cast<size_t>(smem), static_cast<int>(which),
         out.mutable_data_ptr<int>());
  if (opt_in > 0) cudaFuncSetAttribute(fault_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 << 10);
  return out;
}

// ------------------------------------------------------------------------------ host-side intrinsics
// fp32 -> (bf16 bits, fp16 bits) and back; the bit intrinsics; the *_rn arithmetic.
std::tuple<at::Tensor, at::Tensor> narrow_test(const at::Tensor& x) {
  const at::Tensor xc = x.contiguous();
  at::Tensor b = at::empty(x.sizes(), at::kShort), h = at::empty(x.sizes(), at::kShort);
  const float* p = xc.const_data_ptr<float>();
  int16_t* pb = b.mutable_data_ptr<int16_t>();
  int16_t* ph = h.mutable_data_ptr<int16_t>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    pb[i] = static_cast<int16_t>(__float2bfloat16_rn(p[i]).__x);
    ph[i] = static_cast<int16_t>(__float2half_rn(p[i]).__x);
  }
  return {b, h};
}

std::tuple<at::Tensor, at::Tensor> widen_test(const at::Tensor& bits) {
  const at::Tensor bc = bits.contiguous();
  at::Tensor fb = at::empty(bits.sizes(), at::kFloat), fh = at::empty(bits.sizes(), at::kFloat);
  const int16_t* p = bc.const_data_ptr<int16_t>();
  for (int64_t i = 0; i < bits.numel(); ++i) {
    const unsigned short u = static_cast<unsigned short>(p[i]);
    fb.mutable_data_ptr<float>()[i] = __bfloat162float(__nv_bfloat16{u});
    fh.mutable_data_ptr<float>()[i] = __half2float(__half{u});
  }
  return {fb, fh};
}

at::Tensor bits_test(const at::Tensor& x) {  // int64 in -> [n, 7]: popc, ffs, clz, popcll, ffsll, clzll, brev
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.numel(), 7}, at::kLong);
  const int64_t* p = xc.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const auto lo = static_cast<unsigned>(p[i]);
    const int64_t v[7] = {__popc(lo),
                          __ffs(static_cast<int>(lo)),
                          __clz(static_cast<int>(lo)),
                          __popcll(static_cast<unsigned long long>(p[i])),
                          __ffsll(p[i]),
                          __clzll(p[i]),
                          static_cast<int64_t>(__brev(lo))};
    for (int k = 0; k < 7; ++k) o[i * 7 + k] = v[k];
  }
  return out;
}

at::Tensor fp_test(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {  // [n, 6] fp32
  at::Tensor out = at::empty({a.numel(), 6}, at::kFloat);
  const float *pa = a.const_data_ptr<float>(), *pb = b.const_data_ptr<float>(), *pc = c.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < a.numel(); ++i) {
    const float v[6] = {__fadd_rn(pa[i], pb[i]),        __fsub_rn(pa[i], pb[i]),
                        __fmul_rn(pa[i], pb[i]),        __fdiv_rn(pa[i], pb[i]),
                        __fmaf_rn(pa[i], pb[i], pc[i]), __int_as_float(__float_as_int(pa[i]) ^ 0x80000000)};
    for (int k = 0; k < 6; ++k) o[i * 6 + k] = v[k];
  }
  return out;
}

}  // namespace
}  // namespace unif2ace::emu

TORCH_LIBRARY_FRAGMENT(unif2ace_cuda_emu, m) {
  using namespace unif2ace::emu;
  m.def("_emu_warp(str op, Tensor x, int mask, int arg, int width) -> (Tensor, Tensor)", &warp_op_test);
  m.def("_emu_block_sum(Tensor x, int bx, int by, int bz, bool dynamic) -> Tensor", &block_sum_test);
  m.def("_emu_geometry(int[] grid, int[] block) -> Tensor", &geometry_test);
  m.def("_emu_atomics(int blocks, int threads) -> Tensor[]", &atomics_test);
  m.def("_emu_fault(int which, int threads, int smem, int opt_in) -> Tensor", &fault_test);
  m.def("_emu_narrow(Tensor x) -> (Tensor, Tensor)", &narrow_test);
  m.def("_emu_widen(Tensor bits) -> (Tensor, Tensor)", &widen_test);
  m.def("_emu_bits(Tensor x) -> Tensor", &bits_test);
  m.def("_emu_fp(Tensor a, Tensor b, Tensor c) -> Tensor", &fp_test);
}
