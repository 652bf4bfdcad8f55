// What the CUDA bindings (*.cu) need from the CUDA runtime and c10::cuda, behind one seam, so that
// the very same binding code (checks, geometry, outputs, launches) builds
//   - with nvcc into unif2ace._C_cuda (torch.ops.unif2ace_cuda, CUDA tensors), and
//   - with g++ and -DUNIF2ACE_CUDA_EMU into the test-only CPU emulation (csrc/cuda/emu,
//     torch.ops.unif2ace_cuda_emu, CPU tensors standing in for CUDA ones; unif2ace/testing/cuda_emu.py).
//
//   on_device(t), kDeviceName    is t where the kernels run (a CUDA tensor; a CPU one when emulated)
//   DeviceGuard, current_stream  c10::cuda's guard and current stream (no-ops when emulated)
//   launch(kernel, grid, block, smem, stream, args...)
//                                kernel<<<grid, block, smem, stream>>>(args...) + the launch check
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#ifndef UNIF2ACE_CUDA_EMU
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace unif2ace::cuda {

template <typename T>
struct NoDeduce {
  using type = T;
};

#ifdef UNIF2ACE_CUDA_EMU
constexpr const char* kDeviceName = "CUDA (emulated: CPU)";
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
#else
constexpr const char* kDeviceName = "CUDA";
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#endif

// The arguments convert to the kernel's parameter types at the call (NoDeduce), as with <<<>>>.
template <typename... P>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            typename NoDeduce<P>::type... args) {
#ifdef UNIF2ACE_CUDA_EMU
  (void)stream;
  ::unif2ace::emu::launch(kernel, grid, block, smem, args...);
#else
  // a .h is formatted as plain C++, which would split the >>> token
  // clang-format off
  kernel<<<grid, block, smem, stream>>>(args...);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace unif2ace::cuda
