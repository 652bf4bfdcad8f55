// Grouped MoE routing metadata on the GPU: expert histogram and moe_align (torch-free device code).
//
// Contract: unif2ace/kernels/reference/moe_routing.py (moe_expert_histogram_ref, moe_align_ref).
// expert ids are read in place from a 1-D [N] or 2-D [T, k] view with arbitrary strides; the
// flat assignment index of (t, j) is t * k + j; ids outside [0, E) are dropped. Element
// indexing is int64 throughout; per-expert counts and list positions are int32 (the host checks
// N + E*(block_size-1) < 2^31 for align).
//
// moe_align is deterministic (each expert's list is in ascending flat index, no atomics decide
// positions): tiles of kTile entries (one per thread) count per expert (warp match + per-warp
// counts in shared memory), one CTA scans the tile counts per expert and the padded counts
// over experts, and a second tile pass writes each entry at
//   offset[e] + (entries of e in earlier tiles) + (entries of e earlier in this tile).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "cuda/common.cuh"

namespace unif2ace::cuda {

struct IdView {
  int64_t n;        // total entries
  int64_t k;        // inner size (1 for 1-D)
  int64_t stride0;  // row stride in elements
  int64_t stride1;  // column stride in elements
};

constexpr int kTile = 256;  // entries per tile = threads per CTA in the tile passes
constexpr int kTileWarps = kTile / 32;
constexpr int kAlignMaxExperts = 1024;  // single-CTA scan; smem kTileWarps * E int32
constexpr int kScanThreads = 1024;

template <typename T>
__device__ __forceinline__ int64_t load_id(const T* __restrict__ p, const IdView& v, int64_t i) {
  if (v.k == 1) return static_cast<int64_t>(p[i * v.stride0]);
  const int64_t r = i / v.k, c = i - r * v.k;
  return static_cast<int64_t>(p[r * v.stride0 + c * v.stride1]);
}

// ---------------------------------------------------------------------------------------------
// Histogram: block-local shared-memory histogram, then one atomicAdd per (block, expert) into
// the zero-initialised global counts. Grid-stride loop with int64 indices.
template <typename T>
__global__ void expert_histogram_smem_kernel(const T* __restrict__ ids, IdView v, int32_t E,
                                             int32_t* __restrict__ counts) {
  UNIF2ACE_DYNAMIC_SHARED(int32_t, sh_hist);
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) sh_hist[e] = 0;
  __syncthreads();
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < v.n; i += step) {
    const int64_t e = load_id(ids, v, i);
    if (e >= 0 && e < E) atomicAdd(&sh_hist[e], 1);
  }
  __syncthreads();
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) {
    const int32_t c = sh_hist[e];
    if (c != 0) atomicAdd(&counts[e], c);
  }
}

// Fallback when E int32 counters do not fit in shared memory: global atomics directly.
template <typename T>
__global__ void expert_histogram_global_kernel(const T* __restrict__ ids, IdView v, int32_t E,
                                               int32_t* __restrict__ counts) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < v.n; i += step) {
    const int64_t e = load_id(ids, v, i);
    if (e >= 0 && e < E) atomicAdd(&counts[e], 1);
  }
}

// ---------------------------------------------------------------------------------------------
// Align, pass 1 and 3 share the tile ranking. For the entry of this thread: its expert (or -1)
// and its rank among the tile's entries of the same expert that come before it. On return
// warp_counts[w * E + e] holds the count of expert e in warp w (valid after __syncthreads()).
template <typename T>
__device__ __forceinline__ void tile_rank(const T* __restrict__ ids, const IdView& v, int32_t E, int32_t* warp_counts,
                                          int64_t& expert, int32_t& rank_in_warp) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int32_t i = threadIdx.x; i < kTileWarps * E; i += blockDim.x) warp_counts[i] = 0;
  __syncthreads();
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  int64_t e = -1;
  if (idx < v.n) {
    e = load_id(ids, v, idx);
    if (e < 0 || e >= E) e = -1;
  }
  const unsigned peers = __match_any_sync(0xffffffffu, static_cast<long long>(e));
  rank_in_warp = __popc(peers & ((1u << lane) - 1u));
  if (e >= 0 && rank_in_warp == 0) warp_counts[warp * E + e] = __popc(peers);
  expert = e;
  __syncthreads();
}

// Pass 1: tile_counts[tile * E + e] = entries of expert e in this tile.
template <typename T>
__global__ void __launch_bounds__(kTile)
    align_tile_count_kernel(const T* __restrict__ ids, IdView v, int32_t E, int32_t* __restrict__ tile_counts) {
  UNIF2ACE_DYNAMIC_SHARED(int32_t, warp_counts);
  int64_t e;
  int32_t r;
  tile_rank(ids, v, E, warp_counts, e, r);
  for (int32_t x = threadIdx.x; x < E; x += blockDim.x) {
    int32_t s = 0;
#pragma unroll
    for (int w = 0; w < kTileWarps; ++w) s += warp_counts[w * E + x];
    tile_counts[static_cast<int64_t>(blockIdx.x) * E + x] = s;
  }
}

// Pass 2 (one CTA of kScanThreads threads, E <= kScanThreads): per expert, turn the tile counts
// into write cursors (exclusive scan over tiles plus the expert's segment offset); padded
// exclusive scan over experts; counts, padded total and the block -> expert map.
__global__ void __launch_bounds__(kScanThreads)
    align_scan_kernel(int32_t* __restrict__ tile_counts, int64_t num_tiles, int32_t E, int32_t block_size,
                      int64_t max_blocks, int32_t* __restrict__ expert_counts, int32_t* __restrict__ block_expert_ids,
                      int32_t* __restrict__ total_out) {
  __shared__ int32_t scan[kScanThreads];
  const int32_t e = threadIdx.x;
  int32_t cnt = 0;
  if (e < E) {
    for (int64_t t = 0; t < num_tiles; ++t) cnt += tile_counts[t * E + e];
  }
  const int32_t padded = (cnt + block_size - 1) / block_size * block_size;
  scan[threadIdx.x] = (e < E) ? padded : 0;
  __syncthreads();
  // Hillis-Steele inclusive scan
  for (int off = 1; off < kScanThreads; off <<= 1) {
    const int32_t add = threadIdx.x >= off ? scan[threadIdx.x - off] : 0;
    __syncthreads();
    scan[threadIdx.x] += add;
    __syncthreads();
  }
  const int32_t seg_end = scan[threadIdx.x];
  const int32_t seg_begin = seg_end - ((e < E) ? padded : 0);
  const int32_t total = scan[kScanThreads - 1];
  if (e < E) {
    expert_counts[e] = cnt;
    int32_t run = seg_begin;
    for (int64_t t = 0; t < num_tiles; ++t) {
      const int32_t c = tile_counts[t * E + e];
      tile_counts[t * E + e] = run;
      run += c;
    }
    for (int32_t b = seg_begin / block_size; b < seg_end / block_size; ++b) block_expert_ids[b] = e;
  }
  if (threadIdx.x == 0) total_out[0] = total;
  for (int64_t b = total / block_size + threadIdx.x; b < max_blocks; b += blockDim.x) block_expert_ids[b] = -1;
}

// Pass 3: scatter flat indices to their stable positions (sorted_ids pre-filled with sentinel N).
template <typename T>
__global__ void __launch_bounds__(kTile)
    align_scatter_kernel(const T* __restrict__ ids, IdView v, int32_t E, const int32_t* __restrict__ tile_cursor,
                         int32_t* __restrict__ sorted_ids) {
  UNIF2ACE_DYNAMIC_SHARED(int32_t, warp_counts);
  int64_t e;
  int32_t r;
  tile_rank(ids, v, E, warp_counts, e, r);
  if (e < 0) return;
  const int warp = threadIdx.x / 32;
  int32_t before = 0;
  for (int w = 0; w < warp; ++w) before += warp_counts[w * E + e];
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t pos = static_cast<int64_t>(tile_cursor[static_cast<int64_t>(blockIdx.x) * E + e]) + before + r;
  sorted_ids[pos] = static_cast<int32_t>(idx);
}

}  // namespace unif2ace::cuda
