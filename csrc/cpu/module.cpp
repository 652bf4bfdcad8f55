// unif2ace._C: the C++/OpenMP CPU kernels.
//
// Each kernel file registers its ops into the `unif2ace_cpu` library with
// TORCH_LIBRARY_FRAGMENT; this file declares the library and gives Python a module to import
// (importing it runs the static registrations). Light headers only: no torch/extension.h.
#include <Python.h>
#include <torch/library.h>

#include <c10/core/Device.h>

#include <string>

#include "cpu/cpu_features.h"

// autocast's cast of an op argument, with its cache of the casts of leaf tensors that require grad
// (the weights: cast once per autocast region), declared here instead of through the heavy
// <ATen/autocast_mode.h> (which includes ATen/ATen.h)
namespace at::autocast {
TORCH_API at::Tensor cached_cast(at::ScalarType to_type, const at::Tensor& arg, c10::DeviceType device_type);
}  // namespace at::autocast

TORCH_LIBRARY(unif2ace_cpu, m) {
  // the run-time choice of the kernels' GEMM precision (cpu_features.h), for `unif2ace info`
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
