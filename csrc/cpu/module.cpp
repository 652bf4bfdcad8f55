// unif2ace._C: the C++/OpenMP CPU kernels.
//
// The one registration place of the `unif2ace_cpu` library: every op, its schema
// (common/op_schemas.h) and its kernel, the host entry point a kernel file csrc/cpu/<stem>.cpp
// defines (declared in cpu/ops.h). This file also gives Python a module to import (importing it
// runs the static registration). Light headers only: no torch/extension.h.
#include <Python.h>
#include <torch/library.h>

#include <c10/core/Device.h>

#include <string>

#include "common/op_schemas.h"
#include "cpu/cpu_features.h"
#include "cpu/ops.h"

// autocast's cast of an op argument, with its cache of the casts of leaf tensors that require grad
// (the weights: cast once per autocast region), declared here instead of through the heavy
// <ATen/autocast_mode.h> (which includes ATen/ATen.h)
namespace at::autocast {
TORCH_API at::Tensor cached_cast(at::ScalarType to_type, const at::Tensor& arg, c10::DeviceType device_type);
}  // namespace at::autocast

TORCH_LIBRARY(unif2ace_cpu, m) {
  namespace ops = unif2ace::cpu;
  namespace schema = unif2ace::schema;

  // the ops the CUDA library defines too: d3diff.cpp (lse_gather*), moe_gating.cpp, moe_routing.cpp
  schema::define_shared_ops(m, {&ops::lse_gather, &ops::lse_gather_backward, &ops::moe_gating,
                                &ops::moe_gating_backward, &ops::moe_expert_histogram, &ops::moe_align});
  // d3diff.cpp: the in-place variants of the fused head (unif2ace/kernels/cpu/d3diff_head.py)
  m.def(schema::lse_gather_backward_inplace, &ops::lse_gather_backward_inplace);
  m.def(schema::lse_gather_grad_inplace, &ops::lse_gather_grad_inplace);
  // moe_mlp.cpp
  m.def(schema::moe_expert_mlp, &ops::moe_expert_mlp);
  m.def(schema::moe_expert_mlp_backward, &ops::moe_expert_mlp_backward);
  // sampling.cpp (the sampling_* ops: test hooks of the RNG and fp32 math)
  m.def(schema::masked_sample_step, &ops::masked_sample_step);
  m.def(schema::cpu_ar_sample, &ops::ar_sample);
  m.def(schema::sampling_rng_words, &ops::sampling_rng_words);
  m.def(schema::sampling_gumbel_from_words, &ops::sampling_gumbel_from_words);
  m.def(schema::sampling_f32_math, &ops::sampling_f32_math);

  // cpu_features.h: the run-time choice of the kernels' GEMM precision, for `unif2ace info`
  m.def("low_precision_gemm(ScalarType dtype) -> bool",
        [](c10::ScalarType dtype) { return unif2ace::cpu::low_precision_gemm(dtype); });
  // the custom ops' autocast rules cast their GEMM operands with this (a catch-all kernel: autograd
  // records the cast itself, so gradients reach the fp32 leaves in fp32)
  m.def("autocast_cast(Tensor t, ScalarType dtype, str device_type) -> Tensor",
        [](const at::Tensor& t, c10::ScalarType dtype, std::string device_type) {
          return at::autocast::cached_cast(dtype, t, c10::Device(device_type).type());
        });
}

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "unif2ace C++ CPU kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
