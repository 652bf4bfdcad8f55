// Host-side helpers shared by the CUDA bindings (*.cu): the at:: scalar type -> device type map,
// a dispatch over a list of scalar types, and the float dtype dispatch (fp32/fp16/bf16; no double:
// the kernels compute in fp32).
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace unif2ace::cuda {

template <typename S>
struct DevType {
  using type = S;
};
template <>
struct DevType<at::Half> {
  using type = __half;
};
template <>
struct DevType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Calls f(T{}) with T the device type (DevType) of `st` when st is the scalar type of one of
// S...; returns whether it did.
template <typename... S, typename F>
bool dispatch_types(at::ScalarType st, F&& f) {
  return ((st == c10::CppTypeToScalarType<S>::value && (f(typename DevType<S>::type{}), true)) || ...);
}

}  // namespace unif2ace::cuda

#define UNIF2ACE_DISPATCH_FLOAT3(TYPE, NAME, ...)                                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                                        \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
