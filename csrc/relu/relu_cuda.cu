// ReLU on CUDA: y = (x < 0) ? 0 : x and its backward dx = (y <= 0) ? 0 : dy.
//
// Why it is fast: each thread moves 16 bytes per load and store (8 halves, 4 floats, 2 doubles)
// when the pointers allow it, so a warp issues full 512-byte coalesced transactions; a grid-stride
// loop over a grid of a few waves per SM keeps every SM streaming with no tail launch, and the
// indices are 64-bit so tensors past 2^31 elements are covered. Same formulas as the CPU kernel.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "common/cuda_launch.cuh"
#include "common/dense.h"
#include "common/outputs.h"
#include "relu/relu_common.h"

namespace dlext {
namespace {

// Forward zeroes v < 0; backward blocks the gradient where y <= 0. NaN compares false in both, so
// NaN propagates forward and passes its gradient, as in torch. Comparisons are exact in every
// dtype: 16-bit floats widen to float, float and double compare as themselves.
template <typename T>
constexpr bool kIsHalfType = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

template <typename T>
__device__ __forceinline__ bool relu_zeroes(T v) {
  if constexpr (std::is_unsigned_v<T>) return false;
  else if constexpr (kIsHalfType<T>) return static_cast<float>(v) < 0.f;
  else return v < T(0);
}

template <typename T>
__device__ __forceinline__ bool relu_blocks_grad(T v) {
  if constexpr (std::is_unsigned_v<T>) return v == T(0);
  else if constexpr (kIsHalfType<T>) return static_cast<float>(v) <= 0.f;
  else return v <= T(0);
}

// x and y may be the same array (relu_): no __restrict__, so no read-only (non-coherent) loads.
template <typename T, int VEC>
__global__ void relu_forward_kernel(const T* x, T* y, int64_t n) {
  using P = cuda::Pack<T, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / VEC;
  for (int64_t p = first; p < packs; p += stride) {
    P in = reinterpret_cast<const P*>(x)[p];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (relu_zeroes(in.v[k])) in.v[k] = T(0);
    }
    reinterpret_cast<P*>(y)[p] = in;
  }
  for (int64_t i = packs * VEC + first; i < n; i += stride) {  // tail shorter than a pack
    const T v = x[i];
    y[i] = relu_zeroes(v) ? T(0) : v;
  }
}

template <typename T, int VEC>
__global__ void relu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                     T* __restrict__ dx, int64_t n) {
  using P = cuda::Pack<T, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / VEC;
  for (int64_t p = first; p < packs; p += stride) {
    P g = reinterpret_cast<const P*>(dy)[p];
    const P r = reinterpret_cast<const P*>(y)[p];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (relu_blocks_grad(r.v[k])) g.v[k] = T(0);
    }
    reinterpret_cast<P*>(dx)[p] = g;
  }
  for (int64_t i = packs * VEC + first; i < n; i += stride) {
    dx[i] = relu_blocks_grad(y[i]) ? T(0) : dy[i];
  }
}

constexpr int kThreads = 256;

template <typename T>
void launch_forward(const T* x, T* y, int64_t n) {
  if (n == 0) return;
  constexpr int V = cuda::kVec16<T>;
  if (cuda::aligned16(x) && cuda::aligned16(y)) {
    relu_forward_kernel<T, V><<<cuda::grid_for(n / V + 1, kThreads), kThreads, 0,
                                cuda::current_stream()>>>(x, y, n);
  } else {
    relu_forward_kernel<T, 1><<<cuda::grid_for(n, kThreads), kThreads, 0,
                                cuda::current_stream()>>>(x, y, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor relu_cuda(const at::Tensor& self) {
  check_relu_dtype(self, "dlext::relu");
  const c10::cuda::CUDAGuard guard(self.device());
  const at::Tensor x = dense(self);
  at::Tensor y = new_empty_like(x);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dlext::relu", [&] {
    launch_forward(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), x.numel());
  });
  return y;
}

void relu_inplace_cuda(at::Tensor& self) {
  check_relu_dtype(self, "dlext::relu_");
  const c10::cuda::CUDAGuard guard(self.device());
  if (!self.is_non_overlapping_and_dense()) {
    self.copy_(relu_cuda(self));
    return;
  }
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, self.scalar_type(), "dlext::relu_", [&] {
    scalar_t* p = self.mutable_data_ptr<scalar_t>();
    launch_forward<scalar_t>(p, p, self.numel());
  });
}

at::Tensor relu_backward_cuda(const at::Tensor& grad_output, const at::Tensor& result) {
  check_relu_backward_args(grad_output, result);
  const c10::cuda::CUDAGuard guard(result.device());
  const at::Tensor y = dense(result);
  const at::Tensor dy = like_layout(grad_output, y);
  at::Tensor dx = new_empty_like(y);
  const int64_t n = y.numel();
  if (n == 0) return dx;
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "dlext::relu_backward", [&] {
    using T = scalar_t;
    constexpr int V = cuda::kVec16<T>;
    const T* pdy = dy.const_data_ptr<T>();
    const T* py = y.const_data_ptr<T>();
    T* pdx = dx.mutable_data_ptr<T>();
    if (cuda::aligned16(pdy) && cuda::aligned16(py) && cuda::aligned16(pdx)) {
      relu_backward_kernel<T, V><<<cuda::grid_for(n / V + 1, kThreads), kThreads, 0,
                                   cuda::current_stream()>>>(pdy, py, pdx, n);
    } else {
      relu_backward_kernel<T, 1><<<cuda::grid_for(n, kThreads), kThreads, 0,
                                   cuda::current_stream()>>>(pdy, py, pdx, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace
}  // namespace dlext

TORCH_LIBRARY_IMPL(dlext, CUDA, m) {
  m.impl("relu", &dlext::relu_cuda);
  m.impl("relu_", &dlext::relu_inplace_cuda);
  m.impl("relu_backward", &dlext::relu_backward_cuda);
}
