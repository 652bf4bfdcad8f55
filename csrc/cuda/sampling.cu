// Launchers for the sampling kernels (device code in sampling.cuh) and their registration as
// torch.ops.unif2ace_cuda.masked_step_sample / masked_step_remask / ar_sample. The host-side
// pre-passes (RNG keys, top-k / top-p thresholds, schedule count) are done in Python
// (unif2ace/kernels/cuda/sampling.py, shared with the Triton backend). No host syncs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/sampling.cuh"

namespace unif2ace::cuda {
namespace {

using sampling::kMaxL;
using sampling::kRemaskThreads;
using sampling::kThreads;

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, " (cuda): '", name, "' must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), op, " (cuda): '", name, "' must be contiguous");
}

void check_tokens(const at::Tensor& t, const char* op) {
  check_cuda(t, op, "tokens");
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op,
              " (cuda): 'tokens' must be int32 or int64, got ", t.scalar_type());
}

template <typename F>
void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    case at::kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      TORCH_CHECK(false, op, " (cuda): logits must be fp32, fp16 or bf16, got ", st);
  }
}

// cond (and unc) [rows, V] with unit column stride; tokens / is_masked [B, L]
std::tuple<at::Tensor, at::Tensor> masked_step_sample(const at::Tensor& cond, const c10::optional<at::Tensor>& unc,
                                                      const at::Tensor& tokens, const at::Tensor& is_masked,
                                                      const at::Tensor& sample_ids, const at::Tensor& keys,
                                                      const c10::optional<at::Tensor>& thr, double a, double s,
                                                      double temperature, double tau, bool greedy, bool has_noise) {
  const char* op = "masked_step_sample";
  TORCH_CHECK(cond.is_cuda() && cond.dim() == 2 && cond.stride(1) == 1, op,
              " (cuda): 'cond' must be a CUDA [rows, V] tensor with unit column stride");
  check_tokens(tokens, op);
  check_cuda(is_masked, op, "is_masked");
  check_cuda(sample_ids, op, "sample_ids");
  check_cuda(keys, op, "keys");
  TORCH_CHECK(tokens.dim() == 2 && tokens.numel() == cond.size(0), op, " (cuda): tokens must be [B, L], B*L = rows");
  TORCH_CHECK(is_masked.scalar_type() == at::kBool && sample_ids.scalar_type() == at::kLong &&
                  keys.scalar_type() == at::kLong && keys.numel() == 4,
              op, " (cuda): bad is_masked / sample_ids / keys");
  if (unc.has_value()) {
    TORCH_CHECK(unc->is_cuda() && unc->sizes() == cond.sizes() && unc->stride(1) == 1 &&
                    unc->scalar_type() == cond.scalar_type(),
                op, " (cuda): 'unc' must match 'cond'");
  }
  if (thr.has_value()) {
    check_cuda(*thr, op, "thr");
    TORCH_CHECK(thr->scalar_type() == at::kFloat && thr->numel() == cond.size(0), op, " (cuda): bad thr");
  }
  c10::cuda::CUDAGuard guard(cond.device());
  const int64_t rows = cond.size(0), V = cond.size(1), L = tokens.size(1);
  at::Tensor sampled = at::empty({tokens.size(0), L}, tokens.options().dtype(at::kLong));
  at::Tensor conf = at::empty({tokens.size(0), L}, tokens.options().dtype(at::kFloat));
  if (rows == 0) return {sampled, conf};
  TORCH_CHECK(rows < (int64_t(1) << 31), op, " (cuda): too many rows for the grid: ", rows);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool i32 = tokens.scalar_type() == at::kInt;
  dispatch_float(cond.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* c = reinterpret_cast<const T*>(cond.const_data_ptr());
    const T* u = unc.has_value() ? reinterpret_cast<const T*>(unc->const_data_ptr()) : nullptr;
    const int64_t su = unc.has_value() ? unc->stride(0) : 0;
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          c, u, cond.stride(0), su, reinterpret_cast<const int64_t*>(tokens.const_data_ptr()), i32,
          is_masked.const_data_ptr<bool>(), sample_ids.const_data_ptr<int64_t>(), keys.const_data_ptr<int64_t>(),
          thr.has_value() ? thr->const_data_ptr<float>() : nullptr, L, V, static_cast<float>(a), static_cast<float>(s),
          static_cast<float>(temperature), static_cast<float>(tau), greedy, has_noise,
          sampled.mutable_data_ptr<int64_t>(), conf.mutable_data_ptr<float>());
    };
    if (u != nullptr) {
      launch(sampling::masked_step_sample_kernel<T, true>);
    } else {
      launch(sampling::masked_step_sample_kernel<T, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sampled, conf};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_step_remask(const at::Tensor& conf, const at::Tensor& is_masked,
                                                                  const at::Tensor& tokens, const at::Tensor& sampled,
                                                                  int64_t n_sched, bool last, int64_t mask_token_id) {
  const char* op = "masked_step_remask";
  check_cuda(conf, op, "conf");
  check_cuda(is_masked, op, "is_masked");
  check_tokens(tokens, op);
  check_cuda(sampled, op, "sampled");
  TORCH_CHECK(conf.dim() == 2 && conf.scalar_type() == at::kFloat && is_masked.sizes() == conf.sizes() &&
                  tokens.sizes() == conf.sizes() && sampled.sizes() == conf.sizes() &&
                  sampled.scalar_type() == at::kLong && is_masked.scalar_type() == at::kBool,
              op, " (cuda): conf / is_masked / tokens / sampled must be [B, L] fp32 / bool / int / int64");
  const int64_t B = conf.size(0), L = conf.size(1);
  TORCH_CHECK(L <= kMaxL, op, " (cuda): L must be <= ", kMaxL, ", got ", L);
  c10::cuda::CUDAGuard guard(conf.device());
  at::Tensor tok_out = at::empty({B, L}, conf.options().dtype(at::kLong));
  at::Tensor mask_out = at::empty({B, L}, conf.options().dtype(at::kBool));
  at::Tensor smp_out = at::empty({B, L}, conf.options().dtype(at::kLong));
  if (B == 0 || L == 0) return {tok_out, mask_out, smp_out};
  int64_t P = 1;
  while (P < L) P <<= 1;
  auto stream = c10::cuda::getCurrentCUDAStream();
  sampling::remask_kernel<<<static_cast<unsigned>(B), kRemaskThreads, 0, stream>>>(
      conf.const_data_ptr<float>(), is_masked.const_data_ptr<bool>(),
      reinterpret_cast<const int64_t*>(tokens.const_data_ptr()), tokens.scalar_type() == at::kInt,
      sampled.const_data_ptr<int64_t>(), L, P, n_sched, last, mask_token_id, tok_out.mutable_data_ptr<int64_t>(),
      mask_out.mutable_data_ptr<bool>(), smp_out.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tok_out, mask_out, smp_out};
}

std::tuple<at::Tensor, at::Tensor> ar_sample(const at::Tensor& logits, const at::Tensor& sample_ids,
                                             const at::Tensor& position, const at::Tensor& keys,
                                             const c10::optional<at::Tensor>& thr, double temperature, bool greedy) {
  const char* op = "ar_sample";
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1, op,
              " (cuda): 'logits' must be a CUDA [B, V] tensor with unit column stride");
  check_cuda(sample_ids, op, "sample_ids");
  check_cuda(position, op, "position");
  check_cuda(keys, op, "keys");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(sample_ids.scalar_type() == at::kLong && sample_ids.numel() == B && position.scalar_type() == at::kLong &&
                  position.numel() == B && keys.scalar_type() == at::kLong && keys.numel() == 4,
              op, " (cuda): bad sample_ids / position / keys");
  if (thr.has_value()) {
    check_cuda(*thr, op, "thr");
    TORCH_CHECK(thr->scalar_type() == at::kFloat && thr->numel() == B, op, " (cuda): bad thr");
  }
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs};
  TORCH_CHECK(B < (int64_t(1) << 31), op, " (cuda): too many rows: ", B);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(logits.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    sampling::ar_sample_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(logits.const_data_ptr()), logits.stride(0), V, sample_ids.const_data_ptr<int64_t>(),
        position.const_data_ptr<int64_t>(), keys.const_data_ptr<int64_t>(),
        thr.has_value() ? thr->const_data_ptr<float>() : nullptr, static_cast<float>(temperature), greedy,
        tokens.mutable_data_ptr<int64_t>(), logprobs.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {tokens, logprobs};
}

}  // namespace
}  // namespace unif2ace::cuda

TORCH_LIBRARY_FRAGMENT(unif2ace_cuda, m) {
  m.def(
      "masked_step_sample(Tensor cond, Tensor? unc, Tensor tokens, Tensor is_masked, Tensor sample_ids, Tensor keys, "
      "Tensor? thr, float a, float s, float temperature, float tau, bool greedy, bool has_noise) -> (Tensor, Tensor)",
      &unif2ace::cuda::masked_step_sample);
  m.def(
      "masked_step_remask(Tensor conf, Tensor is_masked, Tensor tokens, Tensor sampled, int n_sched, bool last, "
      "int mask_token_id) -> (Tensor, Tensor, Tensor)",
      &unif2ace::cuda::masked_step_remask);
  m.def(
      "ar_sample(Tensor logits, Tensor sample_ids, Tensor position, Tensor keys, Tensor? thr, float temperature, "
      "bool greedy) -> (Tensor, Tensor)",
      &unif2ace::cuda::ar_sample);
}
