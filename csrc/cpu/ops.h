// The host entry points of the CPU kernels (csrc/cpu/<stem>.cpp), one block per kernel file; the
// ops the CUDA library defines too are declared with their common type (common/op_schemas.h).
// csrc/cpu/module.cpp registers them, with their schemas, as the ops of the `unif2ace_cpu` library.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/op_schemas.h"

namespace unif2ace::cpu {

// d3diff.cpp: the fused LSE + target gather of the D3PM head, and its gradients
schema::LseGatherFn lse_gather;
schema::LseGatherBackwardFn lse_gather_backward;
void lse_gather_backward_inplace(at::Tensor& logits, const at::Tensor& target, const at::Tensor& row_max,
                                 const at::Tensor& lse_rel, const at::Tensor& grad_lse, const at::Tensor& grad_tgt,
                                 int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_gather_grad_inplace(at::Tensor& logits, const at::Tensor& target,
                                                                       const at::Tensor& a, const at::Tensor& b,
                                                                       const at::Tensor& c, const at::Tensor& g,
                                                                       int64_t ignore_index);

// moe_gating.cpp: the router's top-k gating and its backward
schema::MoeGatingFn moe_gating;
schema::MoeGatingBackwardFn moe_gating_backward;

// moe_mlp.cpp: the routed expert MLP, forward and backward
std::vector<at::Tensor> moe_expert_mlp(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                                       const at::Tensor& expert_ids, const at::Tensor& gates,
                                       const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& b2,
                                       c10::string_view activation);
std::vector<at::Tensor> moe_expert_mlp_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                                                const at::Tensor& w2, const at::Tensor& expert_ids,
                                                const at::Tensor& gates, const std::optional<at::Tensor>& b1,
                                                const std::optional<at::Tensor>& b2, c10::string_view activation,
                                                const std::optional<at::Tensor>& saved_h);

// moe_routing.cpp: the token counts per expert and the block-aligned sort by expert
schema::MoeExpertHistogramFn moe_expert_histogram;
schema::MoeAlignFn moe_align;

// sampling.cpp: one masked-diffusion sampling step and one AR step, and the RNG test hooks
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_sample_step(
    const at::Tensor& cond, const std::optional<at::Tensor>& uncond, const at::Tensor& tokens,
    const at::Tensor& is_masked, const at::Tensor& sample_ids, int64_t seed_lo, int64_t seed_hi, int64_t step_lo,
    int64_t step_hi, double guidance_scale, double temperature, double tau, int64_t top_k, int64_t n_cap,
    int64_t mask_token_id);
std::tuple<at::Tensor, at::Tensor> ar_sample(const at::Tensor& logits, const at::Tensor& sample_ids,
                                             const at::Tensor& position, int64_t seed_lo, int64_t seed_hi,
                                             double temperature, int64_t top_k, double top_p, bool want_logprobs);
std::tuple<at::Tensor, at::Tensor> sampling_rng_words(const at::Tensor& sample, const at::Tensor& position,
                                                      const at::Tensor& token, int64_t seed_lo, int64_t seed_hi,
                                                      int64_t step_lo, int64_t step_hi, int64_t stream);
at::Tensor sampling_gumbel_from_words(const at::Tensor& hi, const at::Tensor& lo);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sampling_f32_math(const at::Tensor& x, const at::Tensor& rows);

}  // namespace unif2ace::cpu
