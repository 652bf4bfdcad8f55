// What this CPU offers the C++ kernels at run time beyond the vector ISA (vec_math.h cpu_isa):
// GEMMs on bf16 / fp16 operands with fp32 accumulation that run on matrix instructions (oneDNN's
// matmul on AVX512-BF16 / AMX-BF16, resp. AVX512-FP16 / AMX-FP16). One rule, used by the kernels
// and reported by `python -m unif2ace info` (torch.ops.unif2ace_cpu.low_precision_gemm).
#pragma once

#include <ATen/Context.h>
#include <ATen/cpu/Utils.h>
#include <c10/core/ScalarType.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace unif2ace::cpu {

// Whether GEMMs on `dtype` (bf16 or fp16) operands run on the machine's matrix instructions:
// oneDNN built in and enabled, and the CPU has the instructions (the capability table torch
// itself uses). Without them oneDNN would emulate the format, slower than fp32, so the kernels
// keep their fp32 path. UNIF2ACE_CPU_LOWP_GEMM (read at every call) overrides the choice: 0 forces
// the fp32 path, 1 the 16-bit one (at::mm runs it anywhere, emulated where the CPU lacks the
// instructions) -- tests of both paths on any machine. Python: unif2ace.kernels.cpu.lowp_gemm.
inline bool low_precision_gemm(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  static const auto caps = at::cpu::get_cpu_capabilities();
  auto has = [](const char* key) {
    const auto it = caps.find(key);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  static const bool bf16 = has("avx512_bf16") || has("amx_bf16");
  static const bool fp16 = has("avx512_fp16") || has("amx_fp16");
  const char* env = std::getenv("UNIF2ACE_CPU_LOWP_GEMM");
  if (env && std::strcmp(env, "0") == 0) return false;
  if (env && std::strcmp(env, "1") == 0) return true;
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return false;
  return dtype == at::kBFloat16 ? bf16 : dtype == at::kHalf ? fp16 : false;
}

}  // namespace unif2ace::cpu
