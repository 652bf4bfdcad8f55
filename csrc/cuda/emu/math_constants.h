// The CUDART_* constants of the toolkit's math_constants.h that the device code uses, for the CPU
// emulator (see cuda_runtime.h here); the same bit patterns as CUDA's.
#pragma once

#include <cuda_runtime.h>

#define CUDART_INF_F __int_as_float(0x7f800000)
#define CUDART_NAN_F __int_as_float(0x7fffffff)
#define CUDART_INF __longlong_as_double(0x7ff0000000000000LL)
#define CUDART_NAN __longlong_as_double(0xfff8000000000000LL)
