// unif2ace._C: the C++/OpenMP CPU kernels.
//
// Each kernel file registers its ops into the `unif2ace_cpu` library with
// TORCH_LIBRARY_FRAGMENT; this file declares the library and gives Python a module to import
// (importing it runs the static registrations). Light headers only: no torch/extension.h.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_features.h"

TORCH_LIBRARY(unif2ace_cpu, m) {
  // the run-time choice of the kernels' GEMM precision (cpu_features.h), for `unif2ace info`
  m.def("low_precision_gemm(ScalarType dtype) -> bool",
        [](c10::ScalarType dtype) { return unif2ace::cpu::low_precision_gemm(dtype); });
}

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "unif2ace C++ CPU kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
