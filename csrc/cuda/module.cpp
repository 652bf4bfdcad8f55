// unif2ace._C_cuda: the CUDA kernels (built only against a CUDA torch).
//
// The one registration place of the `unif2ace_cuda` library: every op, its schema
// (common/op_schemas.h) and its kernel, the host entry point a .cu file defines (declared in
// cuda/ops.h). This file also gives Python a module to import. Built with
// -DUNIF2ACE_CUDA_EMU (the test-only CPU emulation, unif2ace/testing/cuda_emu.py) the same ops go
// into `unif2ace_cuda_emu` instead, with no Python module (that library is loaded with
// torch.ops.load_library).
#ifndef UNIF2ACE_CUDA_EMU
#include <Python.h>
#endif
#include <torch/library.h>

#include "common/op_schemas.h"
#include "cuda/ops.h"

namespace unif2ace::cuda {
namespace {

void define_ops(torch::Library& m) {
  // the ops the CPU library defines too: d3diff.cu, moe_gating.cu, moe_routing.cu
  schema::define_shared_ops(
      m, {&lse_gather, &lse_gather_backward, &moe_gating, &moe_gating_backward, &moe_expert_histogram, &moe_align});
  // sampling.cu
  m.def(schema::masked_step_sample, &masked_step_sample);
  m.def(schema::masked_step_remask, &masked_step_remask);
  m.def(schema::cuda_ar_sample, &ar_sample);
}

}  // namespace
}  // namespace unif2ace::cuda

// TORCH_LIBRARY pastes its namespace argument into names, so the library is spelled out per build
#ifdef UNIF2ACE_CUDA_EMU
TORCH_LIBRARY(unif2ace_cuda_emu, m) { unif2ace::cuda::define_ops(m); }
#else
TORCH_LIBRARY(unif2ace_cuda, m) { unif2ace::cuda::define_ops(m); }

extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", "unif2ace CUDA kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif
