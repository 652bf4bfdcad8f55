// The schemas of the ops of the CPU library (unif2ace_cpu, csrc/cpu) and the CUDA library
// (unif2ace_cuda, csrc/cuda), which each library's module.cpp registers. The ops that both define
// come first: per op, one schema text and one C++ type of the entry point (`<Name>Fn`; each
// library's ops.h declares its entry point with it) for both, and one registration
// (define_shared_ops), so that the two backends of an op cannot drift apart (the Python layer calls
// either with the same arguments). Each library's own
// ops follow (the two ar_sample ops differ: the CUDA one takes its thresholds and call keys from
// the Python glue).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace unif2ace::schema {

// clang-format off
inline constexpr char lse_gather[] = "lse_gather(Tensor logits, Tensor target, int ignore_index) -> (Tensor, Tensor, Tensor)";
inline constexpr char lse_gather_backward[] = "lse_gather_backward(Tensor logits, Tensor target, Tensor row_max, Tensor lse_rel, Tensor grad_lse, Tensor grad_tgt, int ignore_index) -> Tensor";
inline constexpr char moe_gating[] = "moe_gating(Tensor router_logits, Tensor group_ids, int[] group_sizes, int top_k, str score, bool renormalize, float balance_coef) -> (Tensor, Tensor, Tensor, Tensor, Tensor)";
inline constexpr char moe_gating_backward[] = "moe_gating_backward(Tensor grad_gates, Tensor grad_prob, Tensor grad_loss, Tensor router_logits, Tensor group_ids, int[] group_sizes, int top_k, str score, bool renormalize, float balance_coef) -> Tensor";
inline constexpr char moe_expert_histogram[] = "moe_expert_histogram(Tensor expert_ids, int num_experts) -> Tensor";
inline constexpr char moe_align[] = "moe_align(Tensor expert_ids, int num_experts, int block_size) -> (Tensor, Tensor, Tensor, Tensor)";

// the CPU library's own ops
inline constexpr char lse_gather_backward_inplace[] = "lse_gather_backward_(Tensor(a!) logits, Tensor target, Tensor row_max, Tensor lse_rel, Tensor grad_lse, Tensor grad_tgt, int ignore_index) -> ()";
inline constexpr char lse_gather_grad_inplace[] = "lse_gather_grad_(Tensor(a!) logits, Tensor target, Tensor a, Tensor b, Tensor c, Tensor g, int ignore_index) -> (Tensor, Tensor, Tensor)";
inline constexpr char moe_expert_mlp[] = "moe_expert_mlp(Tensor x, Tensor w1, Tensor w2, Tensor expert_ids, Tensor gates, Tensor? b1, Tensor? b2, str activation) -> Tensor[]";
inline constexpr char moe_expert_mlp_backward[] = "moe_expert_mlp_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, Tensor expert_ids, Tensor gates, Tensor? b1, Tensor? b2, str activation, Tensor? saved_h=None) -> Tensor[]";
inline constexpr char masked_sample_step[] = "masked_sample_step(Tensor cond, Tensor? uncond, Tensor tokens, Tensor is_masked, Tensor sample_ids, int seed_lo, int seed_hi, int step_lo, int step_hi, float guidance_scale, float temperature, float tau, int top_k, int n_cap, int mask_token_id) -> (Tensor, Tensor, Tensor, Tensor)";
inline constexpr char cpu_ar_sample[] = "ar_sample(Tensor logits, Tensor sample_ids, Tensor position, int seed_lo, int seed_hi, float temperature, int top_k, float top_p, bool logprobs) -> (Tensor, Tensor)";
inline constexpr char sampling_rng_words[] = "sampling_rng_words(Tensor sample, Tensor position, Tensor token, int seed_lo, int seed_hi, int step_lo, int step_hi, int stream) -> (Tensor, Tensor)";
inline constexpr char sampling_gumbel_from_words[] = "sampling_gumbel_from_words(Tensor hi, Tensor lo) -> Tensor";
inline constexpr char sampling_f32_math[] = "sampling_f32_math(Tensor x, Tensor rows) -> (Tensor, Tensor, Tensor)";

// the CUDA library's own ops
inline constexpr char masked_step_sample[] = "masked_step_sample(Tensor cond, Tensor? unc, Tensor tokens, Tensor is_masked, Tensor sample_ids, Tensor? thr, float a, float s, float temperature, float tau, bool greedy, bool has_noise, int k_tok_hi, int k_tok_lo, int k_conf_hi, int k_conf_lo) -> (Tensor, Tensor)";
inline constexpr char masked_step_remask[] = "masked_step_remask(Tensor conf, Tensor is_masked, Tensor tokens, Tensor sampled, int n_sched, bool last, int mask_token_id) -> (Tensor, Tensor, Tensor)";
inline constexpr char cuda_ar_sample[] = "ar_sample(Tensor logits, Tensor sample_ids, Tensor position, Tensor? thr, float temperature, bool greedy, int k_tok_hi, int k_tok_lo) -> (Tensor, Tensor)";
// clang-format on

using LseGatherFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& logits, const at::Tensor& target,
                                                                   int64_t ignore_index);
using LseGatherBackwardFn = at::Tensor(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& row_max,
                                       const at::Tensor& lse_rel, const at::Tensor& grad_lse,
                                       const at::Tensor& grad_tgt, int64_t ignore_index);
using MoeGatingFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& router_logits, const at::Tensor& group_ids, c10::IntArrayRef group_sizes, int64_t top_k,
    c10::string_view score, bool renormalize, double balance_coef);
using MoeGatingBackwardFn = at::Tensor(const at::Tensor& grad_gates, const at::Tensor& grad_prob,
                                       const at::Tensor& grad_loss, const at::Tensor& router_logits,
                                       const at::Tensor& group_ids, c10::IntArrayRef group_sizes, int64_t top_k,
                                       c10::string_view score, bool renormalize, double balance_coef);
using MoeExpertHistogramFn = at::Tensor(const at::Tensor& expert_ids, int64_t num_experts);
using MoeAlignFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& expert_ids,
                                                                              int64_t num_experts, int64_t block_size);

// The entry points of the ops both libraries define, one library's (from its ops.h).
struct SharedOps {
  LseGatherFn* lse_gather;
  LseGatherBackwardFn* lse_gather_backward;
  MoeGatingFn* moe_gating;
  MoeGatingBackwardFn* moe_gating_backward;
  MoeExpertHistogramFn* moe_expert_histogram;
  MoeAlignFn* moe_align;
};

// Defines the ops both libraries define, with one library's entry points: the part of the two
// module.cpp registrations that is the same for both.
inline void define_shared_ops(torch::Library& m, const SharedOps& ops) {
  m.def(lse_gather, ops.lse_gather);
  m.def(lse_gather_backward, ops.lse_gather_backward);
  m.def(moe_gating, ops.moe_gating);
  m.def(moe_gating_backward, ops.moe_gating_backward);
  m.def(moe_expert_histogram, ops.moe_expert_histogram);
  m.def(moe_align, ops.moe_align);
}

}  // namespace unif2ace::schema
