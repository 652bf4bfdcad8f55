// Host-side argument checks and output sizes that the CPU (csrc/cpu) and CUDA (csrc/cuda) entry
// points of the MoE ops share, so that both backends accept the same inputs with the same errors.
// `op` names the op and backend in the messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace unif2ace::moe {

// The upstream gradients of moe_gating_backward: grad_gates [T, k], grad_prob [E], grad_loss [G].
inline void check_gating_grads(const char* op, const at::Tensor& grad_gates, const at::Tensor& grad_prob,
                               const at::Tensor& grad_loss, int64_t T, int64_t k, int64_t E, int64_t G) {
  TORCH_CHECK(grad_gates.dim() == 2 && grad_gates.size(0) == T && grad_gates.size(1) == k, op,
              ": grad_gates must be [T, k] = [", T, ", ", k, "], got ", grad_gates.sizes());
  TORCH_CHECK(grad_prob.dim() == 1 && grad_prob.size(0) == E, op, ": grad_prob must be [", E, "], got ",
              grad_prob.sizes());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == G, op, ": grad_loss must be [", G, "], got ",
              grad_loss.sizes());
}

// moe_align's outputs for N assignments, E experts and block size bs >= 1: the sorted list's length
// bound N + E*(bs-1) (checked to fit int32 indices) and its number of blocks.
struct AlignSizes {
  int64_t max_len, max_blocks;
};

inline AlignSizes align_sizes(const char* op, int64_t N, int64_t E, int64_t bs) {
  const int64_t max_len = N + E * (bs - 1);
  TORCH_CHECK(max_len < (int64_t(1) << 31), op, ": T*k + E*(block_size-1) = ", max_len, " does not fit int32 indices");
  return {max_len, (max_len + bs - 1) / bs};
}

}  // namespace unif2ace::moe
