// Grouped MoE gating on the GPU (torch-free device code): top-k within each token's task group,
// the per-group balance statistics, and the backward w.r.t. the router logits.
//
// Contract: unif2ace/kernels/reference/moe_gating.py (moe_gating_ref, moe_gating_backward_ref); the
// same math as csrc/cpu/moe_gating.cpp.
//
// Geometry: one warp per token. Group g owns global columns [offs[g], offs[g+1]) (size <= 128 =
// kMaxGroupExperts; unif2ace/kernels/cuda/moe_gating.py runs the reference for larger groups). Lane l holds
// the group's local columns l, l+32, l+64, l+96 in registers (kSlots = 4), scores in fp32:
//   softmax: warp max, expf(z - max), per-lane then butterfly warp sum, divide by the sum;
//   sigmoid: 1 / (1 + expf(-z)).
// This is the element layout, summation order and arithmetic of PyTorch's CUDA warp softmax
// (softmax_warp_forward, dims <= 1024) and sigmoid, so fp32 scores, and hence the chosen ids,
// should match the reference run on the GPU bit for bit (not relied on: tests use tolerances).
// Top-k: k rounds of a warp arg-max over the columns not yet taken; "better" ranks NaN above
// every number and breaks equal scores towards the lowest index (the reference's stable sort).
// Every lane ends a round with the winner, so the renormalisation sum runs in round order j = 0..k-1.
//
// Statistics, deterministically (no float atomics, results independent of scheduling):
//   forward kernel: block b owns the contiguous token range [b*tpb, (b+1)*tpb); warp w of the
//   block handles tokens b*tpb + w + kWarps*i in order and accumulates into its own row of
//   per-warp accumulators (score sums P[E], assignment counts C[E], tokens per group N[G]);
//   a global column belongs to one group and one local index, hence to one lane: no two threads
//   ever touch the same cell. The block then sums its kWarps rows in warp order into row b of the
//   [num_blocks, E] partial buffers. The accumulator rows live in shared memory when they fit in
//   48 KiB, else in a global scratch buffer (same code through generic pointers).
//   stats kernel: one CTA per group sums the partial rows in a fixed order (double for scores,
//   int64 for counts) and writes f_e = C_e / (T_g k), P_e = sum_e / T_g and the loss
//   coef * size_g * sum_e f_e P_e (all 0 for a group with no tokens); in backward mode it writes
//   dbase_e = (grad_prob_e + grad_loss_g * coef * size_g * f_e) / T_g instead.
// The number of blocks depends on T only, so results are bitwise reproducible on any GPU.
//
// Backward (nothing saved but the inputs): the forward kernel in counts-only mode, the stats kernel
// in backward mode, then one warp per token recomputing scores and the selection:
//   ds_e = dbase_e (+ dc_j at the chosen e = idx_j), dc = grad_gates or, renormalised,
//   (grad_gates - <grad_gates, gates>) / sum(c); dz = s * (ds - <ds, s>) (softmax) or
//   ds * s * (1 - s) (sigmoid); zeros outside the token's group columns.
//
// A group id outside [0, G) (the public op checks this eagerly; the check is skipped under
// torch.compile) never reads out of bounds: that token gets ids -1, gates 0, no statistics and a
// zero gradient row. All element indexing is int64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include <math_constants.h>
#include "cuda/common.cuh"

namespace unif2ace::cuda {
namespace gating {

constexpr int kMaxGroupExperts = 128;          // experts per group handled by one warp
constexpr int kSlots = kMaxGroupExperts / 32;  // columns per lane
constexpr int kMaxGroups = 255;                // groups passed by value in the kernel parameters
constexpr int kWarps = 8;                      // warps (tokens in flight) per CTA
constexpr int kThreads = kWarps * 32;
constexpr int kMaxBlocks = 1024;       // statistics partial rows (smem accumulators)
constexpr int kMaxBlocksGlobal = 64;   // ... when the accumulators live in global scratch
constexpr int kSmemLimit = 48 * 1024;  // default dynamic shared memory limit (no opt-in)
constexpr int kStatCols = 32;          // stats kernel: 32 experts x 8 partial-row lanes
constexpr int kStatRows = 8;
constexpr int kStatThreads = kStatCols * kStatRows;
constexpr int kNone = 0x7fffffff;  // "no candidate" index in the arg-max

struct Groups {
  int32_t G;
  int32_t offs[kMaxGroups + 1];  // offs[0] = 0, offs[G] = E
};

struct Params {
  int64_t T;
  int64_t E;
  int64_t row_stride;  // router_logits row stride in elements (unit column stride)
  int64_t gid_stride;  // group_ids stride in elements
  int64_t tpb;         // tokens per block (forward / counts kernel)
  int32_t k;
  int32_t softmax;      // 1: softmax, 0: sigmoid
  int32_t renormalize;  // 1: divide the chosen scores by their sum
};

// a ranks strictly above b: NaN above every number; equal values do not (index order decides)
__device__ __forceinline__ bool above(float a, float b) { return (isnan(a) && !isnan(b)) || a > b; }

// candidate (av, ai) beats (bv, bi): a strict total order on distinct indices; kNone loses
__device__ __forceinline__ bool better(float av, int ai, float bv, int bi) {
  if (ai == kNone) return false;
  if (bi == kNone) return true;
  if (above(av, bv)) return true;
  if (above(bv, av)) return false;
  return ai < bi;
}

template <typename G>
__device__ __forceinline__ int64_t load_group(const G* __restrict__ gids, const Params& p, int64_t t) {
  return static_cast<int64_t>(gids[t * p.gid_stride]);
}

// fp32 scores of the token's group columns c = lane + 32 i < n (0 elsewhere)
template <typename T>
__device__ __forceinline__ void token_scores(const T* __restrict__ row, int n, int lane, bool softmax,
                                             float (&s)[kSlots]) {
  float z[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int c = lane + 32 * i;
    z[i] = c < n ? to_f32(row[c]) : -CUDART_INF_F;
  }
  if (softmax) {
    float m = z[0];
#pragma unroll
    for (int i = 1; i < kSlots; ++i) m = fmaxf(m, z[i]);
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int c = lane + 32 * i;
      s[i] = c < n ? expf(z[i] - m) : 0.f;
      sum += s[i];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < kSlots; ++i) s[i] = s[i] / sum;
  } else {
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int c = lane + 32 * i;
      s[i] = c < n ? 1.0f / (1.0f + expf(-z[i])) : 0.f;
    }
  }
}

// k rounds of warp arg-max. On return (every lane): `taken` has bit i set when this lane's column
// lane + 32 i was chosen, round_of[i] its rank j; csum = sum of the chosen scores in rank order.
// Rank j's (local column, score) is also kept by lane j % 32 in slot j / 32 (sel_c, sel_v).
__device__ __forceinline__ void select_topk(const float (&s)[kSlots], int n, int k, int lane, unsigned& taken,
                                            int (&round_of)[kSlots], int (&sel_c)[kSlots], float (&sel_v)[kSlots],
                                            float& csum) {
  taken = 0u;
  csum = 0.f;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    round_of[i] = -1;
    sel_c[i] = -1;
    sel_v[i] = 0.f;
  }
  for (int j = 0; j < k; ++j) {
    float bv = -CUDART_INF_F;
    int bi = kNone;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int c = lane + 32 * i;
      // columns ascend within the lane: a later equal score never displaces an earlier one
      if (c < n && !((taken >> i) & 1u) && (bi == kNone || above(s[i], bv))) {
        bv = s[i];
        bi = c;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
      if (better(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    // k <= n, so bi is a real column here; every lane holds the same (bv, bi)
    csum += bv;
    const int owner = bi & 31, slot = bi >> 5;
    const int jl = j & 31, js = j >> 5;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      if (lane == owner && i == slot) {
        taken |= 1u << i;
        round_of[i] = j;
      }
      if (lane == jl && i == js) {
        sel_c[i] = bi;
        sel_v[i] = bv;
      }
    }
  }
}

// One token's group window [lo, lo + n), its scores s (token_scores) and top-k selection
// (select_topk's outputs). Lives in registers: every index into the arrays is a compile-time
// constant after unrolling.
struct TokenChoice {
  int lo, n;
  float s[kSlots];
  unsigned taken;
  int round_of[kSlots], sel_c[kSlots];
  float sel_v[kSlots], csum;
};

// Scores and top-k of token t of group g (0 <= g < G), the whole warp.
template <typename T>
__device__ __forceinline__ void choose_experts(const T* __restrict__ logits, const Params& p, const Groups& grp,
                                               int64_t t, int64_t g, int lane, TokenChoice& c) {
  c.lo = grp.offs[g];
  c.n = grp.offs[g + 1] - c.lo;
  token_scores(logits + t * p.row_stride + c.lo, c.n, lane, p.softmax != 0, c.s);
  select_topk(c.s, c.n, p.k, lane, c.taken, c.round_of, c.sel_c, c.sel_v, c.csum);
}

// Forward (kOutputs: ids and gates; kProb: score sums) and the backward's counts-only pass.
// Dynamic shared memory: kWarps * (2E + G) 32-bit words when use_smem, else none (scratch holds
// gridDim.x * kWarps * (2E + G) words). Partial outputs: part_P/part_C [gridDim.x, E],
// part_N [gridDim.x, G].
template <typename T, typename G, bool kOutputs, bool kProb>
__global__ void __launch_bounds__(kThreads)
    gating_forward_kernel(const T* __restrict__ logits, const G* __restrict__ gids, Params p, Groups grp,
                          int32_t* __restrict__ ids, float* __restrict__ gates, int32_t* scratch, bool use_smem,
                          float* __restrict__ part_P, int32_t* __restrict__ part_C, int32_t* __restrict__ part_N) {
  UNIF2ACE_DYNAMIC_SHARED(int32_t, smem_acc);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t E = p.E;
  const int ng = grp.G;
  const int64_t row_words = 2 * E + ng;
  int32_t* base = use_smem ? smem_acc : scratch + static_cast<int64_t>(blockIdx.x) * kWarps * row_words;
  for (int64_t i = threadIdx.x; i < kWarps * row_words; i += kThreads) base[i] = 0;
  __syncthreads();

  float* wP = reinterpret_cast<float*>(base + warp * row_words);
  int32_t* wC = base + warp * row_words + E;
  int32_t* wN = base + warp * row_words + 2 * E;
  const int k = p.k;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * p.tpb;
  const int64_t t1 = t0 + p.tpb < p.T ? t0 + p.tpb : p.T;
  for (int64_t t = t0 + warp; t < t1; t += kWarps) {
    const int64_t g = load_group(gids, p, t);
    if (g < 0 || g >= ng) {  // invalid group: null routing, not counted
      if (kOutputs) {
        for (int j = lane; j < k; j += 32) {
          ids[t * k + j] = -1;
          gates[t * k + j] = 0.f;
        }
      }
      continue;
    }
    TokenChoice tc;
    choose_experts(logits, p, grp, t, g, lane, tc);
    const int lo = tc.lo, n = tc.n;
    if (kOutputs) {
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        const int j = lane + 32 * i;
        if (j < k) {
          ids[t * k + j] = lo + tc.sel_c[i];
          gates[t * k + j] = p.renormalize ? tc.sel_v[i] / tc.csum : tc.sel_v[i];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int c = lane + 32 * i;
      if (c < n) {
        if (kProb) wP[lo + c] += tc.s[i];
        if ((tc.taken >> i) & 1u) wC[lo + c] += 1;
      }
    }
    if (lane == 0) wN[g] += 1;
  }
  __syncthreads();

  // block partials: sum the warp rows in warp order
  const int64_t b = blockIdx.x;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    float ps = 0.f;
    int32_t cs = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (kProb) ps += reinterpret_cast<const float*>(base + w * row_words)[e];
      cs += base[w * row_words + E + e];
    }
    if (kProb) part_P[b * E + e] = ps;
    part_C[b * E + e] = cs;
  }
  for (int g = threadIdx.x; g < ng; g += kThreads) {
    int32_t ns = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) ns += base[w * row_words + 2 * E + g];
    part_N[b * ng + g] = ns;
  }
}

// One CTA per group (blockIdx.x = g), kStatThreads threads. Sums the nb partial rows in a fixed
// order. Forward (!kBackward): f, P [E] and loss [G]. Backward: dbase [E].
template <bool kBackward>
__global__ void __launch_bounds__(kStatThreads)
    gating_stats_kernel(const float* __restrict__ part_P, const int32_t* __restrict__ part_C,
                        const int32_t* __restrict__ part_N, int64_t nb, int64_t E, Groups grp, int32_t k, double coef,
                        float* __restrict__ f_out, float* __restrict__ P_out, float* __restrict__ loss_out,
                        const float* __restrict__ grad_prob, const float* __restrict__ grad_loss,
                        float* __restrict__ dbase) {
  __shared__ long long sN[kStatThreads];
  __shared__ double sP[kStatRows][kStatCols];
  __shared__ long long sC[kStatRows][kStatCols];
  __shared__ double sAcc[kStatCols];
  const int g = blockIdx.x;
  const int ng = grp.G;
  const int tx = threadIdx.x % kStatCols, ty = threadIdx.x / kStatCols;
  const int lo = grp.offs[g], size = grp.offs[g + 1] - lo;

  long long n_part = 0;
  for (int64_t b = threadIdx.x; b < nb; b += kStatThreads) n_part += part_N[b * ng + g];
  sN[threadIdx.x] = n_part;
  __syncthreads();
  long long n = 0;
  for (int i = 0; i < kStatThreads; ++i) n += sN[i];  // every thread, same order

  double acc = 0.0;  // per tx: sum of f_e * P_e over this column's experts
  for (int e0 = 0; e0 < size; e0 += kStatCols) {
    const int el = e0 + tx;
    const int64_t e = lo + el;
    double ps = 0.0;
    long long cs = 0;
    if (el < size) {
      for (int64_t b = ty; b < nb; b += kStatRows) {
        if (!kBackward) ps += static_cast<double>(part_P[b * E + e]);
        cs += part_C[b * E + e];
      }
    }
    sP[ty][tx] = ps;
    sC[ty][tx] = cs;
    __syncthreads();
    if (ty == 0 && el < size) {
      double psum = 0.0;
      long long cnt = 0;
#pragma unroll
      for (int r = 0; r < kStatRows; ++r) {
        psum += sP[r][tx];
        cnt += sC[r][tx];
      }
      const float f = n ? static_cast<float>(static_cast<double>(cnt) / static_cast<double>(n * k)) : 0.f;
      if (kBackward) {
        const float dP = grad_prob[e] + grad_loss[g] * static_cast<float>(coef) * static_cast<float>(size) * f;
        dbase[e] = n ? dP / static_cast<float>(n) : 0.f;
      } else {
        const float P = n ? static_cast<float>(psum / static_cast<double>(n)) : 0.f;
        f_out[e] = f;
        P_out[e] = P;
        acc += static_cast<double>(f) * static_cast<double>(P);
      }
    }
    __syncthreads();
  }
  if (!kBackward) {
    if (ty == 0) sAcc[tx] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int i = 0; i < kStatCols; ++i) total += sAcc[i];
      loss_out[g] = n ? static_cast<float>(coef * static_cast<double>(size) * total) : 0.f;
    }
  }
}

// Backward per token: grid-stride over tokens, one warp each. gg: [T, k] fp32 contiguous;
// dbase: [E] fp32; dz: [T, E] contiguous, every element written.
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
    gating_backward_kernel(const T* __restrict__ logits, const G* __restrict__ gids, Params p, Groups grp,
                           const float* __restrict__ gg, const float* __restrict__ dbase, T* __restrict__ dz) {
  const int lane = threadIdx.x & 31;
  const int64_t E = p.E;
  const int k = p.k;
  const T zero = from_f32<T>(0.f);
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); t < p.T; t += nwarps) {
    T* row = dz + t * E;
    const int64_t g = load_group(gids, p, t);
    if (g < 0 || g >= grp.G) {
      for (int64_t c = lane; c < E; c += 32) row[c] = zero;
      continue;
    }
    TokenChoice tc;
    choose_experts(logits, p, grp, t, g, lane, tc);
    const int lo = tc.lo, n = tc.n;

    const float* gt = gg + t * k;
    float ds[kSlots];
    float gdot = 0.f;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int c = lane + 32 * i;
      ds[i] = c < n ? dbase[lo + c] : 0.f;
      if (p.renormalize && ((tc.taken >> i) & 1u)) gdot += gt[tc.round_of[i]] * (tc.s[i] / tc.csum);
    }
    if (p.renormalize) gdot = warp_sum(gdot);  // <grad_gates, gates>
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      if ((tc.taken >> i) & 1u) {
        const float gj = gt[tc.round_of[i]];
        ds[i] += p.renormalize ? (gj - gdot) / tc.csum : gj;
      }
    }
    float out[kSlots];
    if (p.softmax) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < kSlots; ++i) dot += ds[i] * tc.s[i];  // 0 outside the group (ds = s = 0)
      dot = warp_sum(dot);
#pragma unroll
      for (int i = 0; i < kSlots; ++i) out[i] = tc.s[i] * (ds[i] - dot);
    } else {
#pragma unroll
      for (int i = 0; i < kSlots; ++i) out[i] = ds[i] * tc.s[i] * (1.f - tc.s[i]);
    }
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int c = lane + 32 * i;
      if (c < n) row[lo + c] = from_f32<T>(out[i]);
    }
    for (int64_t c = lane; c < lo; c += 32) row[c] = zero;
    for (int64_t c = lo + n + lane; c < E; c += 32) row[c] = zero;
  }
}

}  // namespace gating
}  // namespace unif2ace::cuda
