// Launchers for the sampling kernels (device code in sampling.cuh): the entry points of
// torch.ops.unif2ace_cuda.masked_step_sample / masked_step_remask / ar_sample (registered in
// module.cpp). The host-side pre-passes (RNG call keys, top-k / top-p thresholds, schedule count)
// are done in Python (unif2ace/kernels/cuda/sampling.py, shared with the Triton backend); the call
// keys arrive as scalar arguments (k_*: uint32 values), passed to the kernels by value. No host
// syncs, no host-to-device copies.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "cuda/dispatch.h"
#include "cuda/launch.h"
#include "cuda/ops.h"
#include "cuda/sampling.cuh"

namespace unif2ace::cuda {
namespace {

using sampling::kMaxL;
using sampling::kRemaskThreads;
using sampling::kThreads;

// The kernels index these tensors with the shapes the other arguments imply: every one is checked
// (device, dtype, shape, layout) so that a direct call of the raw op cannot read out of bounds.

// The main input: where the kernels run; returns its device, which every other tensor must share.
at::Device check_rows(const at::Tensor& x, const char* op, const char* name, const char* shape) {
  TORCH_CHECK(on_device(x), op, " (cuda): '", name, "' must be a ", kDeviceName, " tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, " (cuda): '", name, "' must be 2-D ", shape, ", got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, op, " (cuda): '", name, "' must have unit column stride, got ",
              x.strides());
  TORCH_CHECK(x.size(0) < (int64_t(1) << 31), op, " (cuda): too many rows for the grid: ", x.size(0));
  return x.device();
}

const char* dtype_name(at::ScalarType dt) {
  switch (dt) {
    case at::kLong:
      return "int64";
    case at::kInt:
      return "int32";
    case at::kFloat:
      return "float32";
    case at::kBool:
      return "bool";
    default:
      return c10::toString(dt);
  }
}

// A side input: on `dev`, contiguous, of dtype `dt` (or int32/int64 when dt is kLong and ints is
// set) with exactly `numel` elements.
void check_arg(const at::Tensor& t, const char* op, const char* name, const at::Device& dev, at::ScalarType dt,
               int64_t numel, bool ints = false) {
  TORCH_CHECK(t.device() == dev, op, " (cuda): '", name, "' must be on ", dev, ", got ", t.device());
  const bool dtype_ok = t.scalar_type() == dt || (ints && t.scalar_type() == at::kInt);
  TORCH_CHECK(dtype_ok, op, " (cuda): '", name, "' must be ", ints ? "int32 or int64" : dtype_name(dt), ", got ",
              dtype_name(t.scalar_type()));
  TORCH_CHECK(t.numel() == numel, op, " (cuda): '", name, "' must have ", numel, " elements, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, " (cuda): '", name, "' must be contiguous");
}

// A stream's two call keys (uint32 values from the host).
rng::KeyPair key_pair(const char* op, int64_t hi, int64_t lo) {
  TORCH_CHECK(hi >= 0 && hi <= 0xFFFFFFFFll && lo >= 0 && lo <= 0xFFFFFFFFll, op,
              " (cuda): the RNG call keys must be 32-bit words in [0, 2^32), got ", hi, " and ", lo);
  return {static_cast<uint32_t>(hi), static_cast<uint32_t>(lo)};
}

// The fixed-point softmax of a V-code row (rng.h): kbias = 127 + K, inv = 2^-K.
struct FixedScale {
  int32_t kbias;
  float inv;
  explicit FixedScale(int64_t V) : kbias(127 + rng::sum_bits(V)), inv(rng::pow2_f32(-rng::sum_bits(V))) {}
};

template <typename F>
void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  TORCH_CHECK((dispatch_types<float, at::Half, at::BFloat16>(st, f)), op,
              " (cuda): logits must be fp32, fp16 or bf16, got ", st);
}

}  // namespace

// cond (and unc) [rows, V] with unit column stride; tokens / is_masked [B, L]
std::tuple<at::Tensor, at::Tensor> masked_step_sample(
    const at::Tensor& cond, const c10::optional<at::Tensor>& unc, const at::Tensor& tokens, const at::Tensor& is_masked,
    const at::Tensor& sample_ids, const c10::optional<at::Tensor>& thr, double a, double s, double temperature,
    double tau, bool greedy, bool has_noise, int64_t k_tok_hi, int64_t k_tok_lo, int64_t k_conf_hi, int64_t k_conf_lo) {
  const char* op = "masked_step_sample";
  const at::Device dev = check_rows(cond, op, "cond", "[rows, V]");
  const int64_t rows = cond.size(0), V = cond.size(1);
  TORCH_CHECK(tokens.dim() == 2, op, " (cuda): 'tokens' must be 2-D [B, L], got ", tokens.sizes());
  const int64_t B = tokens.size(0), L = tokens.size(1);
  check_arg(tokens, op, "tokens", dev, at::kLong, rows, /*ints=*/true);
  check_arg(is_masked, op, "is_masked", dev, at::kBool, rows);
  TORCH_CHECK(is_masked.sizes() == tokens.sizes(), op, " (cuda): 'is_masked' must be [B, L] = ", tokens.sizes(),
              ", got ", is_masked.sizes());
  check_arg(sample_ids, op, "sample_ids", dev, at::kLong, B);
  const rng::KeyPair k_token = key_pair(op, k_tok_hi, k_tok_lo), k_conf = key_pair(op, k_conf_hi, k_conf_lo);
  if (unc.has_value()) {
    TORCH_CHECK(unc->device() == dev && unc->sizes() == cond.sizes() && unc->stride(1) == 1 &&
                    unc->scalar_type() == cond.scalar_type(),
                op, " (cuda): 'unc' must match 'cond' (device, shape, dtype, unit column stride), got ", unc->device(),
                " ", unc->sizes(), " ", unc->scalar_type(), " strides ", unc->strides());
  }
  if (thr.has_value()) check_arg(*thr, op, "thr", dev, at::kFloat, rows);
  DeviceGuard guard(dev);
  at::Tensor sampled = at::empty({B, L}, tokens.options().dtype(at::kLong));
  at::Tensor conf = at::empty({B, L}, tokens.options().dtype(at::kFloat));
  if (rows == 0) return {sampled, conf};
  cudaStream_t stream = current_stream();
  const bool i32 = tokens.scalar_type() == at::kInt;
  const FixedScale fixed(V);
  dispatch_float(cond.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* c = reinterpret_cast<const T*>(cond.const_data_ptr());
    const T* u = unc.has_value() ? reinterpret_cast<const T*>(unc->const_data_ptr()) : nullptr;
    const int64_t su = unc.has_value() ? unc->stride(0) : 0;
    auto run = [&](auto kernel) {
      launch(kernel, static_cast<unsigned>(rows), kThreads, 0, stream, c, u, cond.stride(0), su,
             reinterpret_cast<const int64_t*>(tokens.const_data_ptr()), i32, is_masked.const_data_ptr<bool>(),
             sample_ids.const_data_ptr<int64_t>(), thr.has_value() ? thr->const_data_ptr<float>() : nullptr, L, V,
             static_cast<float>(a), static_cast<float>(s), static_cast<float>(temperature), static_cast<float>(tau),
             greedy, has_noise, k_token, k_conf, fixed.kbias, fixed.inv, sampled.mutable_data_ptr<int64_t>(),
             conf.mutable_data_ptr<float>());
    };
    if (u != nullptr) {
      run(sampling::masked_step_sample_kernel<T, true>);
    } else {
      run(sampling::masked_step_sample_kernel<T, false>);
    }
  });
  return {sampled, conf};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_step_remask(const at::Tensor& conf, const at::Tensor& is_masked,
                                                                  const at::Tensor& tokens, const at::Tensor& sampled,
                                                                  int64_t n_sched, bool last, int64_t mask_token_id) {
  const char* op = "masked_step_remask";
  const at::Device dev = check_rows(conf, op, "conf", "[B, L]");
  const int64_t B = conf.size(0), L = conf.size(1);
  check_arg(conf, op, "conf", dev, at::kFloat, B * L);
  check_arg(is_masked, op, "is_masked", dev, at::kBool, B * L);
  check_arg(tokens, op, "tokens", dev, at::kLong, B * L, /*ints=*/true);
  check_arg(sampled, op, "sampled", dev, at::kLong, B * L);
  TORCH_CHECK(is_masked.sizes() == conf.sizes() && tokens.sizes() == conf.sizes() && sampled.sizes() == conf.sizes(),
              op, " (cuda): conf, is_masked, tokens and sampled must all be [B, L] = ", conf.sizes());
  TORCH_CHECK(L <= kMaxL, op, " (cuda): L must be <= ", kMaxL, ", got ", L);
  DeviceGuard guard(dev);
  at::Tensor tok_out = at::empty({B, L}, conf.options().dtype(at::kLong));
  at::Tensor mask_out = at::empty({B, L}, conf.options().dtype(at::kBool));
  at::Tensor smp_out = at::empty({B, L}, conf.options().dtype(at::kLong));
  if (B == 0 || L == 0) return {tok_out, mask_out, smp_out};
  int64_t P = 1;
  while (P < L) P <<= 1;
  launch(sampling::remask_kernel, static_cast<unsigned>(B), kRemaskThreads, 0, current_stream(),
         conf.const_data_ptr<float>(), is_masked.const_data_ptr<bool>(),
         reinterpret_cast<const int64_t*>(tokens.const_data_ptr()), tokens.scalar_type() == at::kInt,
         sampled.const_data_ptr<int64_t>(), L, P, n_sched, last, mask_token_id, tok_out.mutable_data_ptr<int64_t>(),
         mask_out.mutable_data_ptr<bool>(), smp_out.mutable_data_ptr<int64_t>());
  return {tok_out, mask_out, smp_out};
}

std::tuple<at::Tensor, at::Tensor> ar_sample(const at::Tensor& logits, const at::Tensor& sample_ids,
                                             const at::Tensor& position, const c10::optional<at::Tensor>& thr,
                                             double temperature, bool greedy, int64_t k_tok_hi, int64_t k_tok_lo) {
  const char* op = "ar_sample";
  const at::Device dev = check_rows(logits, op, "logits", "[B, V]");
  const int64_t B = logits.size(0), V = logits.size(1);
  check_arg(sample_ids, op, "sample_ids", dev, at::kLong, B);
  check_arg(position, op, "position", dev, at::kLong, B);
  const rng::KeyPair k_token = key_pair(op, k_tok_hi, k_tok_lo);
  if (thr.has_value()) check_arg(*thr, op, "thr", dev, at::kFloat, B);
  DeviceGuard guard(dev);
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs};
  cudaStream_t stream = current_stream();
  const FixedScale fixed(V);
  dispatch_float(logits.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    launch(sampling::ar_sample_kernel<T>, static_cast<unsigned>(B), kThreads, 0, stream,
           reinterpret_cast<const T*>(logits.const_data_ptr()), logits.stride(0), V,
           sample_ids.const_data_ptr<int64_t>(), position.const_data_ptr<int64_t>(),
           thr.has_value() ? thr->const_data_ptr<float>() : nullptr, static_cast<float>(temperature), greedy, k_token,
           fixed.kbias, fixed.inv, tokens.mutable_data_ptr<int64_t>(), logprobs.mutable_data_ptr<float>());
  });
  return {tokens, logprobs};
}
}  // namespace unif2ace::cuda
