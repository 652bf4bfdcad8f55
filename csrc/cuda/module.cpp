// unif2ace._C_cuda: the CUDA kernels (built only against a CUDA torch).
//
// Each .cu file registers its ops into the `unif2ace_cuda` library with TORCH_LIBRARY_FRAGMENT
// (UNIF2ACE_CUDA_LIBRARY, csrc/cuda/launch.h); this file declares the library and gives Python a
// module to import. Built with -DUNIF2ACE_CUDA_EMU (the test-only CPU emulation,
// unif2ace/testing/cuda_emu.py) it declares `unif2ace_cuda_emu` instead, and no Python module
// (that library is loaded with torch.ops.load_library).
#ifdef UNIF2ACE_CUDA_EMU
#include <torch/library.h>

TORCH_LIBRARY(unif2ace_cuda_emu, m) {}
#else
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(unif2ace_cuda, m) {}

extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", "unif2ace CUDA kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif
