// Grouped MoE routing metadata on the CPU: expert histogram and moe_align (counting sort).
//
// Contract: unif2ace/kernels/reference/moe_routing.py (moe_expert_histogram_ref, moe_align_ref).
// Inputs are 1-D [N] or 2-D [T, k] integer expert ids with any strides (read in place, no
// copy); the flat assignment index of (t, j) is t * k + j. Ids outside [0, E) are dropped.
// All element indexing is int64. Work is split into a fixed number of chunks that depends only
// on N (never on the thread count), and every step is a deterministic integer computation, so
// results are bitwise identical from run to run and across thread counts.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/moe_checks.h"
#include "cpu/ops.h"

namespace unif2ace::cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per chunk
constexpr int64_t kMaxChunks = 64;

struct IdView {
  int64_t n;        // total elements
  int64_t k;        // inner size (1 for 1-D)
  int64_t stride0;  // row stride (elements)
  int64_t stride1;  // column stride (elements)
};

IdView make_view(const at::Tensor& ids) {
  TORCH_CHECK(ids.dim() == 1 || ids.dim() == 2, "moe routing: expert_ids must be 1-D or 2-D, got ", ids.dim(), "-D");
  IdView v;
  if (ids.dim() == 1) {
    v = {ids.size(0), 1, ids.stride(0), 0};
  } else {
    v = {ids.size(0) * ids.size(1), ids.size(1), ids.stride(0), ids.stride(1)};
  }
  return v;
}

// Calls f(i, id) for flat indices i in [lo, hi) in ascending order; walks rows and columns
// with a cursor (no per-element division), all offsets int64.
template <typename T, typename F>
inline void for_each_id(const T* p, const IdView& v, int64_t lo, int64_t hi, F&& f) {
  if (lo >= hi) return;
  if (v.k == 1) {
    for (int64_t i = lo; i < hi; ++i) f(i, static_cast<int64_t>(p[i * v.stride0]));
    return;
  }
  int64_t r = lo / v.k, c = lo - r * v.k;
  const T* row = p + r * v.stride0;
  for (int64_t i = lo; i < hi; ++i) {
    f(i, static_cast<int64_t>(row[c * v.stride1]));
    if (++c == v.k) {
      c = 0;
      row += v.stride0;
    }
  }
}

int64_t num_chunks(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (n + kChunk - 1) / kChunk)); }

// local[c * E + e] = number of ids == e in chunk c
template <typename T>
void chunk_histograms(const T* p, const IdView& v, int64_t E, int64_t nchunks, std::vector<int64_t>& local) {
  local.assign(static_cast<size_t>(nchunks * E), 0);
  const int64_t per = (v.n + nchunks - 1) / nchunks;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = local.data() + c * E;
      const int64_t lo = c * per, hi = std::min(v.n, lo + per);
      for_each_id(p, v, lo, hi, [&](int64_t, int64_t e) {
        if (e >= 0 && e < E) ++h[e];
      });
    }
  });
}

void check_args(const at::Tensor& ids, int64_t E) {
  TORCH_CHECK(ids.device().is_cpu(), "moe routing (cpu): expert_ids must be a CPU tensor");
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "moe routing (cpu): expert_ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(E >= 1, "moe routing (cpu): num_experts must be >= 1, got ", E);
}

}  // namespace

at::Tensor moe_expert_histogram(const at::Tensor& expert_ids, int64_t num_experts) {
  check_args(expert_ids, num_experts);
  const IdView v = make_view(expert_ids);
  const int64_t E = num_experts;
  const int64_t nchunks = num_chunks(v.n);
  std::vector<int64_t> local;
  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "moe_expert_histogram",
                          [&] { chunk_histograms(expert_ids.const_data_ptr<index_t>(), v, E, nchunks, local); });
  at::Tensor out = at::empty({E}, expert_ids.options().dtype(at::kInt));
  int32_t* o = out.mutable_data_ptr<int32_t>();
  at::parallel_for(0, E, 1024, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      int64_t s = 0;
      for (int64_t c = 0; c < nchunks; ++c) s += local[c * E + e];
      o[e] = static_cast<int32_t>(s);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align(const at::Tensor& expert_ids, int64_t num_experts,
                                                                     int64_t block_size) {
  check_args(expert_ids, num_experts);
  TORCH_CHECK(block_size >= 1, "moe_align (cpu): block_size must be >= 1, got ", block_size);
  const IdView v = make_view(expert_ids);
  const int64_t E = num_experts, N = v.n, bs = block_size;
  const moe::AlignSizes sizes = moe::align_sizes("moe_align (cpu)", N, E, bs);
  const int64_t max_len = sizes.max_len, max_blocks = sizes.max_blocks;
  const int64_t nchunks = num_chunks(N);
  const int64_t per = (N + nchunks - 1) / nchunks;

  auto opts = expert_ids.options().dtype(at::kInt);
  at::Tensor sorted = at::empty({max_len}, opts);
  at::Tensor blocks = at::empty({max_blocks}, opts);
  at::Tensor total = at::empty({1}, opts);
  at::Tensor counts = at::empty({E}, opts);
  int32_t* s_out = sorted.mutable_data_ptr<int32_t>();
  int32_t* b_out = blocks.mutable_data_ptr<int32_t>();
  int32_t* c_out = counts.mutable_data_ptr<int32_t>();

  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "moe_align", [&] {
    const index_t* p = expert_ids.const_data_ptr<index_t>();
    // 1. per-chunk histograms
    std::vector<int64_t> local;
    chunk_histograms(p, v, E, nchunks, local);
    // 2. counts, padded exclusive scan over experts (serial: E is small), and each chunk's
    //    write cursor per expert = expert offset + counts of the chunks before it (stable).
    std::vector<int64_t> offset(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) {
      int64_t cnt = 0;
      for (int64_t c = 0; c < nchunks; ++c) {
        int64_t& slot = local[c * E + e];
        const int64_t here = slot;
        slot = offset[e] + cnt;  // becomes the cursor of chunk c for expert e
        cnt += here;
      }
      c_out[e] = static_cast<int32_t>(cnt);
      offset[e + 1] = offset[e] + (cnt + bs - 1) / bs * bs;
    }
    const int64_t padded_total = offset[E];
    total.mutable_data_ptr<int32_t>()[0] = static_cast<int32_t>(padded_total);
    // 3. sentinel everywhere, then the stable scatter overwrites the real entries
    const int32_t sentinel = static_cast<int32_t>(N);
    at::parallel_for(0, max_len, 1 << 16, [&](int64_t a, int64_t b) { std::fill(s_out + a, s_out + b, sentinel); });
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* cur = local.data() + c * E;
        const int64_t lo = c * per, hi = std::min(N, lo + per);
        for_each_id(p, v, lo, hi, [&](int64_t i, int64_t e) {
          if (e >= 0 && e < E) s_out[cur[e]++] = static_cast<int32_t>(i);
        });
      }
    });
    // 4. block -> expert map
    at::parallel_for(0, max_blocks, 1 << 14, [&](int64_t a, int64_t b) { std::fill(b_out + a, b_out + b, -1); });
    at::parallel_for(0, E, 64, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        for (int64_t blk = offset[e] / bs; blk < offset[e + 1] / bs; ++blk) b_out[blk] = static_cast<int32_t>(e);
      }
    });
  });
  return {sorted, blocks, total, counts};
}
}  // namespace unif2ace::cpu
