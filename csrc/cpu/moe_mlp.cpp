// Routed expert MLP on the CPU, forward and backward (the `cpu` backend of moe_expert_mlp).
//
// Contract: unif2ace/kernels/reference/moe_mlp.py (moe_expert_mlp_ref, moe_expert_mlp_backward_ref).
//
//   moe_expert_mlp(x [T, D], w1 [E, D, F1], w2 [E, F, D], expert_ids [T, k] int32/int64,
//                  gates [T, k], b1 [E, F1]?, b2 [E, D]?, activation)
//       -> [out [T, D] (x's dtype), saved_h [T*k, F1] (the pre-activations, for the backward)]
//   moe_expert_mlp_backward(grad_out [T, D], x, w1, w2, expert_ids, gates, b1?, b2?, activation,
//                           saved_h? (the forward's; absent or empty: recomputed))
//       -> [dx, dw1, dw2, dgates, db1, db2] each in its input's dtype; db1/db2 are undefined
//          (None in Python) when the bias is absent.
//   F1 = F for "gelu" (exact erf) / "gelu_tanh", 2F for "swiglu" (h = silu(h[:F]) * h[F:]).
//
// Float inputs may be fp32, fp16 or bf16 (mixed); all math between the GEMMs is fp32. Ids outside
// [0, E) contribute nothing (and get dgates = 0).
//
// Precision of the GEMMs (the storage type S of the per-expert buffers): when w1 and w2 are bf16
// (or fp16) and the machine runs GEMMs on that format (cpu_features.h low_precision_gemm: oneDNN on
// AVX512-BF16 / AMX), the GEMM operands stay in that format -- x and grad_out rows are gathered
// into it, the weights are read as they are (never copied) -- and oneDNN accumulates in fp32 and
// rounds each GEMM's result to the format; bias, activation and its derivative, dgates, bias
// gradients and the k-way combines are fp32. Otherwise (fp32 weights, mixed weight dtypes, or no
// such instructions) S = fp32 and low-precision weights are converted once per call.
//
// Algorithm ("sort indices, not activations"):
//   1. counting sort of the T*k assignment slots by expert (ascending slot index within an
//      expert, the moe_align order): per-expert segments of a packed row space;
//   2. per expert (for_each_expert: experts run in parallel, one per OpenMP task, when the load is
//      balanced; one after another with threaded GEMMs and row loops when one expert dominates):
//      gather its x rows into a buffer X_e (type S), H_e = X_e w1[e] (GEMM), bias + activation in
//      one vectorised pass over the rows, O_e = A_e w2[e] (GEMM);
//   3. combine per token in fp32 in the fixed order j = 0..k-1: out[t] = sum_j g[t,j] (O[p] + b2),
//      p = the packed row of slot (t, j). No atomics anywhere and every expert's work is
//      independent of the thread that ran it, so results are bitwise identical run to run.
// The GEMMs go through oneDNN (see gemm), at::mm as the fallback; in low precision the
// pre-activation and weight-gradient GEMMs write into their outputs directly (at::mm_out).
// The forward keeps H (pre-bias, type S, packed rows) as its second output, saved by the custom op
// for the backward, which then needs no GEMM to rebuild it (it recomputes H when called without
// it) and uses, per expert,
//   dAr = G_e w2[e]^T                (G_e = grad_out gathered to the expert's rows, unscaled)
//   dgates[t,j] = <dAr_p, A_p> + <G_p, b2[e]>  (= <grad_out[t], expert_out_{t,j}>, without
//                                              recomputing O: one GEMM fewer)
//   dO_p = g * G_p ; dH = act'(H) * g * dAr ; dw2[e] = A_e^T dO_e ; db2[e] = sum dO_e ;
//   dw1[e] = X_e^T dH_e ; db1[e] = sum dH_e ; dX_e = dH_e w1[e]^T ; dx[t] = sum_j dX_p
//   (fixed order j = 0..k-1). Four GEMMs per expert; the bias sums are column sums in row order.
// Activations use the branch-free polynomial exp of cpu/vec_math.h (|rel err| < 2e-7) and, for erf,
// the Abramowitz-Stegun 7.1.26 form PyTorch's vectorised CPU gelu uses (|abs err| < 1.5e-7), so the
// row loops vectorise; they are compiled for baseline x86-64, AVX2+FMA and AVX-512, picked at run
// time (cpu_isa()).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

// The activation loops are compiled without -ftrapping-math (selects in them if-convert and
// vectorise); no code here relies on FP traps. Functions from headers included above (std:: math,
// <algorithm>) were compiled without this option and GCC will not inline them into code with it,
// so the hot loops below call none of them; vec_math.h (to_f32, fast_exp, cpu_isa) is included
// after the pragma, so its inline functions are compiled with it.
#pragma GCC optimize("no-trapping-math")

#include "cpu/cpu_features.h"
#include "cpu/ops.h"
#include "cpu/vec_math.h"

namespace unif2ace::cpu {
namespace {

enum class Act { kGelu, kGeluTanh, kSwiglu };

Act parse_act(const char* op, c10::string_view s) {
  if (s == "gelu") return Act::kGelu;
  if (s == "gelu_tanh") return Act::kGeluTanh;
  if (s == "swiglu") return Act::kSwiglu;
  TORCH_CHECK(false, op, ": activation must be 'gelu', 'gelu_tanh' or 'swiglu', got '", std::string(s), "'");
  return Act::kGelu;  // unreachable
}

// erf, Abramowitz-Stegun 7.1.26 (what at::vec::Vectorized<float>::erf computes)
U2A_INLINE float fast_erf(float x) {
  uint32_t xb;
  std::memcpy(&xb, &x, sizeof(xb));
  const uint32_t ab = xb & 0x7FFFFFFFu;  // |x| by bits (std::fabs would not inline, see the pragma)
  float ax;
  std::memcpy(&ax, &ab, sizeof(ax));
  const float t = 1.0f / (0.3275911f * ax + 1.0f);
  float r = 1.061405429f;
  r = r * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  float y = 1.0f - r * t * fast_exp(-ax * ax);
  uint32_t yb;  // y takes x's sign (bit ops: a select here gets jump-threaded, blocking vectorisation)
  std::memcpy(&yb, &y, sizeof(yb));
  yb |= xb & 0x80000000u;
  std::memcpy(&y, &yb, sizeof(y));
  return y;
}

U2A_INLINE float fast_tanh(float u) { return 1.0f - 2.0f / (1.0f + fast_exp(2.0f * u)); }

constexpr float kSqrt1_2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kTanhC = 0.044715f;

// Forward activation of one packed row: h (F1 wide, type S, bias not yet added; bias fp32, F1
// wide, a zero row when there is none, so the loops have no branch) -> a (F wide, type S). a may
// alias h (F1 == F). fp32 in between.
template <Act A, typename S>
U2A_INLINE void act_row_impl(const S* h, const float* bias, S* a, int64_t F) {
  if constexpr (A == Act::kGelu) {
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      const float v = to_f32(h[f]) + bias[f];
      a[f] = from_f32<S>(0.5f * v * (1.0f + fast_erf(v * kSqrt1_2)));
    }
  } else if constexpr (A == Act::kGeluTanh) {
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      const float v = to_f32(h[f]) + bias[f];
      a[f] = from_f32<S>(0.5f * v * (1.0f + fast_tanh(kSqrt2OverPi * (v + kTanhC * v * v * v))));
    }
  } else {
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      const float g = to_f32(h[f]) + bias[f];
      const float u = to_f32(h[F + f]) + bias[F + f];
      a[f] = from_f32<S>(g / (1.0f + fast_exp(-g)) * u);
    }
  }
}

// Backward of one packed row: reads h (pre-bias, F1 wide; bias as above) and dar (= grad wrt a
// before the gate scale, F wide); writes a (F wide) and dh (F1 wide) = act'(h) * gate * dar (dh
// may alias h); returns <dar, a> (fp32, on a before its rounding to S).
template <Act A, typename S>
U2A_INLINE float act_bwd_row_impl(const S* h, S* dh, const float* bias, const S* dar, S* a, float gate, int64_t F) {
  float dot = 0.f;
  if constexpr (A == Act::kGelu) {
#pragma omp simd reduction(+ : dot)
    for (int64_t f = 0; f < F; ++f) {
      const float v = to_f32(h[f]) + bias[f];
      const float da = to_f32(dar[f]);
      const float cdf = 0.5f * (1.0f + fast_erf(v * kSqrt1_2));
      const float pdf = fast_exp(-0.5f * v * v) * kInvSqrt2Pi;
      const float av = v * cdf;
      a[f] = from_f32<S>(av);
      dot += da * av;
      dh[f] = from_f32<S>(gate * da * (cdf + v * pdf));
    }
  } else if constexpr (A == Act::kGeluTanh) {
#pragma omp simd reduction(+ : dot)
    for (int64_t f = 0; f < F; ++f) {
      const float v = to_f32(h[f]) + bias[f];
      const float da = to_f32(dar[f]);
      const float t = fast_tanh(kSqrt2OverPi * (v + kTanhC * v * v * v));
      const float av = 0.5f * v * (1.0f + t);
      a[f] = from_f32<S>(av);
      dot += da * av;
      const float d = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kTanhC * v * v);
      dh[f] = from_f32<S>(gate * da * d);
    }
  } else {
#pragma omp simd reduction(+ : dot)
    for (int64_t f = 0; f < F; ++f) {
      const float g = to_f32(h[f]) + bias[f];
      const float u = to_f32(h[F + f]) + bias[F + f];
      const float dr = to_f32(dar[f]);
      const float sig = 1.0f / (1.0f + fast_exp(-g));
      const float silu = g * sig;
      const float av = silu * u;
      a[f] = from_f32<S>(av);
      dot += dr * av;
      const float da = gate * dr;
      dh[f] = from_f32<S>(da * u * sig * (1.0f + g * (1.0f - sig)));
      dh[F + f] = from_f32<S>(da * silu);
    }
  }
  return dot;
}

// The row loops compiled three times (baseline x86-64, AVX2+FMA, AVX-512) and picked at run time.
template <Act A, typename S>
U2A_TARGET_AVX512 void act_row_avx512(const S* h, const float* b, S* a, int64_t F) {
  act_row_impl<A>(h, b, a, F);
}
template <Act A, typename S>
U2A_TARGET_AVX2 void act_row_avx2(const S* h, const float* b, S* a, int64_t F) {
  act_row_impl<A>(h, b, a, F);
}
template <Act A, typename S>
void act_row_base(const S* h, const float* b, S* a, int64_t F) {
  act_row_impl<A>(h, b, a, F);
}
template <Act A, typename S>
void act_row(Isa isa, const S* h, const float* b, S* a, int64_t F) {
  if (isa == Isa::kAvx512) return act_row_avx512<A>(h, b, a, F);
  if (isa == Isa::kAvx2) return act_row_avx2<A>(h, b, a, F);
  act_row_base<A>(h, b, a, F);
}

template <Act A, typename S>
U2A_TARGET_AVX512 float act_bwd_row_avx512(const S* h, S* dh, const float* b, const S* dar, S* a, float g, int64_t F) {
  return act_bwd_row_impl<A>(h, dh, b, dar, a, g, F);
}
template <Act A, typename S>
U2A_TARGET_AVX2 float act_bwd_row_avx2(const S* h, S* dh, const float* b, const S* dar, S* a, float g, int64_t F) {
  return act_bwd_row_impl<A>(h, dh, b, dar, a, g, F);
}
template <Act A, typename S>
float act_bwd_row_base(const S* h, S* dh, const float* b, const S* dar, S* a, float g, int64_t F) {
  return act_bwd_row_impl<A>(h, dh, b, dar, a, g, F);
}
template <Act A, typename S>
float act_bwd_row_isa(Isa isa, const S* h, S* dh, const float* b, const S* dar, S* a, float g, int64_t F) {
  if (isa == Isa::kAvx512) return act_bwd_row_avx512<A>(h, dh, b, dar, a, g, F);
  if (isa == Isa::kAvx2) return act_bwd_row_avx2<A>(h, dh, b, dar, a, g, F);
  return act_bwd_row_base<A>(h, dh, b, dar, a, g, F);
}

// ------------------------------------------------------------------------------------------------
// routing: counting sort of the slots by expert

struct Routing {
  int64_t T = 0, k = 0, E = 0, n = 0;  // n = valid slots
  std::vector<int64_t> seg;            // [E + 1] segment starts in the packed row space
  std::vector<int64_t> src;            // [n] packed row -> slot t*k + j (ascending within an expert)
  std::vector<int64_t> pos;            // [T*k] slot -> packed row, -1 for an invalid id
  std::vector<int64_t> row_expert;     // [n] packed row -> expert
};

Routing route(const at::Tensor& ids, int64_t E) {
  Routing r;
  r.T = ids.size(0);
  r.k = ids.size(1);
  r.E = E;
  const int64_t N = r.T * r.k;
  r.pos.assign(N, -1);
  std::vector<int64_t> eid(N);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_mlp_route", [&] {
    const index_t* p = ids.const_data_ptr<index_t>();
    const int64_t s0 = ids.stride(0), s1 = ids.stride(1);
    for (int64_t t = 0; t < r.T; ++t)
      for (int64_t j = 0; j < r.k; ++j) eid[t * r.k + j] = static_cast<int64_t>(p[t * s0 + j * s1]);
  });
  r.seg.assign(E + 1, 0);
  for (int64_t i = 0; i < N; ++i)
    if (eid[i] >= 0 && eid[i] < E) ++r.seg[eid[i] + 1];
  for (int64_t e = 0; e < E; ++e) r.seg[e + 1] += r.seg[e];
  r.n = r.seg[E];
  r.src.resize(r.n);
  r.row_expert.resize(r.n);
  std::vector<int64_t> cur(r.seg.begin(), r.seg.end() - 1);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t e = eid[i];
    if (e < 0 || e >= E) continue;
    const int64_t p = cur[e]++;
    r.src[p] = i;
    r.pos[i] = p;
    r.row_expert[p] = e;
  }
  return r;
}

// ------------------------------------------------------------------------------------------------
// helpers

// grain (rows per task) for row loops of width W
inline int64_t row_grain(int64_t W) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(W, 1)); }

// out [p1 - p0, D] (type S) = rows (slot / k) of src [*, D] (contiguous, any float) for packed
// rows [p0, p1): a plain copy when src is already S
template <typename S>
void gather_rows(const at::Tensor& src, const Routing& r, int64_t p0, int64_t p1, S* out, int64_t D) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "moe_mlp_gather", [&] {
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    at::parallel_for(p0, p1, row_grain(D), [&](int64_t a, int64_t b) {
      for (int64_t p = a; p < b; ++p) {
        const scalar_t* row = s + (r.src[p] / r.k) * D;
        S* o = out + (p - p0) * D;
        if constexpr (std::is_same_v<scalar_t, S>) {
          std::memcpy(o, row, D * sizeof(S));
        } else {
          for (int64_t d = 0; d < D; ++d) o[d] = from_f32<S>(to_f32(row[d]));
        }
      }
    });
  });
}

// a += g * y ; a += g * (y + b)  (vectorised fp32 row updates; y of the storage type)
template <typename S>
U2A_INLINE void axpy(float* __restrict__ a, const S* __restrict__ y, float g, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) a[d] += g * to_f32(y[d]);
}
template <typename S>
U2A_INLINE void axpy_bias(float* __restrict__ a, const S* __restrict__ y, const float* __restrict__ b, float g,
                          int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) a[d] += g * (to_f32(y[d]) + b[d]);
}

template <typename S>
U2A_INLINE float dot(const S* __restrict__ a, const float* __restrict__ b, int64_t D) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += to_f32(a[d]) * b[d];
  return acc;
}
// a = g * a, and out += g * a (fp32, the column sums of the scaled rows before their rounding)
template <typename S>
U2A_INLINE void scale_and_sum(S* __restrict__ a, float g, float* __restrict__ out, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const float v = g * to_f32(a[d]);
    out[d] += v;
    a[d] = from_f32<S>(v);
  }
}

// out [C] = column sums of the first `rows` rows of m (width C), fp32, in row order (deterministic)
template <typename S>
void colsum(const S* m, int64_t rows, int64_t C, float* out) {
  for (int64_t c = 0; c < C; ++c) out[c] = 0.f;
  for (int64_t p = 0; p < rows; ++p) axpy(out, m + p * C, 1.0f, C);
}

// ------------------------------------------------------------------------------------------------
// GEMM: gemm(a [M, K], b [K, N]) = a @ b (a and b may be strided views, e.g. transposes).
// fp32: oneDNN's fp32 matmul (mkldnn::_linear_pointwise, what inductor's CPU linear uses) runs about 2x
// faster than MKL sgemm on the expert-sized GEMMs here on an AMD EPYC (MKL takes its generic AVX2
// path there, oneDNN its AVX-512 brgemm); at::mm (MKL/OpenBLAS) is the fallback when torch has no
// oneDNN, and UNIF2ACE_MOE_GEMM=aten forces it. bf16 / fp16: at::mm, which runs oneDNN's
// low-precision matmul where the CPU has the instructions (the only case these types get here).

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

const std::optional<c10::TypedOperatorHandle<LinearFn>>& onednn_linear() {
  static const std::optional<c10::TypedOperatorHandle<LinearFn>> handle =
      []() -> std::optional<c10::TypedOperatorHandle<LinearFn>> {
    try {
      auto op = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
      if (!op || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
      return op->typed<LinearFn>();
    } catch (const std::exception&) {
      return std::nullopt;
    }
  }();
  return handle;
}

enum class GemmPath { kOneDnn, kAten };

GemmPath gemm_path() {
  const char* env = std::getenv("UNIF2ACE_MOE_GEMM");
  if (env && std::string(env) == "aten") return GemmPath::kAten;
  return onednn_linear() ? GemmPath::kOneDnn : GemmPath::kAten;
}

// a @ b in a's dtype (fp32 on oneDNN's linear; bf16 / fp16 on oneDNN's low-precision matmul behind
// at::mm: fp32 accumulation, the result rounded to the format). a and b may be transposed views.
at::Tensor gemm(GemmPath path, const at::Tensor& a, const at::Tensor& b) {
  // oneDNN rejects empty operands ("could not create a primitive descriptor"); at::mm gives the
  // empty product its value (zeros when K = 0, i.e. F = 0 or D = 0)
  if (path == GemmPath::kOneDnn && a.scalar_type() == at::kFloat && a.numel() != 0 && b.numel() != 0) {
    return onednn_linear()->call(a, b.t(), std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
  return at::mm(a, b);
}

// out = a @ b into `out` (contiguous): written by the GEMM itself where it can (at::mm_out), else
// copied (oneDNN's fp32 linear has no out variant; MKL's sgemm, which at::mm_out would use for
// fp32, takes a generic slow path on AMD CPUs)
void gemm_into(GemmPath path, at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (path == GemmPath::kOneDnn && a.scalar_type() == at::kFloat) {
    out.copy_(gemm(path, a, b));
  } else {
    at::mm_out(out, a, b);
  }
}

// copy of a tensor in `dtype` (no copy when it already is, contiguous)
at::Tensor as_type(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }
at::Tensor as_f32(const at::Tensor& t) { return as_type(t, at::kFloat); }

// Runs fn(e) once for every expert with rows. With balanced experts they run in parallel, one
// expert per task (each task's GEMMs and row loops are single-threaded: one parallel region per
// phase, not one per GEMM, which also keeps 2-thread runs robust on a loaded machine); when one
// expert holds most rows (skew), experts run one after another and parallelism moves inside them
// (threaded BLAS, parallel row loops). Each expert's computation reads and writes only its own
// rows/weights, so the result never depends on which thread ran it.
template <typename Fn>
void for_each_expert(const Routing& r, Fn&& fn) {
  std::vector<int64_t> order;
  int64_t max_c = 0;
  for (int64_t e = 0; e < r.E; ++e) {
    const int64_t c = r.seg[e + 1] - r.seg[e];
    if (c) order.push_back(e);
    max_c = std::max(max_c, c);
  }
  const int64_t nt = at::get_num_threads();
  const int64_t ne = static_cast<int64_t>(order.size());
  // expert-parallel when the largest expert is at most ~1/nt of the rows (plus slack) and there
  // are enough experts to share out
  const bool expert_parallel = nt > 1 && ne >= nt && !at::in_parallel_region() && max_c * nt <= r.n * 3 / 2;
  if (!expert_parallel) {
    for (int64_t e : order) fn(e);
    return;
  }
  // largest first, pulled from a shared counter (dynamic balance)
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return r.seg[a + 1] - r.seg[a] > r.seg[b + 1] - r.seg[b]; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t w0, int64_t w1) {
    // OpenMP workers do not inherit the caller's dispatch TLS: without this, a GEMM on a worker
    // would go through autograd and reject mm_out on inputs that require grad
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t i = next++; i < ne; i = next++) fn(order[i]);
    }
  });
}

struct Shapes {
  int64_t T, D, E, F1, F, k;
  Act act;
};

Shapes check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                    const at::Tensor& ids, const at::Tensor& gates, const std::optional<at::Tensor>& b1,
                    const std::optional<at::Tensor>& b2, c10::string_view activation) {
  auto is_float = [](const at::Tensor& t) {
    const auto s = t.scalar_type();
    return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
  };
  Shapes s;
  s.act = parse_act(op, activation);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && is_float(x), op,
              ": x must be a 2-D float32/float16/bfloat16 CPU tensor [T, D], got ", x.sizes(), " ", x.scalar_type());
  s.T = x.size(0);
  s.D = x.size(1);
  TORCH_CHECK(w1.device().is_cpu() && w1.dim() == 3 && is_float(w1) && w1.size(1) == s.D, op,
              ": w1 must be a float CPU tensor [E, D=", s.D, ", F1], got ", w1.sizes());
  s.E = w1.size(0);
  s.F1 = w1.size(2);
  TORCH_CHECK(w2.device().is_cpu() && w2.dim() == 3 && is_float(w2) && w2.size(0) == s.E && w2.size(2) == s.D, op,
              ": w2 must be a float CPU tensor [E=", s.E, ", F, D=", s.D, "], got ", w2.sizes());
  s.F = w2.size(1);
  TORCH_CHECK(s.F1 == (s.act == Act::kSwiglu ? 2 * s.F : s.F), op, ": w1 must be [", s.E, ", ", s.D, ", ",
              (s.act == Act::kSwiglu ? 2 * s.F : s.F), "] for activation '", std::string(activation), "', got ",
              w1.sizes());
  TORCH_CHECK(ids.device().is_cpu() && ids.dim() == 2 && ids.size(0) == s.T &&
                  (ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong),
              op, ": expert_ids must be an int32/int64 CPU tensor [T=", s.T, ", k], got ", ids.sizes(), " ",
              ids.scalar_type());
  s.k = ids.size(1);
  TORCH_CHECK(
      gates.device().is_cpu() && gates.dim() == 2 && gates.size(0) == s.T && gates.size(1) == s.k && is_float(gates),
      op, ": gates must be a float CPU tensor [", s.T, ", ", s.k, "], got ", gates.sizes());
  if (b1) {
    TORCH_CHECK(b1->device().is_cpu() && is_float(*b1) && b1->dim() == 2 && b1->size(0) == s.E && b1->size(1) == s.F1,
                op, ": b1 must be a float CPU tensor [", s.E, ", ", s.F1, "], got ", b1->sizes());
  }
  if (b2) {
    TORCH_CHECK(b2->device().is_cpu() && is_float(*b2) && b2->dim() == 2 && b2->size(0) == s.E && b2->size(1) == s.D,
                op, ": b2 must be a float CPU tensor [", s.E, ", ", s.D, "], got ", b2->sizes());
  }
  return s;
}

// rows [0, rows): H (F1 wide) -> A (F wide), bias + activation
template <typename S>
void activation_rows(Act act, const S* H, const float* b1, S* A, int64_t rows, int64_t F1, int64_t F) {
  const Isa isa = cpu_isa();
  at::parallel_for(0, rows, row_grain(F1), [&](int64_t a0, int64_t a1) {
    for (int64_t p = a0; p < a1; ++p) {
      const S* h = H + p * F1;
      S* a = A + p * F;
      switch (act) {
        case Act::kGelu:
          act_row<Act::kGelu>(isa, h, b1, a, F);
          break;
        case Act::kGeluTanh:
          act_row<Act::kGeluTanh>(isa, h, b1, a, F);
          break;
        case Act::kSwiglu:
          act_row<Act::kSwiglu>(isa, h, b1, a, F);
          break;
      }
    }
  });
}

template <typename S>
float act_bwd_row(Act act, Isa isa, const S* h, S* dh, const float* b, const S* dar, S* a, float g, int64_t F) {
  switch (act) {
    case Act::kGelu:
      return act_bwd_row_isa<Act::kGelu>(isa, h, dh, b, dar, a, g, F);
    case Act::kGeluTanh:
      return act_bwd_row_isa<Act::kGeluTanh>(isa, h, dh, b, dar, a, g, F);
    case Act::kSwiglu:
      return act_bwd_row_isa<Act::kSwiglu>(isa, h, dh, b, dar, a, g, F);
  }
  return 0.f;
}

at::Tensor cast_like(const at::Tensor& t, const at::Tensor& like) {
  return t.scalar_type() == like.scalar_type() ? t : t.to(like.scalar_type());
}

// out [D] = acc rounded to the output type (vectorised for fp32 / bf16)
template <typename T>
U2A_INLINE void store_row(T* __restrict__ out, const float* __restrict__ acc, int64_t D) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = from_f32<T>(acc[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d]);
  }
}

// out[t] (out: [T, D], any float dtype) = fp32 sum over the valid slots (t, j) in the fixed order
// j = 0..k-1 of add(acc, slot = t*k + j, packed row p, expert e), which accumulates into acc [D].
template <typename AddFn>
void combine_slots(const Routing& r, const at::Tensor& out, int64_t D, AddFn&& add) {
  const int64_t k = r.k;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "moe_mlp_combine", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, r.T, row_grain(D * k), [&](int64_t t0, int64_t t1) {
      std::vector<float> acc(D);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t p = r.pos[t * k + j];
          if (p < 0) continue;
          add(acc.data(), t * k + j, p, r.row_expert[p]);
        }
        store_row(o + t * D, acc.data(), D);
      }
    });
  });
}

// The storage type of the GEMM operands and per-expert buffers (see the header): the weights'
// low-precision format when both share it and the machine runs GEMMs on it, else fp32.
at::ScalarType gemm_dtype(const at::Tensor& w1, const at::Tensor& w2) {
  const auto dt = w1.scalar_type();
  return (dt == w2.scalar_type() && dt != at::kFloat && low_precision_gemm(dt)) ? dt : at::kFloat;
}

// What the forward and backward share: shapes, routing, the operands (weights in S without a copy
// when they already are; gates and biases fp32) and the GEMM path. With low-precision GEMMs the
// biases are added inside them (b1s / b2s: the biases in S, at::addmm: added to the fp32
// accumulator before the one rounding of the result, as F.linear does), since a bias added after
// the rounding would meet the rounding error of a larger value wherever the two nearly cancel.
struct Operands {
  Shapes s;
  Routing r;
  at::Tensor x, w1, w2, gates, b1, b2, b1s, b2s;
  std::vector<float> zero_bias;  // [F1] zeros: the bias row of an expert without b1
  GemmPath gp;
  at::TensorOptions f32, st;  // fp32 / storage-type options

  Operands(const char* op, at::ScalarType S, const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& w2_in,
           const at::Tensor& expert_ids, const at::Tensor& gates_in, const std::optional<at::Tensor>& b1_in,
           const std::optional<at::Tensor>& b2_in, c10::string_view activation)
      : s(check_inputs(op, x_in, w1_in, w2_in, expert_ids, gates_in, b1_in, b2_in, activation)),
        r(route(expert_ids, s.E)),
        x(x_in.contiguous()),
        w1(as_type(w1_in, S)),
        w2(as_type(w2_in, S)),
        gates(as_f32(gates_in)),
        b1(b1_in ? as_f32(*b1_in) : at::Tensor()),
        b2(b2_in ? as_f32(*b2_in) : at::Tensor()),
        b1s(b1_in && S != at::kFloat ? as_type(*b1_in, S) : at::Tensor()),
        b2s(b2_in && S != at::kFloat ? as_type(*b2_in, S) : at::Tensor()),
        zero_bias(s.F1, 0.f),
        gp(gemm_path()),
        f32(x_in.options().dtype(at::kFloat)),
        st(x_in.options().dtype(S)) {}

  const float* b1_row(int64_t e) const {
    return b1.defined() ? b1.const_data_ptr<float>() + e * s.F1 : zero_bias.data();
  }
  const float* b2_row(int64_t e) const { return b2.defined() ? b2.const_data_ptr<float>() + e * s.D : nullptr; }
  // the biases left to add outside the GEMMs: the activation's (a zero row when folded) and the
  // combine's (none when folded)
  const float* b1_act_row(int64_t e) const { return b1s.defined() ? zero_bias.data() : b1_row(e); }
  const float* b2_combine_row(int64_t e) const { return b2s.defined() ? nullptr : b2_row(e); }

  // per-expert buffers (small: malloc reuses them from call to call)
  at::Tensor rows(int64_t c, int64_t width) const { return at::empty({c, width}, st); }

  // He = Xe w1[e] (+ b1[e] when folded), into He
  void gemm_h(at::Tensor& He, const at::Tensor& Xe, int64_t e) const {
    if (b1s.defined()) {
      at::addmm_out(He, b1s.select(0, e), Xe, w1.select(0, e));
    } else {
      gemm_into(gp, He, Xe, w1.select(0, e));
    }
  }
  // Oe = Ae w2[e] (+ b2[e] when folded)
  at::Tensor gemm_o(const at::Tensor& Ae, int64_t e) const {
    const at::Tensor w2e = w2.select(0, e);
    return b2s.defined() ? at::addmm(b2s.select(0, e), Ae, w2e) : gemm(gp, Ae, w2e);
  }
};

// [T*k, F1] in S: the pre-activations H = X w1[e] of the packed rows [0, n) (the rest unused),
// the forward's second output, which the backward reads instead of recomputing them
at::Tensor saved_h_buffer(const Operands& o) { return at::empty({o.s.T * o.s.k, o.s.F1}, o.st); }

template <typename S>
std::vector<at::Tensor> forward_impl(const Operands& o, const at::Tensor& x_in) {
  const Shapes& s = o.s;
  const Routing& r = o.r;
  const int64_t D = s.D, F = s.F, F1 = s.F1;
  at::Tensor out = at::empty({s.T, D}, x_in.options());

  // per expert: Xe (gathered rows), He = Xe w1[e] (kept: the saved output), Ae = act(He),
  // Oe = Ae w2[e]
  const at::Tensor H = saved_h_buffer(o);
  std::vector<at::Tensor> O(s.E);
  for_each_expert(r, [&](int64_t e) {
    const int64_t p0 = r.seg[e], c = r.seg[e + 1] - p0;
    at::Tensor Xe = o.rows(c, D), He = H.narrow(0, p0, c), Ae = o.rows(c, F);
    gather_rows(o.x, r, p0, p0 + c, Xe.mutable_data_ptr<S>(), D);
    o.gemm_h(He, Xe, e);
    activation_rows(s.act, He.const_data_ptr<S>(), o.b1_act_row(e), Ae.mutable_data_ptr<S>(), c, F1, F);
    O[e] = o.gemm_o(Ae, e);
  });
  H.narrow(0, r.n, s.T * s.k - r.n).zero_();  // rows of invalid slots: unused, but defined

  // combine, fp32, fixed order j = 0..k-1
  std::vector<const S*> O_p(s.E, nullptr);
  for (int64_t e = 0; e < s.E; ++e)
    if (O[e].defined()) O_p[e] = O[e].const_data_ptr<S>();
  const float* g_p = o.gates.const_data_ptr<float>();
  combine_slots(r, out, D, [&](float* acc, int64_t slot, int64_t p, int64_t e) {
    const S* y = O_p[e] + (p - r.seg[e]) * D;
    if (const float* b2e = o.b2_combine_row(e)) {
      axpy_bias(acc, y, b2e, g_p[slot], D);
    } else {
      axpy(acc, y, g_p[slot], D);
    }
  });
  return {out, H};
}

// saved_h: the forward's saved output (read, never written), or undefined / empty: recompute H
template <typename S>
std::vector<at::Tensor> backward_impl(const Operands& o, const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                      const at::Tensor& gates_in, const at::Tensor& saved_h) {
  const Shapes& s = o.s;
  const Routing& r = o.r;
  const int64_t T = s.T, D = s.D, k = s.k, E = s.E, F = s.F, F1 = s.F1;
  const at::Tensor go = grad_out_in.contiguous();

  // weight gradients in S (written by the GEMMs in place), bias gradients fp32; experts without
  // rows get zeros
  at::Tensor dw1 = at::empty({E, D, F1}, o.st), dw2 = at::empty({E, F, D}, o.st);
  at::Tensor db1 = o.b1.defined() ? at::zeros({E, F1}, o.f32) : at::Tensor();
  at::Tensor db2 = o.b2.defined() ? at::zeros({E, D}, o.f32) : at::Tensor();
  for (int64_t e = 0; e < E; ++e) {
    if (r.seg[e + 1] > r.seg[e]) continue;
    dw1.select(0, e).zero_();
    dw2.select(0, e).zero_();
  }
  std::vector<float> dg_rows(r.n);
  std::vector<at::Tensor> dX(E);
  const float* g_p = o.gates.const_data_ptr<float>();
  float* db1_p = db1.defined() ? db1.mutable_data_ptr<float>() : nullptr;
  float* db2_p = db2.defined() ? db2.mutable_data_ptr<float>() : nullptr;
  const Isa isa = cpu_isa();

  // per expert: Xe, Ge (gathered x and grad_out rows; Ge becomes dO = g * Ge), He = Xe w1[e]
  // (becomes dH in place), dAe = Ge w2[e]^T, Ae = act(He)
  const bool have_h = saved_h.defined() && saved_h.numel() != 0;
  if (have_h) {
    TORCH_CHECK(saved_h.scalar_type() == o.st.dtype() && saved_h.dim() == 2 && saved_h.size(0) == T * k &&
                    saved_h.size(1) == F1 && saved_h.is_contiguous(),
                "unif2ace_cpu::moe_expert_mlp_backward: saved_h must be the forward's saved output [", T * k, ", ", F1,
                "], got ", saved_h.sizes(), " ", saved_h.scalar_type());
  }
  // H: the saved pre-activations, or recomputed into dH's buffer (dH then overwrites it)
  for_each_expert(r, [&](int64_t e) {
    const int64_t p0 = r.seg[e], c = r.seg[e + 1] - p0;
    at::Tensor Xe = o.rows(c, D), Ge = o.rows(c, D), Ae = o.rows(c, F), dHe = o.rows(c, F1);
    gather_rows(o.x, r, p0, p0 + c, Xe.mutable_data_ptr<S>(), D);
    gather_rows(go, r, p0, p0 + c, Ge.mutable_data_ptr<S>(), D);
    const at::Tensor w1e = o.w1.select(0, e), w2e = o.w2.select(0, e);
    if (!have_h) o.gemm_h(dHe, Xe, e);
    const S* H_p = have_h ? saved_h.const_data_ptr<S>() + p0 * F1 : dHe.const_data_ptr<S>();
    const at::Tensor dAe = gemm(o.gp, Ge, w2e.t());
    S* dH_p = dHe.mutable_data_ptr<S>();
    S* A_p = Ae.mutable_data_ptr<S>();
    S* G_p = Ge.mutable_data_ptr<S>();
    const S* dA_p = dAe.const_data_ptr<S>();
    const float* b1e = o.b1_act_row(e);
    const float* b2e = o.b2_row(e);
    // db2[e] = sum of the fp32 rows g * grad_out, in row order: one accumulator per row chunk of
    // a fixed size, summed in chunk order (deterministic whatever the thread count)
    const int64_t grain = row_grain(F1 + D), n_chunks = (c + grain - 1) / grain;
    std::vector<float> db2_parts(db2_p ? n_chunks * D : 0, 0.f);
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        for (int64_t i = ch * grain; i < std::min(c, (ch + 1) * grain); ++i) {
          const float g = g_p[r.src[p0 + i]];
          float dg = act_bwd_row(s.act, isa, H_p + i * F1, dH_p + i * F1, b1e, dA_p + i * F, A_p + i * F, g, F);
          S* grow = G_p + i * D;
          if (b2e) {
            dg += dot(grow, b2e, D);
            scale_and_sum(grow, g, db2_parts.data() + ch * D, D);
          } else {
            for (int64_t d = 0; d < D; ++d) grow[d] = from_f32<S>(g * to_f32(grow[d]));
          }
          dg_rows[p0 + i] = dg;
        }
      }
    });
    if (db2_p) {
      for (int64_t ch = 0; ch < n_chunks; ++ch) axpy(db2_p + e * D, db2_parts.data() + ch * D, 1.0f, D);
    }
    at::Tensor dw2e = dw2.select(0, e), dw1e = dw1.select(0, e);
    gemm_into(o.gp, dw2e, Ae.t(), Ge);   // dw2[e] = A_e^T dO_e
    gemm_into(o.gp, dw1e, Xe.t(), dHe);  // dw1[e] = X_e^T dH_e
    if (db1_p) colsum(dH_p, c, F1, db1_p + e * F1);
    dX[e] = gemm(o.gp, dHe, w1e.t());  // dX_e = dH_e w1[e]^T
  });

  at::Tensor dx = at::empty({T, D}, x_in.options());
  at::Tensor dgates = at::empty({T, k}, gates_in.options());
  std::vector<const S*> dX_p(E, nullptr);
  for (int64_t e = 0; e < E; ++e)
    if (dX[e].defined()) dX_p[e] = dX[e].const_data_ptr<S>();
  combine_slots(r, dx, D,
                [&](float* acc, int64_t, int64_t p, int64_t e) { axpy(acc, dX_p[e] + (p - r.seg[e]) * D, 1.0f, D); });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dgates.scalar_type(), "moe_mlp_dgates", [&] {
    scalar_t* out = dgates.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < T * k; ++i) {
      const int64_t p = r.pos[i];
      out[i] = static_cast<scalar_t>(p < 0 ? 0.f : dg_rows[p]);
    }
  });
  return {dx, dw1, dw2, dgates, db1, db2};
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// ops

std::vector<at::Tensor> moe_expert_mlp(const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& w2_in,
                                       const at::Tensor& expert_ids, const at::Tensor& gates_in,
                                       const std::optional<at::Tensor>& b1_in, const std::optional<at::Tensor>& b2_in,
                                       c10::string_view activation) {
  // internal ATen calls run below autograd, as in a custom op's kernel, whatever key this op was
  // called through (OpenMP workers set the same guard in for_each_expert)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType S = gemm_dtype(w1_in, w2_in);
  const Operands o("unif2ace_cpu::moe_expert_mlp", S, x_in, w1_in, w2_in, expert_ids, gates_in, b1_in, b2_in,
                   activation);
  if (S == at::kBFloat16) return forward_impl<c10::BFloat16>(o, x_in);
  return forward_impl<float>(o, x_in);
}

std::vector<at::Tensor> moe_expert_mlp_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                const at::Tensor& w1_in, const at::Tensor& w2_in,
                                                const at::Tensor& expert_ids, const at::Tensor& gates_in,
                                                const std::optional<at::Tensor>& b1_in,
                                                const std::optional<at::Tensor>& b2_in, c10::string_view activation,
                                                const std::optional<at::Tensor>& saved_h) {
  const char* op = "unif2ace_cpu::moe_expert_mlp_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // see moe_expert_mlp
  const at::ScalarType S = gemm_dtype(w1_in, w2_in);
  const Operands o(op, S, x_in, w1_in, w2_in, expert_ids, gates_in, b1_in, b2_in, activation);
  TORCH_CHECK(grad_out_in.device().is_cpu() && grad_out_in.dim() == 2 && grad_out_in.size(0) == o.s.T &&
                  grad_out_in.size(1) == o.s.D,
              op, ": grad_out must be a CPU tensor [", o.s.T, ", ", o.s.D, "], got ", grad_out_in.sizes());
  const at::Tensor h = saved_h ? *saved_h : at::Tensor();
  auto g = S == at::kBFloat16 ? backward_impl<c10::BFloat16>(o, grad_out_in, x_in, gates_in, h)
                              : backward_impl<float>(o, grad_out_in, x_in, gates_in, h);
  return {g[0],
          cast_like(g[1], w1_in),
          cast_like(g[2], w2_in),
          g[3],
          b1_in ? cast_like(g[4], *b1_in) : at::Tensor(),
          b2_in ? cast_like(g[5], *b2_in) : at::Tensor()};
}
}  // namespace unif2ace::cpu
