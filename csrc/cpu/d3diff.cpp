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
//
// fp32 math on every input dtype, 64-bit indexing, at::parallel_for over rows. The hot loops are
// compiled twice -- baseline x86-64 and AVX2+FMA -- and picked at run time; exp is a polynomial
// (|rel err| < 2e-7, IEEE special values kept: fast_exp_special) so the loops vectorise.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu/vec_math.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

namespace unif2ace::cpu {
namespace {

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
// by the caller).
template <typename T>
U2A_INLINE void row_grad_impl(const T* __restrict__ row, T* __restrict__ out, int64_t V, float mx, float lrel,
                              float gl) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) out[v] = static_cast<T>(gl * fast_exp_special((to_f32(row[v]) - mx) - lrel));
}

template <typename T>
U2A_TARGET_AVX2 RowLse row_lse_avx2(const T* row, int64_t V) {
  return row_lse_impl(row, V);
}
template <typename T>
RowLse row_lse_base(const T* row, int64_t V) {
  return row_lse_impl(row, V);
}
template <typename T>
U2A_TARGET_AVX2 void row_grad_avx2(const T* row, T* out, int64_t V, float mx, float lrel, float gl) {
  row_grad_impl(row, out, V, mx, lrel, gl);
}
template <typename T>
void row_grad_base(const T* row, T* out, int64_t V, float mx, float lrel, float gl) {
  row_grad_impl(row, out, V, mx, lrel, gl);
}

bool have_avx2() { return cpu_isa() != Isa::kBase; }

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1)); }

void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op,
              ": target must be [N] with N = ", logits.size(0), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_gather(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                          int64_t ignore_index) {
  check_inputs("unif2ace_cpu::lse_gather", logits_in, target_in);
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  at::Tensor mx = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor lrel = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor tgt = at::empty({N}, logits.options().dtype(at::kFloat));
  if (N == 0) return {mx, lrel, tgt};
  const bool avx2 = have_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lse_gather", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    float* mx_p = mx.data_ptr<float>();
    float* lrel_p = lrel.data_ptr<float>();
    float* tgt_p = tgt.data_ptr<float>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t ti = t[i];
        if (ti == ignore_index) {
          mx_p[i] = 0.0f;
          lrel_p[i] = 0.0f;
          tgt_p[i] = 0.0f;
          continue;
        }
        const scalar_t* row = x + i * ld;
        const RowLse r = avx2 ? row_lse_avx2(row, V) : row_lse_base(row, V);
        mx_p[i] = r.max;
        lrel_p[i] = r.lse_rel;
        tgt_p[i] = (ti >= 0 && ti < V) ? to_f32(row[ti]) : std::numeric_limits<float>::quiet_NaN();
      }
    });
  });
  return {mx, lrel, tgt};
}

// Per-row vectors of the backward (fp32 [N], contiguous).
struct RowVectors {
  at::Tensor mx, lrel, gl, gt;
};

// grad rows into out (row stride ldo; out may alias logits when ldo == ld: each element is read
// once, before it is written, by the same thread).
void lse_gather_backward_into(const at::Tensor& logits, const at::Tensor& target, const RowVectors& rv,
                              int64_t ignore_index, at::Tensor& grad) {
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0), ldo = grad.stride(0);
  if (N == 0 || V == 0) return;
  const bool avx2 = have_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lse_gather_backward", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const float* mx_p = rv.mx.const_data_ptr<float>();
    const float* lrel_p = rv.lrel.const_data_ptr<float>();
    const float* gl_p = rv.gl.const_data_ptr<float>();
    const float* gt_p = rv.gt.const_data_ptr<float>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        scalar_t* out = g + i * ldo;
        const int64_t ti = t[i];
        if (ti == ignore_index) {
          std::memset(static_cast<void*>(out), 0, sizeof(scalar_t) * V);
          continue;
        }
        const scalar_t* row = x + i * ld;
        // the target logit, read before the row is overwritten (in-place use)
        const float xt = (ti >= 0 && ti < V) ? to_f32(row[ti]) : 0.0f;
        if (avx2) {
          row_grad_avx2(row, out, V, mx_p[i], lrel_p[i], gl_p[i]);
        } else {
          row_grad_base(row, out, V, mx_p[i], lrel_p[i], gl_p[i]);
        }
        if (ti >= 0 && ti < V) {
          out[ti] = static_cast<scalar_t>(gl_p[i] * fast_exp_special((xt - mx_p[i]) - lrel_p[i]) + gt_p[i]);
        }
      }
    });
  });
}

RowVectors row_vectors(const char* op, int64_t N, const at::Tensor& mx, const at::Tensor& lrel, const at::Tensor& gl,
                       const at::Tensor& gt) {
  for (const at::Tensor* v : {&mx, &lrel, &gl, &gt}) {
    TORCH_CHECK(v->dim() == 1 && v->size(0) == N && v->scalar_type() == at::kFloat, op,
                ": row_max, lse_rel, grad_lse and grad_tgt must be fp32 [N] with N = ", N, ", got ", v->sizes(), " ",
                v->scalar_type());
  }
  return {mx.contiguous(), lrel.contiguous(), gl.contiguous(), gt.contiguous()};
}

at::Tensor lse_gather_backward(const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& mx,
                               const at::Tensor& lrel, const at::Tensor& grad_lse, const at::Tensor& grad_tgt,
                               int64_t ignore_index) {
  const char* op = "unif2ace_cpu::lse_gather_backward";
  check_inputs(op, logits_in, target_in);
  const int64_t N = logits_in.size(0), V = logits_in.size(1);
  const RowVectors rv = row_vectors(op, N, mx, lrel, grad_lse, grad_tgt);
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  at::Tensor grad = at::empty({N, V}, logits.options());
  lse_gather_backward_into(logits, target_in.contiguous(), rv, ignore_index, grad);
  return grad;
}

// In place: logits (unit column stride) is overwritten with its gradient. Used by the fused head's
// chunk loop on its own fp32 chunk buffer (no [chunk, V] allocation per chunk).
void lse_gather_backward_inplace(at::Tensor& logits, const at::Tensor& target_in, const at::Tensor& mx,
                                 const at::Tensor& lrel, const at::Tensor& grad_lse, const at::Tensor& grad_tgt,
                                 int64_t ignore_index) {
  const char* op = "unif2ace_cpu::lse_gather_backward_";
  check_inputs(op, logits, target_in);
  TORCH_CHECK(logits.stride(1) == 1, op, ": logits must have unit column stride");
  const RowVectors rv = row_vectors(op, logits.size(0), mx, lrel, grad_lse, grad_tgt);
  lse_gather_backward_into(logits, target_in.contiguous(), rv, ignore_index, logits);
}

}  // namespace
}  // namespace unif2ace::cpu

TORCH_LIBRARY_FRAGMENT(unif2ace_cpu, m) {
  m.def("lse_gather(Tensor logits, Tensor target, int ignore_index) -> (Tensor, Tensor, Tensor)",
        &unif2ace::cpu::lse_gather);
  m.def(
      "lse_gather_backward(Tensor logits, Tensor target, Tensor row_max, Tensor lse_rel, Tensor grad_lse, "
      "Tensor grad_tgt, int ignore_index) -> Tensor",
      &unif2ace::cpu::lse_gather_backward);
  m.def(
      "lse_gather_backward_(Tensor(a!) logits, Tensor target, Tensor row_max, Tensor lse_rel, Tensor grad_lse, "
      "Tensor grad_tgt, int ignore_index) -> ()",
      &unif2ace::cpu::lse_gather_backward_inplace);
}
