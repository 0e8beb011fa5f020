// max_pool2d on CUDA: values and int64 indices, and a deterministic backward.
//
// Forward: one thread per output element over a grid-stride loop with 64-bit indices. In NCHW,
// consecutive threads take consecutive output columns of a plane; in channels_last, consecutive
// channels of an output pixel, so every warp's loads and stores are contiguous. Window bounds are
// clamped once per output, and the update is torch's (greater or NaN wins, ties keep the first).
// Backward: a gather, no atomics: one thread per input element visits the few output windows that
// can contain it and sums the gradients of those whose index names it, always in the same order,
// so the result is bitwise reproducible. No zero-fill pass is needed either.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda/std/limits>
#include <tuple>

#include "common/cuda_launch.cuh"
#include "common/outputs.h"
#include "max_pool2d/max_pool2d_common.h"

namespace dlext {
namespace {

constexpr int kThreads = 256;

// Plain-value copy of the geometry for the kernels.
struct Geometry {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, C, in_h, in_w, out_h, out_w;
};

Geometry to_geometry(const Pool2d& p) {
  return {p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw, p.channels, p.in_h, p.in_w, p.out_h,
          p.out_w};
}

__device__ __forceinline__ int64_t first_tap(int64_t start, int64_t step) {
  return start >= 0 ? start : start + ((-start + step - 1) / step) * step;
}

template <typename acc_t>
__device__ __forceinline__ acc_t lowest_value() {
  if constexpr (::cuda::std::numeric_limits<acc_t>::has_infinity) {
    return -::cuda::std::numeric_limits<acc_t>::infinity();
  } else {
    return ::cuda::std::numeric_limits<acc_t>::lowest();
  }
}

template <typename acc_t>
__device__ __forceinline__ bool wins(acc_t v, acc_t best) {
  if constexpr (::cuda::std::numeric_limits<acc_t>::has_quiet_NaN) {
    return v > best || v != v;
  } else {
    return v > best;
  }
}

// Max and argmax of the window of output (oh, ow); `at(flat)` reads input element h * W + w of
// the plane, wherever the layout puts it.
template <typename acc_t, typename Read>
__device__ __forceinline__ void window_max(const Geometry& g, int64_t oh, int64_t ow,
                                           const Read& at, acc_t& best, int64_t& best_i) {
  const int64_t h0 = first_tap(oh * g.sh - g.ph, g.dh);
  const int64_t h1 = min(oh * g.sh - g.ph + (g.kh - 1) * g.dh + 1, g.in_h);
  const int64_t w0 = first_tap(ow * g.sw - g.pw, g.dw);
  const int64_t w1 = min(ow * g.sw - g.pw + (g.kw - 1) * g.dw + 1, g.in_w);
  best = lowest_value<acc_t>();
  best_i = (h0 < h1 && w0 < w1) ? h0 * g.in_w + w0 : -1;
  for (int64_t h = h0; h < h1; h += g.dh) {
    for (int64_t w = w0; w < w1; w += g.dw) {
      const int64_t i = h * g.in_w + w;
      const acc_t v = static_cast<acc_t>(at(i));
      if (wins(v, best)) {
        best = v;
        best_i = i;
      }
    }
  }
}

template <typename scalar_t>
__global__ void forward_nchw_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                    int64_t* __restrict__ idx, Geometry g, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane_in = g.in_h * g.in_w;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ow = o % g.out_w;
    const int64_t oh = (o / g.out_w) % g.out_h;
    const scalar_t* src = in + (o / (g.out_w * g.out_h)) * plane_in;
    acc_t best;
    int64_t best_i;
    window_max<acc_t>(g, oh, ow, [src](int64_t i) { return src[i]; }, best, best_i);
    out[o] = static_cast<scalar_t>(best);
    idx[o] = best_i;
  }
}

template <typename scalar_t>
__global__ void forward_channels_last_kernel(const scalar_t* __restrict__ in,
                                             scalar_t* __restrict__ out,
                                             int64_t* __restrict__ idx, Geometry g,
                                             int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane_in = g.in_h * g.in_w;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = o % g.C;
    const int64_t px = o / g.C;
    const int64_t ow = px % g.out_w;
    const int64_t oh = (px / g.out_w) % g.out_h;
    const scalar_t* src = in + (px / (g.out_w * g.out_h)) * plane_in * g.C + c;
    const int64_t C = g.C;
    acc_t best;
    int64_t best_i;
    window_max<acc_t>(g, oh, ow, [src, C](int64_t i) { return src[i * C]; }, best, best_i);
    out[o] = static_cast<scalar_t>(best);
    idx[o] = best_i;
  }
}

// Output rows (or columns) whose window can contain input row (column) `i`: [lo, hi].
__device__ __forceinline__ void covering(int64_t i, int64_t k, int64_t s, int64_t pad,
                                         int64_t d, int64_t out, int64_t& lo, int64_t& hi) {
  const int64_t reach = i + pad - (k - 1) * d;  // o * s >= reach
  lo = reach <= 0 ? 0 : (reach + s - 1) / s;
  hi = min((i + pad) / s, out - 1);
}

// grad_input[i] = sum of grad_output[o] over the windows o whose index is i. `go(o)`/`ix(o)` read
// the output plane's element o = oh * out_w + ow wherever the layout puts it.
template <typename acc_t, typename ReadG, typename ReadI>
__device__ __forceinline__ acc_t gather_grad(const Geometry& g, int64_t h, int64_t w,
                                             const ReadG& go, const ReadI& ix) {
  int64_t oh0, oh1, ow0, ow1;
  covering(h, g.kh, g.sh, g.ph, g.dh, g.out_h, oh0, oh1);
  covering(w, g.kw, g.sw, g.pw, g.dw, g.out_w, ow0, ow1);
  const int64_t target = h * g.in_w + w;
  acc_t sum = acc_t(0);
  for (int64_t oh = oh0; oh <= oh1; ++oh) {
    for (int64_t ow = ow0; ow <= ow1; ++ow) {
      const int64_t o = oh * g.out_w + ow;
      if (ix(o) == target) sum += static_cast<acc_t>(go(o));
    }
  }
  return sum;
}

template <typename scalar_t>
__global__ void backward_nchw_kernel(const scalar_t* __restrict__ go,
                                     const int64_t* __restrict__ idx,
                                     scalar_t* __restrict__ gi, Geometry g, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane_out = g.out_h * g.out_w;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t w = i % g.in_w;
    const int64_t h = (i / g.in_w) % g.in_h;
    const int64_t plane = i / (g.in_w * g.in_h);
    const scalar_t* g_plane = go + plane * plane_out;
    const int64_t* i_plane = idx + plane * plane_out;
    gi[i] = static_cast<scalar_t>(gather_grad<acc_t>(
        g, h, w, [g_plane](int64_t o) { return g_plane[o]; },
        [i_plane](int64_t o) { return i_plane[o]; }));
  }
}

template <typename scalar_t>
__global__ void backward_channels_last_kernel(const scalar_t* __restrict__ go,
                                              const int64_t* __restrict__ idx,
                                              scalar_t* __restrict__ gi, Geometry g,
                                              int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane_out = g.out_h * g.out_w;
  const int64_t C = g.C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % C;
    const int64_t px = i / C;
    const int64_t w = px % g.in_w;
    const int64_t h = (px / g.in_w) % g.in_h;
    const int64_t n = px / (g.in_w * g.in_h);
    const scalar_t* g_img = go + n * plane_out * C + c;
    const int64_t* i_img = idx + n * plane_out * C + c;
    gi[i] = static_cast<scalar_t>(gather_grad<acc_t>(
        g, h, w, [g_img, C](int64_t o) { return g_img[o * C]; },
        [i_img, C](int64_t o) { return i_img[o * C]; }));
  }
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cuda(const at::Tensor& self,
                                                   at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride,
                                                   at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool ceil_mode) {
  check_max_pool2d_dtype(self);
  const Pool2d p = max_pool2d_geometry(self.sizes(), is_channels_last(self), kernel_size, stride,
                                       padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(self.device());
  const auto fmt = p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = self.contiguous(fmt);
  const auto sizes = pool_output_sizes(self.sizes(), p);
  at::Tensor out = new_empty(sizes, x.options(), fmt);
  at::Tensor indices = new_empty(sizes, x.options().dtype(at::kLong), fmt);
  const int64_t total = out.numel();
  if (total == 0) return {out, indices};
  const Geometry g = to_geometry(p);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dlext::max_pool2d", [&] {
    const unsigned blocks = cuda::grid_for(total, kThreads);
    if (p.channels_last) {
      forward_channels_last_kernel<scalar_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          indices.mutable_data_ptr<int64_t>(), g, total);
    } else {
      forward_nchw_kernel<scalar_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          indices.mutable_data_ptr<int64_t>(), g, total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, indices};
}

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& indices,
                                    at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool ceil_mode) {
  const Pool2d p = check_max_pool2d_backward_args(grad_output, indices, input_size, kernel_size,
                                                  stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const bool channels_last = p.channels_last;
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor go = grad_output.contiguous(fmt);
  const at::Tensor ix = indices.contiguous(fmt);
  at::Tensor grad_input = new_empty(input_size, go.options(), fmt);
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;
  const Geometry g = to_geometry(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(),
                                  "dlext::max_pool2d_backward", [&] {
    const unsigned blocks = cuda::grid_for(total, kThreads);
    if (channels_last) {
      backward_channels_last_kernel<scalar_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
          go.const_data_ptr<scalar_t>(), ix.const_data_ptr<int64_t>(),
          grad_input.mutable_data_ptr<scalar_t>(), g, total);
    } else {
      backward_nchw_kernel<scalar_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
          go.const_data_ptr<scalar_t>(), ix.const_data_ptr<int64_t>(),
          grad_input.mutable_data_ptr<scalar_t>(), g, total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

}  // namespace
}  // namespace dlext

TORCH_LIBRARY_IMPL(dlext, CUDA, m) {
  m.impl("max_pool2d", &dlext::max_pool2d_cuda);
  m.impl("max_pool2d_backward", &dlext::max_pool2d_backward_cuda);
}
