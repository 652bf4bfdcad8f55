// D3Diff loss, C++ CPU row kernels: per-row max, log-sum-exp relative to it and target logit
// (forward) and the softmax/one-hot gradient (backward). The whole D3Diff loss (mask CE + SEDD
// score entropy, every parametrisation and reduction) is assembled in PyTorch from these [N]
// vectors; see unif2ace/kernels/_custom_ops/d3diff.py (host glue: unif2ace/kernels/cpu/d3diff.py,
// cpu/d3diff_head.py). Contract: docs/kernels.md §A.
//
//   lse_gather(logits [N, V] float/half/bf16, target [N] int64, ignore_index)
//       -> (row_max [N], lse_rel [N], tgt [N]), fp32:  m_i = max_v l_iv, r_i = log sum_v exp(l_iv - m_i),
//          t_i = l_i[target_i]; LSE_i = m_i + r_i and CE_i = r_i - (t_i - m_i) are formed by the caller,
//          so a large common offset costs no accuracy. Rows with target == ignore_index: 0, 0, 0
//          (never read); a target outside [0, V) gives tgt = NaN (no OOB read). NaN in a row gives
//          lse_rel = NaN (exp propagates it; the max may skip it); +inf gives NaN, -inf columns exp to 0.
//   lse_gather_backward(logits, target, row_max, lse_rel, grad_lse, grad_tgt, ignore_index)
//       -> grad_logits [N, V] (logits' dtype) = grad_lse_i * exp((l_iv - m_i) - r_i) + grad_tgt_i * [v == t_i]
//                                             (exactly 0 on ignored rows)
//   lse_gather_backward_(logits, ...) -> ()   the same, written over logits in place
//   lse_gather_grad_(logits, target, a, b, c, g, ignore_index) -> (row_max, lse_rel, tgt)
//       both in one pass per row (the row is read from memory once and overwritten with its
//       gradient while in cache), for the row-wise loss a_i*LSE_i + b_i*safe_exp(LSE_i - c_i) - g_i*t_i
//       (docs/model.md §2): grad_lse_i = a_i + b_i*exp(min(LSE_i - c_i, 60)), grad_tgt_i = -g_i;
//       LSE_i is NaN where m_i is not finite (a NaN row of the contract).
//
// fp32 math on every input dtype, 64-bit indexing, at::parallel_for over rows. The hot loops are
// compiled three times -- baseline x86-64, AVX2+FMA and AVX-512 -- and picked at run time
// (cpu_isa()); exp is a polynomial (|rel err| < 2e-7, IEEE special values kept:
// fast_exp_special) and bf16 is stored by integer rounding, so the loops vectorise.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/ops.h"
#include "cpu/vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace unif2ace::cpu {
namespace {

constexpr float kSafeExpMax = 60.0f;  // reference/d3diff.py SAFE_EXP_MAX

// One row: max, then sum of exp(x - max); the pair (max, log of the sum).
struct RowLse {
  float max;
  float lse_rel;
};

template <typename T>
U2A_INLINE RowLse row_lse_impl(const T* __restrict__ row, int64_t V) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t v = 0; v < V; ++v) {
    const float x = to_f32(row[v]);
    mx = x > mx ? x : mx;
  }
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < V; ++v) s += fast_exp_special(to_f32(row[v]) - mx);
  return {mx, std::log(s)};
}

// One row of the gradient: out_v = gl * exp((x_v - max) - lse_rel) (the target column is fixed up
// by the caller). out may be row (in place).
template <typename T>
U2A_INLINE void row_grad_impl(const T* row, T* out, int64_t V, float mx, float lrel, float gl) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) out[v] = from_f32<T>(gl * fast_exp_special((to_f32(row[v]) - mx) - lrel));
}

// The two loops above compiled for each ISA of cpu_isa().
#define U2A_D3DIFF_ROW_LOOPS(SUFFIX, TARGET)                                                       \
  template <typename T>                                                                            \
  TARGET RowLse row_lse_##SUFFIX(const T* row, int64_t V) {                                        \
    return row_lse_impl(row, V);                                                                   \
  }                                                                                                \
  template <typename T>                                                                            \
  TARGET void row_grad_##SUFFIX(const T* row, T* out, int64_t V, float mx, float lrel, float gl) { \
    row_grad_impl(row, out, V, mx, lrel, gl);                                                      \
  }
U2A_D3DIFF_ROW_LOOPS(base, )
U2A_D3DIFF_ROW_LOOPS(avx2, U2A_TARGET_AVX2)
U2A_D3DIFF_ROW_LOOPS(avx512, U2A_TARGET_AVX512)
#undef U2A_D3DIFF_ROW_LOOPS

template <typename T>
RowLse row_lse(const T* row, int64_t V, Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return row_lse_avx512(row, V);
    case Isa::kAvx2:
      return row_lse_avx2(row, V);
    default:
      return row_lse_base(row, V);
  }
}

// The gradient row (in place when out == row) including the target column: t_i's logit is read
// before the row is overwritten.
template <typename T>
void row_grad(const T* row, T* out, int64_t V, int64_t ti, float mx, float lrel, float gl, float gt, Isa isa) {
  const bool has_t = ti >= 0 && ti < V;
  const float xt = has_t ? to_f32(row[ti]) : 0.0f;
  switch (isa) {
    case Isa::kAvx512:
      row_grad_avx512(row, out, V, mx, lrel, gl);
      break;
    case Isa::kAvx2:
      row_grad_avx2(row, out, V, mx, lrel, gl);
      break;
    default:
      row_grad_base(row, out, V, mx, lrel, gl);
  }
  if (has_t) out[ti] = from_f32<T>(gl * fast_exp_special((xt - mx) - lrel) + gt);
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1)); }

void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op,
              ": target must be [N] with N = ", logits.size(0), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
}

// fp32 [N] vectors of the kernels, contiguous, checked.
std::vector<at::Tensor> row_vectors(const char* op, int64_t N, std::initializer_list<const at::Tensor*> vs) {
  std::vector<at::Tensor> out;
  for (const at::Tensor* v : vs) {
    TORCH_CHECK(v->dim() == 1 && v->size(0) == N && v->scalar_type() == at::kFloat, op,
                ": the per-row vectors (row_max, lse_rel, grad_lse, grad_tgt; a, b, c, g) must be fp32 [N] with N = ",
                N, ", got ", v->sizes(), " ", v->scalar_type());
    out.push_back(v->contiguous());
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_stats(const at::Tensor& logits) {
  const auto opts = logits.options().dtype(at::kFloat);
  const int64_t N = logits.size(0);
  return {at::empty({N}, opts), at::empty({N}, opts), at::empty({N}, opts)};
}

// The row loop shared by every op: rows that carry loss get body(i, row, ti); ignored rows get
// ignored(i) (no logit is read).
template <typename scalar_t, typename Body, typename Ignored>
void for_rows(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, Body&& body,
              Ignored&& ignored) {
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  at::parallel_for(0, N, grain_rows(V), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (t[i] == ignore_index) {
        ignored(i);
      } else {
        body(i, x + i * ld, t[i]);
      }
    }
  });
}

void write_stats(float* mx, float* lrel, float* tgt, int64_t i, const RowLse& r, float xt) {
  mx[i] = r.max;
  lrel[i] = r.lse_rel;
  tgt[i] = xt;
}

template <typename T>
float target_logit(const T* row, int64_t ti, int64_t V) {
  return (ti >= 0 && ti < V) ? to_f32(row[ti]) : std::numeric_limits<float>::quiet_NaN();
}

// grad rows into out (row stride ldo; out may alias logits when ldo == ld: each element is read
// once, before it is written, by the same thread).
void lse_gather_backward_into(const at::Tensor& logits, const at::Tensor& target, const std::vector<at::Tensor>& rv,
                              int64_t ignore_index, at::Tensor& grad) {
  const int64_t V = logits.size(1), ldo = grad.stride(0);
  if (logits.size(0) == 0 || V == 0) return;
  const float* mx = rv[0].const_data_ptr<float>();
  const float* lrel = rv[1].const_data_ptr<float>();
  const float* gl = rv[2].const_data_ptr<float>();
  const float* gt = rv[3].const_data_ptr<float>();
  const Isa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lse_gather_backward", [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    for_rows<scalar_t>(
        logits, target, ignore_index,
        [&](int64_t i, const scalar_t* row, int64_t ti) {
          row_grad(row, g + i * ldo, V, ti, mx[i], lrel[i], gl[i], gt[i], isa);
        },
        [&](int64_t i) { std::memset(static_cast<void*>(g + i * ldo), 0, sizeof(scalar_t) * V); });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_gather(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                          int64_t ignore_index) {
  check_inputs("unif2ace_cpu::lse_gather", logits_in, target_in);
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  auto stats = empty_stats(logits);
  const int64_t V = logits.size(1);
  float* mx = std::get<0>(stats).data_ptr<float>();
  float* lrel = std::get<1>(stats).data_ptr<float>();
  float* tgt = std::get<2>(stats).data_ptr<float>();
  const Isa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lse_gather", [&] {
    for_rows<scalar_t>(
        logits, target, ignore_index,
        [&](int64_t i, const scalar_t* row, int64_t ti) {
          write_stats(mx, lrel, tgt, i, row_lse(row, V, isa), target_logit(row, ti, V));
        },
        [&](int64_t i) { write_stats(mx, lrel, tgt, i, RowLse{0.0f, 0.0f}, 0.0f); });
  });
  return stats;
}

at::Tensor lse_gather_backward(const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& mx,
                               const at::Tensor& lrel, const at::Tensor& grad_lse, const at::Tensor& grad_tgt,
                               int64_t ignore_index) {
  const char* op = "unif2ace_cpu::lse_gather_backward";
  check_inputs(op, logits_in, target_in);
  const int64_t N = logits_in.size(0), V = logits_in.size(1);
  const auto rv = row_vectors(op, N, {&mx, &lrel, &grad_lse, &grad_tgt});
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  at::Tensor grad = at::empty({N, V}, logits.options());
  lse_gather_backward_into(logits, target_in.contiguous(), rv, ignore_index, grad);
  return grad;
}

// In place: logits (unit column stride) is overwritten with its gradient. Used by the fused head's
// chunk loop on its own chunk buffer (no [chunk, V] allocation per chunk).
void lse_gather_backward_inplace(at::Tensor& logits, const at::Tensor& target_in, const at::Tensor& mx,
                                 const at::Tensor& lrel, const at::Tensor& grad_lse, const at::Tensor& grad_tgt,
                                 int64_t ignore_index) {
  const char* op = "unif2ace_cpu::lse_gather_backward_";
  check_inputs(op, logits, target_in);
  TORCH_CHECK(logits.stride(1) == 1, op, ": logits must have unit column stride");
  const auto rv = row_vectors(op, logits.size(0), {&mx, &lrel, &grad_lse, &grad_tgt});
  lse_gather_backward_into(logits, target_in.contiguous(), rv, ignore_index, logits);
}

// Forward statistics and the gradient of a_i*LSE_i + b_i*safe_exp(LSE_i - c_i) - g_i*t_i, in
// place, one pass per row (see the top of the file).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_gather_grad_inplace(at::Tensor& logits, const at::Tensor& target_in,
                                                                       const at::Tensor& a, const at::Tensor& b,
                                                                       const at::Tensor& c, const at::Tensor& g,
                                                                       int64_t ignore_index) {
  const char* op = "unif2ace_cpu::lse_gather_grad_";
  check_inputs(op, logits, target_in);
  TORCH_CHECK(logits.stride(1) == 1, op, ": logits must have unit column stride");
  const int64_t V = logits.size(1), ld = logits.stride(0);
  const auto rv = row_vectors(op, logits.size(0), {&a, &b, &c, &g});
  const at::Tensor target = target_in.contiguous();
  auto stats = empty_stats(logits);
  float* mx = std::get<0>(stats).data_ptr<float>();
  float* lrel = std::get<1>(stats).data_ptr<float>();
  float* tgt = std::get<2>(stats).data_ptr<float>();
  const float *pa = rv[0].const_data_ptr<float>(), *pb = rv[1].const_data_ptr<float>();
  const float *pc = rv[2].const_data_ptr<float>(), *pg = rv[3].const_data_ptr<float>();
  const Isa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lse_gather_grad_", [&] {
    scalar_t* x = logits.data_ptr<scalar_t>();
    for_rows<scalar_t>(
        logits, target, ignore_index,
        [&](int64_t i, const scalar_t*, int64_t ti) {
          scalar_t* row = x + i * ld;
          const RowLse r = row_lse(row, V, isa);
          write_stats(mx, lrel, tgt, i, r, target_logit(row, ti, V));
          const float lse = std::isfinite(r.max) ? r.max + r.lse_rel : std::numeric_limits<float>::quiet_NaN();
          const float gl = pa[i] + pb[i] * std::exp(std::min(lse - pc[i], kSafeExpMax));
          row_grad(row, row, V, ti, r.max, r.lse_rel, gl, -pg[i], isa);
        },
        [&](int64_t i) {
          write_stats(mx, lrel, tgt, i, RowLse{0.0f, 0.0f}, 0.0f);
          std::memset(static_cast<void*>(x + i * ld), 0, sizeof(scalar_t) * V);
        });
  });
  return stats;
}
}  // namespace unif2ace::cpu
