// The schemas of the ops that both the CPU library (unif2ace_cpu, csrc/cpu) and the CUDA library
// (unif2ace_cuda, csrc/cuda) define: one text for both, so that the two backends of an op cannot
// drift apart (the Python layer calls either with the same arguments).
#pragma once

namespace unif2ace::schema {

// clang-format off
inline constexpr char lse_gather[] = "lse_gather(Tensor logits, Tensor target, int ignore_index) -> (Tensor, Tensor, Tensor)";
inline constexpr char lse_gather_backward[] = "lse_gather_backward(Tensor logits, Tensor target, Tensor row_max, Tensor lse_rel, Tensor grad_lse, Tensor grad_tgt, int ignore_index) -> Tensor";
inline constexpr char moe_gating[] = "moe_gating(Tensor router_logits, Tensor group_ids, int[] group_sizes, int top_k, str score, bool renormalize, float balance_coef) -> (Tensor, Tensor, Tensor, Tensor, Tensor)";
inline constexpr char moe_gating_backward[] = "moe_gating_backward(Tensor grad_gates, Tensor grad_prob, Tensor grad_loss, Tensor router_logits, Tensor group_ids, int[] group_sizes, int top_k, str score, bool renormalize, float balance_coef) -> Tensor";
inline constexpr char moe_expert_histogram[] = "moe_expert_histogram(Tensor expert_ids, int num_experts) -> Tensor";
inline constexpr char moe_align[] = "moe_align(Tensor expert_ids, int num_experts, int block_size) -> (Tensor, Tensor, Tensor, Tensor)";
// clang-format on

}  // namespace unif2ace::schema
