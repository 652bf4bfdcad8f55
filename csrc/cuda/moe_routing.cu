// Launchers for the MoE routing kernels (device code in moe_routing.cuh): the entry points of
// torch.ops.unif2ace_cuda.moe_expert_histogram / moe_align (registered in module.cpp). No host
// syncs: all outputs are sized from host-known shapes; the padded total stays on the device.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <tuple>

#include "common/moe_checks.h"
#include "cuda/launch.h"
#include "cuda/moe_routing.cuh"
#include "cuda/ops.h"

namespace unif2ace::cuda {
namespace {

IdView make_view(const at::Tensor& ids) {
  TORCH_CHECK(ids.dim() == 1 || ids.dim() == 2, "moe routing (cuda): expert_ids must be 1-D or 2-D, got ", ids.dim(),
              "-D");
  if (ids.dim() == 1) return IdView{ids.size(0), 1, ids.stride(0), 0};
  return IdView{ids.size(0) * ids.size(1), ids.size(1), ids.stride(0), ids.stride(1)};
}

void check_args(const at::Tensor& ids, int64_t E) {
  TORCH_CHECK(on_device(ids), "moe routing (cuda): expert_ids must be a ", kDeviceName, " tensor, got ", ids.device());
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "moe routing (cuda): expert_ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(E >= 1 && E < (int64_t(1) << 31), "moe routing (cuda): num_experts out of range: ", E);
}

constexpr int kHistThreads = 256;
constexpr int kHistMaxBlocks = 1024;
constexpr int64_t kSmemLimit = 48 * 1024;

}  // namespace

at::Tensor moe_expert_histogram(const at::Tensor& expert_ids, int64_t num_experts) {
  check_args(expert_ids, num_experts);
  DeviceGuard guard(expert_ids.device());
  const IdView v = make_view(expert_ids);
  const int32_t E = static_cast<int32_t>(num_experts);
  at::Tensor counts = at::zeros({num_experts}, expert_ids.options().dtype(at::kInt));
  if (v.n == 0) return counts;
  cudaStream_t stream = current_stream();
  const int blocks = static_cast<int>(std::min<int64_t>(kHistMaxBlocks, (v.n + kHistThreads - 1) / kHistThreads));
  const int64_t smem = static_cast<int64_t>(E) * sizeof(int32_t);
  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "moe_expert_histogram_cuda", [&] {
    const index_t* p = expert_ids.const_data_ptr<index_t>();
    if (smem <= kSmemLimit) {
      launch(expert_histogram_smem_kernel<index_t>, blocks, kHistThreads, smem, stream, p, v, E,
             counts.mutable_data_ptr<int32_t>());
    } else {
      launch(expert_histogram_global_kernel<index_t>, blocks, kHistThreads, 0, stream, p, v, E,
             counts.mutable_data_ptr<int32_t>());
    }
  });
  return counts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align(const at::Tensor& expert_ids, int64_t num_experts,
                                                                     int64_t block_size) {
  check_args(expert_ids, num_experts);
  TORCH_CHECK(num_experts <= kAlignMaxExperts, "moe_align (cuda): num_experts must be <= ", kAlignMaxExperts, ", got ",
              num_experts);
  TORCH_CHECK(block_size >= 1, "moe_align (cuda): block_size must be >= 1, got ", block_size);
  DeviceGuard guard(expert_ids.device());
  const IdView v = make_view(expert_ids);
  const int64_t E = num_experts, N = v.n, bs = block_size;
  const moe::AlignSizes sizes = moe::align_sizes("moe_align (cuda)", N, E, bs);
  const int64_t max_len = sizes.max_len, max_blocks = sizes.max_blocks;
  auto opts = expert_ids.options().dtype(at::kInt);
  at::Tensor sorted = at::full({max_len}, N, opts);
  at::Tensor blocks = at::empty({max_blocks}, opts);
  at::Tensor total = at::empty({1}, opts);
  at::Tensor counts = at::empty({E}, opts);
  // sub-tiles per tile: at most ~kAlignTargetTiles tiles (see moe_routing.cuh)
  const int64_t sub_tiles =
      std::clamp<int64_t>((N + kTile * kAlignTargetTiles - 1) / (kTile * kAlignTargetTiles), 1, kAlignMaxSubTiles);
  const int64_t num_tiles = (N + kTile * sub_tiles - 1) / (kTile * sub_tiles);
  at::Tensor tile_counts = at::empty({std::max<int64_t>(num_tiles, 1) * E}, opts);
  cudaStream_t stream = current_stream();
  const int64_t smem = static_cast<int64_t>(kTileWarps + 1) * E * sizeof(int32_t);
  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "moe_align_cuda", [&] {
    const index_t* p = expert_ids.const_data_ptr<index_t>();
    if (num_tiles > 0) {
      launch(align_tile_count_kernel<index_t>, static_cast<unsigned>(num_tiles), kTile, smem, stream, p, v,
             static_cast<int32_t>(E), static_cast<int32_t>(sub_tiles), tile_counts.mutable_data_ptr<int32_t>());
    }
    launch(align_scan_kernel, 1, kScanThreads, 0, stream, tile_counts.mutable_data_ptr<int32_t>(), num_tiles,
           static_cast<int32_t>(E), static_cast<int32_t>(bs), max_blocks, counts.mutable_data_ptr<int32_t>(),
           blocks.mutable_data_ptr<int32_t>(), total.mutable_data_ptr<int32_t>());
    if (num_tiles > 0) {
      launch(align_scatter_kernel<index_t>, static_cast<unsigned>(num_tiles), kTile, smem, stream, p, v,
             static_cast<int32_t>(E), static_cast<int32_t>(sub_tiles), tile_counts.const_data_ptr<int32_t>(),
             sorted.mutable_data_ptr<int32_t>());
    }
  });
  return {sorted, blocks, total, counts};
}
}  // namespace unif2ace::cuda
