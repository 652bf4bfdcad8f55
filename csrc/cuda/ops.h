// The host entry points of the CUDA kernels (csrc/cuda/<stem>.cu: checks, geometry and launches of
// the device code in <stem>.cuh), one block per file; the ops the CPU library defines too are
// declared with their common type (common/op_schemas.h). csrc/cuda/module.cpp registers them, with
// their schemas, as the ops of the `unif2ace_cuda` library (`unif2ace_cuda_emu` when emulated).
// No CUDA types here: module.cpp is compiled by the host compiler.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

#include "common/op_schemas.h"

namespace unif2ace::cuda {

// d3diff.cu: the fused LSE + target gather of the D3PM head, and its backward
schema::LseGatherFn lse_gather;
schema::LseGatherBackwardFn lse_gather_backward;

// moe_gating.cu: the router's top-k gating and its backward
schema::MoeGatingFn moe_gating;
schema::MoeGatingBackwardFn moe_gating_backward;

// moe_routing.cu: the token counts per expert and the block-aligned sort by expert
schema::MoeExpertHistogramFn moe_expert_histogram;
schema::MoeAlignFn moe_align;

// sampling.cu: the two kernels of a masked-diffusion step (sample, remask) and one AR step
std::tuple<at::Tensor, at::Tensor> masked_step_sample(
    const at::Tensor& cond, const c10::optional<at::Tensor>& unc, const at::Tensor& tokens, const at::Tensor& is_masked,
    const at::Tensor& sample_ids, const c10::optional<at::Tensor>& thr, double a, double s, double temperature,
    double tau, bool greedy, bool has_noise, int64_t k_tok_hi, int64_t k_tok_lo, int64_t k_conf_hi, int64_t k_conf_lo);
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_step_remask(const at::Tensor& conf, const at::Tensor& is_masked,
                                                                  const at::Tensor& tokens, const at::Tensor& sampled,
                                                                  int64_t n_sched, bool last, int64_t mask_token_id);
std::tuple<at::Tensor, at::Tensor> ar_sample(const at::Tensor& logits, const at::Tensor& sample_ids,
                                             const at::Tensor& position, const c10::optional<at::Tensor>& thr,
                                             double temperature, bool greedy, int64_t k_tok_hi, int64_t k_tok_lo);

}  // namespace unif2ace::cuda
