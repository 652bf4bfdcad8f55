// Launchers for the D3Diff row kernels (device code in d3diff.cuh): the entry points of
// torch.ops.unif2ace_cuda.lse_gather / lse_gather_backward (registered in module.cpp). No host
// syncs; outputs sized from shapes. Geometry by V: one warp per row (4 rows per CTA) up to
// V = 2048, a 256-thread CTA per row up to V = 32768, a 512-thread CTA beyond.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>
#include <type_traits>

#include "cuda/d3diff.cuh"
#include "cuda/dispatch.h"
#include "cuda/launch.h"
#include "cuda/ops.h"

namespace unif2ace::cuda {
namespace {

void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(on_device(logits), op, ": logits must be a ", kDeviceName, " tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(
      logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf || logits.scalar_type() == at::kBFloat16,
      op, ": logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), op, ": target must be on ", logits.device(), ", got ",
              target.device());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op,
              ": target must be [N] with N = ", logits.size(0), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
}

// Rows with unit column stride are read in place (any row stride); otherwise one copy.
at::Tensor rows_view(const at::Tensor& x) { return x.stride(1) == 1 && x.size(1) > 0 ? x : x.contiguous(); }

enum class Geometry { kWarp, kCta256, kCta512 };

Geometry pick(int64_t V) {
  if (V <= 2048) return Geometry::kWarp;
  if (V <= 32768) return Geometry::kCta256;
  return Geometry::kCta512;
}

constexpr int kWarpRows = 4;

template <typename F>
void with_geometry(int64_t V, F&& f) {
  switch (pick(V)) {
    case Geometry::kWarp:
      f(std::integral_constant<int, 32>{}, std::integral_constant<int, kWarpRows>{});
      break;
    case Geometry::kCta256:
      f(std::integral_constant<int, 256>{}, std::integral_constant<int, 1>{});
      break;
    default:
      f(std::integral_constant<int, 512>{}, std::integral_constant<int, 1>{});
      break;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_gather(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                          int64_t ignore_index) {
  const char* op = "unif2ace_cuda::lse_gather";
  check_inputs(op, logits_in, target_in);
  DeviceGuard guard(logits_in.device());
  const int64_t N = logits_in.size(0), V = logits_in.size(1);
  at::Tensor row_max = at::empty({N}, logits_in.options().dtype(at::kFloat));
  at::Tensor lse_rel = at::empty({N}, logits_in.options().dtype(at::kFloat));
  at::Tensor tgt = at::empty({N}, logits_in.options().dtype(at::kFloat));
  if (N == 0) return {row_max, lse_rel, tgt};
  TORCH_CHECK(V >= 1, op, ": logits must have V >= 1 columns");
  const at::Tensor logits = rows_view(logits_in);
  const at::Tensor target = target_in.contiguous();
  const int64_t ld = logits.stride(0);
  cudaStream_t stream = current_stream();
  UNIF2ACE_DISPATCH_FLOAT3(logits.scalar_type(), "lse_gather_cuda", [&] {
    using T = typename DevType<scalar_t>::type;
    const T* x = reinterpret_cast<const T*>(logits.const_data_ptr<scalar_t>());
    with_geometry(V, [&](auto row_threads, auto rows) {
      constexpr int RT = decltype(row_threads)::value, R = decltype(rows)::value;
      const int64_t grid = (N + R - 1) / R;
      TORCH_CHECK(grid < (int64_t(1) << 31), op, ": too many rows (", N, ")");
      launch(d3diff::lse_gather_kernel<T, RT, R>, static_cast<unsigned>(grid), RT * R, 0, stream, x, ld,
             target.const_data_ptr<int64_t>(), N, V, ignore_index, row_max.mutable_data_ptr<float>(),
             lse_rel.mutable_data_ptr<float>(), tgt.mutable_data_ptr<float>());
    });
  });
  return {row_max, lse_rel, tgt};
}

at::Tensor lse_gather_backward(const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& max_in,
                               const at::Tensor& lse_rel_in, const at::Tensor& grad_lse_in,
                               const at::Tensor& grad_tgt_in, int64_t ignore_index) {
  const char* op = "unif2ace_cuda::lse_gather_backward";
  check_inputs(op, logits_in, target_in);
  const int64_t N = logits_in.size(0), V = logits_in.size(1);
  for (const at::Tensor* v : {&max_in, &lse_rel_in, &grad_lse_in, &grad_tgt_in}) {
    TORCH_CHECK(v->dim() == 1 && v->size(0) == N && v->scalar_type() == at::kFloat && v->device() == logits_in.device(),
                op, ": row_max, lse_rel, grad_lse and grad_tgt must be fp32 [N] on ", logits_in.device(),
                " with N = ", N, ", got ", v->sizes(), " ", v->scalar_type(), " on ", v->device());
  }
  DeviceGuard guard(logits_in.device());
  at::Tensor grad = at::empty({N, V}, logits_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0 || V == 0) return grad;
  const at::Tensor logits = rows_view(logits_in);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor mx = max_in.contiguous(), lrel = lse_rel_in.contiguous();
  const at::Tensor gl = grad_lse_in.contiguous(), gt = grad_tgt_in.contiguous();
  const int64_t ld = logits.stride(0);
  cudaStream_t stream = current_stream();
  UNIF2ACE_DISPATCH_FLOAT3(logits.scalar_type(), "lse_gather_backward_cuda", [&] {
    using T = typename DevType<scalar_t>::type;
    const T* x = reinterpret_cast<const T*>(logits.const_data_ptr<scalar_t>());
    T* g = reinterpret_cast<T*>(grad.mutable_data_ptr<scalar_t>());
    with_geometry(V, [&](auto row_threads, auto rows) {
      constexpr int RT = decltype(row_threads)::value, R = decltype(rows)::value;
      const int64_t grid = (N + R - 1) / R;
      TORCH_CHECK(grid < (int64_t(1) << 31), op, ": too many rows (", N, ")");
      launch(d3diff::lse_gather_backward_kernel<T, RT, R>, static_cast<unsigned>(grid), RT * R, 0, stream, x, ld,
             target.const_data_ptr<int64_t>(), mx.const_data_ptr<float>(), lrel.const_data_ptr<float>(),
             gl.const_data_ptr<float>(), gt.const_data_ptr<float>(), N, V, ignore_index, g);
    });
  });
  return grad;
}
}  // namespace unif2ace::cuda
