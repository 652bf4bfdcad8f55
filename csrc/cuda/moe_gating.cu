// Launchers for the grouped MoE gating kernels (device code in moe_gating.cuh): the entry points of
// torch.ops.unif2ace_cuda.moe_gating / moe_gating_backward (registered in module.cpp, with the same
// schemas as the cpu backend's unif2ace_cpu ops). No host syncs: every buffer is sized from
// host-known shapes and the group table travels by value in the kernel parameters.
//
//   moe_gating(router_logits [T, E] float/half/bf16 (unit column stride, else one copy),
//              group_ids [T] int32/int64 (any stride), group_sizes int[G] (each <= 128, G <= 255,
//              sum == E), top_k, score, renormalize, balance_coef)
//       -> (expert_ids [T, k] int32, gates [T, k] fp32, f [E] fp32, P [E] fp32, loss [G] fp32)
//   moe_gating_backward(grad_gates [T, k], grad_prob [E], grad_loss [G], <forward args>)
//       -> d router_logits [T, E] (router_logits' dtype, contiguous)
//
// Launches: forward = per-token kernel (ids, gates, per-block partial statistics) + one stats CTA
// per group; backward = the per-token kernel in counts-only mode + stats CTAs (dbase) + the
// per-token backward kernel. T = 0 launches nothing (statistics are zeros).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "common/moe_checks.h"
#include "cuda/dispatch.h"
#include "cuda/launch.h"
#include "cuda/moe_gating.cuh"
#include "cuda/ops.h"

namespace unif2ace::cuda {
namespace {

using namespace gating;

struct Setup {
  Params p;
  Groups grp;
  at::Tensor logits;  // unit column stride
  int64_t nb;         // blocks of the per-token statistics kernel
  bool use_smem;
  int64_t smem_bytes;
  int64_t row_words;  // 2E + G
};

// The device's largest dynamic shared memory per block with opt-in (no sync: a device attribute).
int64_t smem_opt_in_limit(const at::Device& device) {
  int value = 0;
  const int dev = device.has_index() ? device.index() : 0;  // (an emulated "device" is the CPU)
  TORCH_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess,
              "moe_gating (cuda): cannot query the shared memory limit of device ", dev);
  return std::max<int64_t>(value, kSmemLimit);
}

Setup make_setup(const char* op, const at::Tensor& router_logits, const at::Tensor& group_ids,
                 c10::IntArrayRef group_sizes, int64_t top_k, c10::string_view score, bool renormalize) {
  TORCH_CHECK(on_device(router_logits), op, ": router_logits must be a ", kDeviceName, " tensor, got ",
              router_logits.device());
  TORCH_CHECK(router_logits.dim() == 2, op, ": router_logits must be 2-D [T, E], got ", router_logits.sizes());
  const auto st = router_logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": router_logits must be float32/float16/bfloat16, got ", st);
  TORCH_CHECK(group_ids.device() == router_logits.device(), op, ": group_ids must be on ", router_logits.device(),
              ", got ", group_ids.device());
  TORCH_CHECK(group_ids.dim() == 1 && group_ids.size(0) == router_logits.size(0), op,
              ": group_ids must have shape [T] with T = ", router_logits.size(0), ", got ", group_ids.sizes());
  TORCH_CHECK(group_ids.scalar_type() == at::kInt || group_ids.scalar_type() == at::kLong, op,
              ": group_ids must be int32/int64, got ", group_ids.scalar_type());
  TORCH_CHECK(score == "softmax" || score == "sigmoid", op, ": score must be 'softmax' or 'sigmoid', got '",
              std::string(score), "'");
  const int64_t G = static_cast<int64_t>(group_sizes.size());
  TORCH_CHECK(G >= 1 && G <= kMaxGroups, op, ": group_sizes must hold 1 to ", kMaxGroups, " groups, got ", G);
  TORCH_CHECK(top_k >= 1, op, ": top_k must be >= 1, got ", top_k);
  Setup s;
  s.grp.G = static_cast<int32_t>(G);
  s.grp.offs[0] = 0;
  int64_t off = 0;
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(group_sizes[g] >= 1 && group_sizes[g] <= kMaxGroupExperts, op, ": group_sizes must hold ints in [1, ",
                kMaxGroupExperts, "] (cuda kernel), got ", group_sizes[g], " for group ", g);
    TORCH_CHECK(top_k <= group_sizes[g], op, ": top_k=", top_k, " exceeds the size of group ", g, " (", group_sizes[g],
                ")");
    off += group_sizes[g];
    s.grp.offs[g + 1] = static_cast<int32_t>(off);
  }
  for (int64_t g = G + 1; g <= kMaxGroups; ++g) s.grp.offs[g] = static_cast<int32_t>(off);
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  TORCH_CHECK(off == E, op, ": sum(group_sizes) = ", off, " must equal router_logits.shape[1] = ", E);
  s.logits = router_logits.stride(1) == 1 ? router_logits : router_logits.contiguous();
  s.p.T = T;
  s.p.E = E;
  s.p.row_stride = s.logits.stride(0);
  s.p.gid_stride = group_ids.stride(0);
  s.p.k = static_cast<int32_t>(top_k);
  s.p.softmax = score == "softmax" ? 1 : 0;
  s.p.renormalize = renormalize ? 1 : 0;
  // per-warp accumulators: P (fp32) and C (int32) per expert, N per group
  s.row_words = 2 * E + G;
  s.smem_bytes = static_cast<int64_t>(kWarps) * s.row_words * static_cast<int64_t>(sizeof(int32_t));
  // up to the device's opt-in limit (227 KiB on sm_90: E up to ~3600 experts), else global scratch
  s.use_smem = s.smem_bytes <= smem_opt_in_limit(router_logits.device());
  // the block count depends on T and on which accumulator home fits E (on the device) only:
  // reproducible
  const int64_t max_blocks = s.use_smem ? kMaxBlocks : kMaxBlocksGlobal;
  s.nb = std::max<int64_t>(1, std::min<int64_t>(max_blocks, (T + kWarps - 1) / kWarps));
  s.p.tpb = std::max<int64_t>(1, (T + s.nb - 1) / s.nb);
  return s;
}

// Runs the per-token kernel: ids/gates when kOutputs, score sums when kProb.
template <bool kOutputs, bool kProb>
void launch_tokens(const Setup& s, const at::Tensor& group_ids, at::Tensor* ids, at::Tensor* gates, at::Tensor& part_P,
                   at::Tensor& part_C, at::Tensor& part_N, cudaStream_t stream) {
  at::Tensor scratch;
  if (!s.use_smem) {
    scratch = at::empty({s.nb * kWarps * s.row_words}, s.logits.options().dtype(at::kInt));
  }
  int32_t* scratch_p = s.use_smem ? nullptr : scratch.mutable_data_ptr<int32_t>();
  const int smem = s.use_smem ? static_cast<int>(s.smem_bytes) : 0;
  UNIF2ACE_DISPATCH_FLOAT3(s.logits.scalar_type(), "moe_gating_cuda", [&] {
    using T = typename DevType<scalar_t>::type;
    const T* x = reinterpret_cast<const T*>(s.logits.const_data_ptr<scalar_t>());
    AT_DISPATCH_INDEX_TYPES(group_ids.scalar_type(), "moe_gating_cuda_groups", [&] {
      auto* kernel = gating_forward_kernel<T, index_t, kOutputs, kProb>;
      if (smem > kSmemLimit) {
        TORCH_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess,
                    "moe_gating (cuda): cannot opt in to ", smem, " bytes of shared memory");
      }
      launch(kernel, static_cast<unsigned>(s.nb), kThreads, smem, stream, x, group_ids.const_data_ptr<index_t>(), s.p,
             s.grp, kOutputs ? ids->mutable_data_ptr<int32_t>() : nullptr,
             kOutputs ? gates->mutable_data_ptr<float>() : nullptr, scratch_p, s.use_smem,
             kProb ? part_P.mutable_data_ptr<float>() : nullptr, part_C.mutable_data_ptr<int32_t>(),
             part_N.mutable_data_ptr<int32_t>());
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_gating(
    const at::Tensor& router_logits, const at::Tensor& group_ids, c10::IntArrayRef group_sizes, int64_t top_k,
    c10::string_view score, bool renormalize, double balance_coef) {
  const char* op = "unif2ace_cuda::moe_gating";
  const Setup s = make_setup(op, router_logits, group_ids, group_sizes, top_k, score, renormalize);
  DeviceGuard guard(router_logits.device());
  const int64_t T = s.p.T, E = s.p.E, G = s.grp.G, k = top_k;
  auto f32 = router_logits.options().dtype(at::kFloat);
  at::Tensor ids = at::empty({T, k}, router_logits.options().dtype(at::kInt));
  at::Tensor gates = at::empty({T, k}, f32);
  if (T == 0) {  // every group is empty: f, P and the loss are 0
    return {ids, gates, at::zeros({E}, f32), at::zeros({E}, f32), at::zeros({G}, f32)};
  }
  at::Tensor frac = at::empty({E}, f32);
  at::Tensor prob = at::empty({E}, f32);
  at::Tensor loss = at::empty({G}, f32);
  at::Tensor part_P = at::empty({s.nb * E}, f32);
  at::Tensor part_C = at::empty({s.nb * E}, router_logits.options().dtype(at::kInt));
  at::Tensor part_N = at::empty({s.nb * G}, router_logits.options().dtype(at::kInt));
  cudaStream_t stream = current_stream();
  launch_tokens<true, true>(s, group_ids, &ids, &gates, part_P, part_C, part_N, stream);
  launch(gating_stats_kernel<false>, static_cast<unsigned>(G), kStatThreads, 0, stream, part_P.const_data_ptr<float>(),
         part_C.const_data_ptr<int32_t>(), part_N.const_data_ptr<int32_t>(), s.nb, E, s.grp, s.p.k, balance_coef,
         frac.mutable_data_ptr<float>(), prob.mutable_data_ptr<float>(), loss.mutable_data_ptr<float>(), nullptr,
         nullptr, nullptr);
  return {ids, gates, frac, prob, loss};
}

at::Tensor moe_gating_backward(const at::Tensor& grad_gates, const at::Tensor& grad_prob, const at::Tensor& grad_loss,
                               const at::Tensor& router_logits, const at::Tensor& group_ids,
                               c10::IntArrayRef group_sizes, int64_t top_k, c10::string_view score, bool renormalize,
                               double balance_coef) {
  const char* op = "unif2ace_cuda::moe_gating_backward";
  const Setup s = make_setup(op, router_logits, group_ids, group_sizes, top_k, score, renormalize);
  DeviceGuard guard(router_logits.device());
  const int64_t T = s.p.T, E = s.p.E, G = s.grp.G, k = top_k;
  moe::check_gating_grads(op, grad_gates, grad_prob, grad_loss, T, k, E, G);
  for (const at::Tensor* t : {&grad_gates, &grad_prob, &grad_loss}) {
    TORCH_CHECK(t->device() == router_logits.device(), op, ": gradients must be on ", router_logits.device(), ", got ",
                t->device());
    TORCH_CHECK(t->is_floating_point(), op, ": gradients must be floating point, got ", t->scalar_type());
  }
  at::Tensor dz = at::empty({T, E}, router_logits.options());
  if (T == 0) return dz;
  const at::Tensor gg = grad_gates.to(at::kFloat).contiguous();
  const at::Tensor gp = grad_prob.to(at::kFloat).contiguous();
  const at::Tensor gl = grad_loss.to(at::kFloat).contiguous();
  auto f32 = router_logits.options().dtype(at::kFloat);
  at::Tensor part_P;  // unused in counts-only mode
  at::Tensor part_C = at::empty({s.nb * E}, router_logits.options().dtype(at::kInt));
  at::Tensor part_N = at::empty({s.nb * G}, router_logits.options().dtype(at::kInt));
  at::Tensor dbase = at::empty({E}, f32);
  cudaStream_t stream = current_stream();
  launch_tokens<false, false>(s, group_ids, nullptr, nullptr, part_P, part_C, part_N, stream);
  launch(gating_stats_kernel<true>, static_cast<unsigned>(G), kStatThreads, 0, stream, nullptr,
         part_C.const_data_ptr<int32_t>(), part_N.const_data_ptr<int32_t>(), s.nb, E, s.grp, s.p.k, balance_coef,
         nullptr, nullptr, nullptr, gp.const_data_ptr<float>(), gl.const_data_ptr<float>(),
         dbase.mutable_data_ptr<float>());
  // grid-stride over tokens: at most 2^20 CTAs of kWarps tokens each
  const int64_t blocks = std::min<int64_t>((T + kWarps - 1) / kWarps, int64_t(1) << 20);
  UNIF2ACE_DISPATCH_FLOAT3(s.logits.scalar_type(), "moe_gating_backward_cuda", [&] {
    using Tp = typename DevType<scalar_t>::type;
    const Tp* x = reinterpret_cast<const Tp*>(s.logits.const_data_ptr<scalar_t>());
    Tp* out = reinterpret_cast<Tp*>(dz.mutable_data_ptr<scalar_t>());
    AT_DISPATCH_INDEX_TYPES(group_ids.scalar_type(), "moe_gating_backward_cuda_groups", [&] {
      launch(gating_backward_kernel<Tp, index_t>, static_cast<unsigned>(blocks), kThreads, 0, stream, x,
             group_ids.const_data_ptr<index_t>(), s.p, s.grp, gg.const_data_ptr<float>(), dbase.const_data_ptr<float>(),
             out);
    });
  });
  return dz;
}
}  // namespace unif2ace::cuda
