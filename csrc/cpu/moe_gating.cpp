// Grouped MoE gating on the CPU: top-k within each token's task group plus the per-group balance
// statistics, forward and backward.
//
// Contract: unif2ace/kernels/reference/moe_gating.py (moe_gating_ref, moe_gating_backward_ref).
//
//   moe_gating(router_logits [T, E] float/half/bf16, group_ids [T] int32/int64 in [0, G),
//              group_sizes int[G] (sum == E), top_k, score "softmax"|"sigmoid", renormalize,
//              balance_coef)
//       -> (expert_ids [T, k] int32, gates [T, k] fp32, f [E] fp32, P [E] fp32, loss [G] fp32)
//   moe_gating_backward(grad_gates [T, k], grad_prob [E], grad_loss [G], router_logits, group_ids,
//              group_sizes, top_k, score, renormalize, balance_coef)
//       -> d router_logits [T, E] (router_logits' dtype; 0 outside each token's group columns)
//
// Per token (one at::parallel_for over fixed token chunks): scores of the group's columns in fp32
// (softmax: max, exp, multiply by 1/sum, as PyTorch's CPU softmax does; sigmoid: 1/(1+exp(-z))),
// then a partial selection of the k largest (insertion into a k-list; equal scores keep index
// order, so ties go to the lowest index; NaN ranks above every number, as in torch.sort).
// Group statistics are reduced deterministically: the token range is cut into a number of chunks
// that depends on T only (never on the thread count); each chunk accumulates its experts' score
// sums (double) and assignment counts, then the chunks are summed in chunk order. Results are
// bitwise identical from run to run and across thread counts. All indexing is int64.
//
// The backward recomputes the scores and the selection (nothing but the inputs is saved):
// pass 1 rebuilds the per-group counts (f) and token counts T_g, pass 2 forms, per token,
//   ds_e = (grad_prob_e + grad_loss_g * coef * size_g * f_e) / T_g  (+ dc_j at the chosen e = idx_j)
//   dc = grad_gates, or (grad_gates - <grad_gates, gates>) / sum(c) when renormalised
//   dz = s * (ds - <ds, s>) (softmax) or ds * s * (1 - s) (sigmoid).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "common/moe_checks.h"
#include "cpu/ops.h"
#include "cpu/vec_math.h"

namespace unif2ace::cpu {
namespace {

constexpr int64_t kTokChunk = 64;  // tokens per statistics chunk (at least)
constexpr int64_t kMaxTokChunks = 256;
constexpr int64_t kParallelMin = 1 << 16;  // logits per task below which threads cost more than they save

struct GatingArgs {
  int64_t T, E, G, k;
  bool softmax, renormalize;
  double coef;
  std::vector<int64_t> offs;  // G + 1 group offsets
  int64_t max_size;
  int64_t nchunks, per;
  int64_t chunk_grain;  // chunks per parallel task (all in one task for small inputs)
};

GatingArgs make_args(const char* op, const at::Tensor& logits, const at::Tensor& gid, c10::IntArrayRef sizes,
                     int64_t top_k, c10::string_view score, bool renormalize, double coef) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": router_logits must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2, op, ": router_logits must be 2-D [T, E], got ", logits.sizes());
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": router_logits must be float32/float16/bfloat16, got ", st);
  TORCH_CHECK(gid.device().is_cpu() && gid.dim() == 1 && gid.size(0) == logits.size(0), op,
              ": group_ids must be a CPU tensor of shape [T] with T = ", logits.size(0), ", got ", gid.sizes());
  TORCH_CHECK(gid.scalar_type() == at::kInt || gid.scalar_type() == at::kLong, op,
              ": group_ids must be int32/int64, got ", gid.scalar_type());
  TORCH_CHECK(score == "softmax" || score == "sigmoid", op, ": score must be 'softmax' or 'sigmoid', got '",
              std::string(score), "'");
  TORCH_CHECK(!sizes.empty(), op, ": group_sizes must be non-empty");
  GatingArgs a;
  a.T = logits.size(0);
  a.E = logits.size(1);
  a.G = static_cast<int64_t>(sizes.size());
  a.k = top_k;
  a.softmax = score == "softmax";
  a.renormalize = renormalize;
  a.coef = coef;
  a.offs.assign(a.G + 1, 0);
  a.max_size = 0;
  for (int64_t g = 0; g < a.G; ++g) {
    TORCH_CHECK(sizes[g] >= 1, op, ": group_sizes must hold ints >= 1, got ", sizes[g], " for group ", g);
    TORCH_CHECK(top_k <= sizes[g], op, ": top_k=", top_k, " exceeds the size of group ", g, " (", sizes[g], ")");
    a.offs[g + 1] = a.offs[g] + sizes[g];
    a.max_size = std::max(a.max_size, sizes[g]);
  }
  TORCH_CHECK(top_k >= 1, op, ": top_k must be >= 1, got ", top_k);
  TORCH_CHECK(a.offs[a.G] == a.E, op, ": sum(group_sizes) = ", a.offs[a.G],
              " must equal router_logits.shape[1] = ", a.E);
  a.nchunks = std::max<int64_t>(1, std::min<int64_t>(kMaxTokChunks, (a.T + kTokChunk - 1) / kTokChunk));
  a.per = (a.T + a.nchunks - 1) / a.nchunks;
  a.chunk_grain = std::max<int64_t>(1, kParallelMin / std::max<int64_t>(1, a.per * a.E));
  return a;
}

// group ids -> int64 vector, range-checked here (the Python check is skipped under compile)
std::vector<int64_t> read_groups(const char* op, const at::Tensor& gid, int64_t G) {
  std::vector<int64_t> out(gid.size(0));
  AT_DISPATCH_INDEX_TYPES(gid.scalar_type(), "moe_gating_groups", [&] {
    const index_t* p = gid.const_data_ptr<index_t>();
    const int64_t s = gid.stride(0);
    for (int64_t t = 0; t < gid.size(0); ++t) out[t] = static_cast<int64_t>(p[t * s]);
  });
  for (int64_t t = 0; t < static_cast<int64_t>(out.size()); ++t) {
    TORCH_CHECK(out[t] >= 0 && out[t] < G, op, ": group_ids must lie in [0, ", G, "), got ", out[t], " at token ", t);
  }
  return out;
}

// scores of one token's group columns, fp32
template <typename T>
inline void token_scores(const T* z, int64_t n, bool softmax, float* s) {
  if (softmax) {
    float mx = -INFINITY;
    for (int64_t e = 0; e < n; ++e) mx = std::max(mx, to_f32(z[e]));
    float sum = 0.f;
    for (int64_t e = 0; e < n; ++e) {
      s[e] = std::exp(to_f32(z[e]) - mx);
      sum += s[e];
    }
    const float inv = 1.0f / sum;
    for (int64_t e = 0; e < n; ++e) s[e] *= inv;
  } else {
    for (int64_t e = 0; e < n; ++e) s[e] = 1.0f / (1.0f + std::exp(-to_f32(z[e])));
  }
}

// a ranks strictly above b (NaN above every number; equal values do not: index order decides)
inline bool above(float a, float b) { return (std::isnan(a) && !std::isnan(b)) || a > b; }

// the k largest of s[0..n) in descending order, ties -> lowest index (local indices)
inline void select_topk(const float* s, int64_t n, int64_t k, int64_t* idx) {
  int64_t m = 0;  // filled entries
  for (int64_t e = 0; e < n; ++e) {
    const float v = s[e];
    if (m == k && !above(v, s[idx[k - 1]])) continue;
    int64_t p = m < k ? m++ : k - 1;  // slot to fill, then bubble up past every smaller entry
    while (p > 0 && above(v, s[idx[p - 1]])) {
      idx[p] = idx[p - 1];
      --p;
    }
    idx[p] = e;
  }
}

// Calls fn(t, g, lo, n) for the tokens t of statistics chunk c in order, after writing s[0..n) =
// the scores of t's group columns [lo, lo + n) (group g).
template <typename T, typename Fn>
inline void for_chunk_tokens(const GatingArgs& a, const std::vector<int64_t>& gid, const T* lp, int64_t ls, int64_t c,
                             float* s, Fn&& fn) {
  const int64_t t1 = std::min(a.T, (c + 1) * a.per);
  for (int64_t t = c * a.per; t < t1; ++t) {
    const int64_t g = gid[t], lo = a.offs[g], n = a.offs[g + 1] - lo;
    token_scores(lp + t * ls + lo, n, a.softmax, s);
    fn(t, g, lo, n);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_gating(
    const at::Tensor& router_logits, const at::Tensor& group_ids, c10::IntArrayRef group_sizes, int64_t top_k,
    c10::string_view score, bool renormalize, double balance_coef) {
  const char* op = "unif2ace_cpu::moe_gating";
  // internal ATen calls (views, mm_out into slices) run below autograd, as in a custom op's
  // kernel, whatever key this op was called through
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const GatingArgs a = make_args(op, router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef);
  const std::vector<int64_t> gid = read_groups(op, group_ids, a.G);
  const at::Tensor logits = router_logits.stride(1) == 1 ? router_logits : router_logits.contiguous();
  const int64_t T = a.T, E = a.E, k = a.k, G = a.G;
  auto f32 = router_logits.options().dtype(at::kFloat);
  at::Tensor ids = at::empty({T, k}, router_logits.options().dtype(at::kInt));
  at::Tensor gates = at::empty({T, k}, f32);
  at::Tensor frac = at::empty({E}, f32);
  at::Tensor prob = at::empty({E}, f32);
  at::Tensor loss = at::empty({G}, f32);
  int32_t* ids_p = ids.mutable_data_ptr<int32_t>();
  float* gates_p = gates.mutable_data_ptr<float>();

  // per chunk: score sums and assignment counts per expert, token count per group
  std::vector<double> psum(a.nchunks * E, 0.0);
  std::vector<int64_t> pcnt(a.nchunks * E, 0), pn(a.nchunks * G, 0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_gating_cpu", [&] {
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    const int64_t ls = logits.stride(0);
    at::parallel_for(0, a.nchunks, a.chunk_grain, [&](int64_t c0, int64_t c1) {
      std::vector<float> s(a.max_size);
      std::vector<int64_t> idx(k);
      for (int64_t c = c0; c < c1; ++c) {
        double* sum = psum.data() + c * E;
        int64_t* cnt = pcnt.data() + c * E;
        int64_t* ng = pn.data() + c * G;
        for_chunk_tokens(a, gid, lp, ls, c, s.data(), [&](int64_t t, int64_t g, int64_t lo, int64_t n) {
          select_topk(s.data(), n, k, idx.data());
          float csum = 0.f;
          for (int64_t j = 0; j < k; ++j) csum += s[idx[j]];
          for (int64_t j = 0; j < k; ++j) {
            ids_p[t * k + j] = static_cast<int32_t>(lo + idx[j]);
            gates_p[t * k + j] = a.renormalize ? s[idx[j]] / csum : s[idx[j]];
            ++cnt[lo + idx[j]];
          }
          for (int64_t e = 0; e < n; ++e) sum[lo + e] += s[e];
          ++ng[g];
        });
      }
    });
  });

  // deterministic reduction in chunk order
  float* f_p = frac.mutable_data_ptr<float>();
  float* P_p = prob.mutable_data_ptr<float>();
  float* L_p = loss.mutable_data_ptr<float>();
  for (int64_t g = 0; g < G; ++g) {
    int64_t n = 0;
    for (int64_t c = 0; c < a.nchunks; ++c) n += pn[c * G + g];
    double acc = 0.0;
    for (int64_t e = a.offs[g]; e < a.offs[g + 1]; ++e) {
      double ssum = 0.0;
      int64_t cnt = 0;
      for (int64_t c = 0; c < a.nchunks; ++c) {
        ssum += psum[c * E + e];
        cnt += pcnt[c * E + e];
      }
      const float f = n ? static_cast<float>(static_cast<double>(cnt) / static_cast<double>(n * k)) : 0.f;
      const float P = n ? static_cast<float>(ssum / static_cast<double>(n)) : 0.f;
      f_p[e] = f;
      P_p[e] = P;
      acc += static_cast<double>(f) * static_cast<double>(P);
    }
    const double size = static_cast<double>(a.offs[g + 1] - a.offs[g]);
    L_p[g] = n ? static_cast<float>(a.coef * size * acc) : 0.f;
  }
  return {ids, gates, frac, prob, loss};
}

at::Tensor moe_gating_backward(const at::Tensor& grad_gates_in, const at::Tensor& grad_prob_in,
                               const at::Tensor& grad_loss_in, const at::Tensor& router_logits,
                               const at::Tensor& group_ids, c10::IntArrayRef group_sizes, int64_t top_k,
                               c10::string_view score, bool renormalize, double balance_coef) {
  const char* op = "unif2ace_cpu::moe_gating_backward";
  // internal ATen calls (views, mm_out into slices) run below autograd, as in a custom op's
  // kernel, whatever key this op was called through
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const GatingArgs a = make_args(op, router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef);
  const int64_t T = a.T, E = a.E, k = a.k, G = a.G;
  moe::check_gating_grads(op, grad_gates_in, grad_prob_in, grad_loss_in, T, k, E, G);
  const std::vector<int64_t> gid = read_groups(op, group_ids, G);
  const at::Tensor logits = router_logits.stride(1) == 1 ? router_logits : router_logits.contiguous();
  const at::Tensor gg = grad_gates_in.to(at::kFloat).contiguous();
  const at::Tensor gp = grad_prob_in.to(at::kFloat).contiguous();
  const at::Tensor gl = grad_loss_in.to(at::kFloat).contiguous();
  const float* gg_p = gg.const_data_ptr<float>();
  const float* gp_p = gp.const_data_ptr<float>();
  const float* gl_p = gl.const_data_ptr<float>();
  at::Tensor dz = at::empty({T, E}, router_logits.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_gating_backward_cpu", [&] {
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    const int64_t ls = logits.stride(0);
    // pass 1: selection counts per expert and tokens per group (chunked, deterministic)
    std::vector<int64_t> sel(T * k);
    std::vector<int64_t> pcnt(a.nchunks * E, 0), pn(a.nchunks * G, 0);
    at::parallel_for(0, a.nchunks, a.chunk_grain, [&](int64_t c0, int64_t c1) {
      std::vector<float> s(a.max_size);
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* cnt = pcnt.data() + c * E;
        int64_t* ng = pn.data() + c * G;
        for_chunk_tokens(a, gid, lp, ls, c, s.data(), [&](int64_t t, int64_t g, int64_t lo, int64_t n) {
          int64_t* idx = sel.data() + t * k;
          select_topk(s.data(), n, k, idx);
          for (int64_t j = 0; j < k; ++j) ++cnt[lo + idx[j]];
          ++ng[g];
        });
      }
    });
    // dP_e / T_g per expert (the token-independent part of ds)
    std::vector<float> dbase(E, 0.f);
    for (int64_t g = 0; g < G; ++g) {
      int64_t n = 0;
      for (int64_t c = 0; c < a.nchunks; ++c) n += pn[c * G + g];
      if (!n) continue;
      const float size = static_cast<float>(a.offs[g + 1] - a.offs[g]);
      for (int64_t e = a.offs[g]; e < a.offs[g + 1]; ++e) {
        int64_t cnt = 0;
        for (int64_t c = 0; c < a.nchunks; ++c) cnt += pcnt[c * E + e];
        const float f = static_cast<float>(static_cast<double>(cnt) / static_cast<double>(n * k));
        const float dP = gp_p[e] + gl_p[g] * static_cast<float>(a.coef) * size * f;
        dbase[e] = dP / static_cast<float>(n);
      }
    }
    // pass 2: per token
    scalar_t* out = dz.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kParallelMin / std::max<int64_t>(1, E));
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      std::vector<float> s(a.max_size), ds(a.max_size);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = gid[t], lo = a.offs[g], n = a.offs[g + 1] - lo;
        token_scores(lp + t * ls + lo, n, a.softmax, s.data());
        const int64_t* idx = sel.data() + t * k;
        for (int64_t e = 0; e < n; ++e) ds[e] = dbase[lo + e];
        const float* gt = gg_p + t * k;
        if (a.renormalize) {
          float S = 0.f;
          for (int64_t j = 0; j < k; ++j) S += s[idx[j]];
          float dot = 0.f;
          for (int64_t j = 0; j < k; ++j) dot += gt[j] * (s[idx[j]] / S);
          for (int64_t j = 0; j < k; ++j) ds[idx[j]] += (gt[j] - dot) / S;
        } else {
          for (int64_t j = 0; j < k; ++j) ds[idx[j]] += gt[j];
        }
        scalar_t* row = out + t * E;
        for (int64_t e = 0; e < lo; ++e) row[e] = scalar_t(0);
        for (int64_t e = lo + n; e < E; ++e) row[e] = scalar_t(0);
        if (a.softmax) {
          float dot = 0.f;
          for (int64_t e = 0; e < n; ++e) dot += ds[e] * s[e];
          for (int64_t e = 0; e < n; ++e) row[lo + e] = static_cast<scalar_t>(s[e] * (ds[e] - dot));
        } else {
          for (int64_t e = 0; e < n; ++e) row[lo + e] = static_cast<scalar_t>(ds[e] * s[e] * (1.f - s[e]));
        }
      }
    });
  });
  return dz;
}
}  // namespace unif2ace::cpu
