// ReLU on the CPU: y = (x < 0) ? 0 : x and its backward dx = (y <= 0) ? 0 : dy.
//
// Why it is fast: a single pass over memory (common/cpu_loops.h: threaded, AVX2-vectorised,
// unrolled), one compare and one blend per vector. The formulas match torch exactly: NaN propagates forward and passes its
// gradient through, -0.0 stays -0.0, and the gradient at 0 is 0.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/cpu_loops.h"

#include "common/dense.h"
#include "common/outputs.h"
#include "relu/relu_common.h"

namespace dlext {
namespace {

template <typename scalar_t>
void relu_forward_kernel(const scalar_t* x, scalar_t* y, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec zero(scalar_t(0));
  cpu::unary_loop(
      x, y, n, [zero](const Vec& v) { return Vec::blendv(v, zero, v < zero); },
      [](scalar_t v) { return v < scalar_t(0) ? scalar_t(0) : v; });
}

template <typename scalar_t>
void relu_backward_kernel(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec zero(scalar_t(0));
  cpu::binary_loop(
      dy, y, dx, n, [zero](const Vec& g, const Vec& r) { return Vec::blendv(g, zero, r <= zero); },
      [](scalar_t g, scalar_t r) { return r <= scalar_t(0) ? scalar_t(0) : g; });
}

at::Tensor relu_cpu(const at::Tensor& self) {
  check_relu_dtype(self, "dlext::relu");
  const at::Tensor x = dense(self);
  at::Tensor y = new_empty_like(x);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dlext::relu", [&] {
    relu_forward_kernel(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), x.numel());
  });
  return y;
}

void relu_inplace_cpu(at::Tensor& self) {
  check_relu_dtype(self, "dlext::relu_");
  if (!self.is_non_overlapping_and_dense()) {  // a view with gaps: compute densely, write back
    self.copy_(relu_cpu(self));
    return;
  }
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, self.scalar_type(), "dlext::relu_", [&] {
    scalar_t* p = self.mutable_data_ptr<scalar_t>();
    relu_forward_kernel<scalar_t>(p, p, self.numel());
  });
}

at::Tensor relu_backward_cpu(const at::Tensor& grad_output, const at::Tensor& result) {
  check_relu_backward_args(grad_output, result);
  const at::Tensor y = dense(result);
  const at::Tensor dy = like_layout(grad_output, y);
  at::Tensor dx = new_empty_like(y);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "dlext::relu_backward", [&] {
    relu_backward_kernel(dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                         dx.mutable_data_ptr<scalar_t>(), y.numel());
  });
  return dx;
}

}  // namespace
}  // namespace dlext

TORCH_LIBRARY_IMPL(dlext, CPU, m) {
  m.impl("relu", &dlext::relu_cpu);
  m.impl("relu_", &dlext::relu_inplace_cpu);
  m.impl("relu_backward", &dlext::relu_backward_cpu);
}
