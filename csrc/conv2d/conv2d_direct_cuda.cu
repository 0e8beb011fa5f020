// conv2d on CUDA without a GEMM: the direct kernels for one input channel per group and a small
// channel multiplier (depthwise convolutions, Cin = 1 stems such as LeNet's first layer), where a
// GEMM tile would be mostly empty, and the bias gradient of every conv2d.
//
// Direct forward / backward-input: one thread per result element, in the result's memory order
// (NCHW or NHWC), so the stores of a warp are contiguous; each thread sums its few taps
// (R*S, times the multiplier for the input gradient) in a fixed order in registers, reading any
// layout through strides (no conversion pass). The weight, a few KB, stays in L1/L2.
// Direct backward-weight: one block per weight element (k, r, s) sums dy * x over every output
// pixel: each thread a strided share, then a fixed-shape tree in shared memory; no atomics, so
// the result is the same on every run.
// Bias gradient: column sums of dy in two passes (per-chunk partial sums, then the chunks in
// order): the first pass reads dy coalesced in either layout, the second is tiny.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_launch.cuh"
#include "conv2d/conv2d_cuda.cuh"

namespace dlext {
namespace conv2d_cuda {
namespace {

constexpr int kThreads = 256;

// Geometry plus the strides of the tensors a direct kernel reads (NCHW dimension order).
struct DirectArgs {
  int64_t N, C, H, W, K, Ho, Wo, Kg, R, S;
  int64_t stride_h, stride_w, pad_t, pad_l, dil_h, dil_w;
  int64_t xs[4], ws[4], ys[4];  // input, weight, and dy (or y) strides
};

DirectArgs direct_args(const Conv2dGeometry& g) {
  DirectArgs a{};
  a.N = g.N;
  a.C = g.C;
  a.H = g.H;
  a.W = g.W;
  a.K = g.K;
  a.Ho = g.Ho;
  a.Wo = g.Wo;
  a.Kg = g.Kg;
  a.R = g.R;
  a.S = g.S;
  a.stride_h = g.stride_h;
  a.stride_w = g.stride_w;
  a.pad_t = g.pad_t;
  a.pad_l = g.pad_l;
  a.dil_h = g.dil_h;
  a.dil_w = g.dil_w;
  return a;
}

void copy_strides(int64_t (&dst)[4], const at::Tensor& t) {
  for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
}

// Splits a flat index of a dense (N, C, H, W) tensor laid out NCHW or NHWC into its coordinates.
template <bool CL>
__device__ __forceinline__ void coords(int64_t e, int64_t C, int64_t H, int64_t W, int64_t& n,
                                       int64_t& c, int64_t& h, int64_t& w) {
  if constexpr (CL) {
    c = e % C;
    e /= C;
    w = e % W;
    e /= W;
    h = e % H;
    n = e / H;
  } else {
    w = e % W;
    e /= W;
    h = e % H;
    e /= H;
    c = e % C;
    n = e / C;
  }
}

// y[n, k, p, q] = bias[k] + sum_{r, s} x[n, k / Kg, p*sh - pt + r*dh, q*sw - pl + s*dw] * w[k, 0, r, s]
template <typename T, bool CL>
__global__ void direct_forward_kernel(const DirectArgs a, const T* __restrict__ x,
                                      const T* __restrict__ w, const T* __restrict__ bias,
                                      T* __restrict__ y) {
  using acc = at::opmath_type<T>;
  const int64_t total = a.N * a.K * a.Ho * a.Wo;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, k, p, q;
    coords<CL>(e, a.K, a.Ho, a.Wo, n, k, p, q);
    const T* xp = x + n * a.xs[0] + (k / a.Kg) * a.xs[1];
    const T* wp = w + k * a.ws[0];
    acc sum = acc(0);
    for (int64_t r = 0; r < a.R; ++r) {
      const int64_t h = p * a.stride_h - a.pad_t + r * a.dil_h;
      if (h < 0 || h >= a.H) continue;
      for (int64_t s = 0; s < a.S; ++s) {
        const int64_t v = q * a.stride_w - a.pad_l + s * a.dil_w;
        if (v < 0 || v >= a.W) continue;
        sum = fma(static_cast<acc>(xp[h * a.xs[2] + v * a.xs[3]]),
                  static_cast<acc>(wp[r * a.ws[2] + s * a.ws[3]]), sum);
      }
    }
    if (bias != nullptr) sum += static_cast<acc>(bias[k]);
    y[e] = static_cast<T>(sum);
  }
}

// dx[n, c, h, w] = sum over the channel's Kg outputs k and the taps (r, s) whose output position
// p = (h + pt - r*dh) / sh is whole and inside, likewise q, of dy[n, k, p, q] * w[k, 0, r, s].
template <typename T, bool CL>
__global__ void direct_backward_input_kernel(const DirectArgs a, const T* __restrict__ dy,
                                             const T* __restrict__ w, T* __restrict__ dx) {
  using acc = at::opmath_type<T>;
  const int64_t total = a.N * a.C * a.H * a.W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, h, v;
    coords<CL>(e, a.C, a.H, a.W, n, c, h, v);
    acc sum = acc(0);
    for (int64_t k = c * a.Kg; k < (c + 1) * a.Kg; ++k) {
      const T* dyp = dy + n * a.ys[0] + k * a.ys[1];
      const T* wp = w + k * a.ws[0];
      for (int64_t r = 0; r < a.R; ++r) {
        const int64_t ph = h + a.pad_t - r * a.dil_h;
        if (ph < 0 || ph % a.stride_h != 0 || ph / a.stride_h >= a.Ho) continue;
        for (int64_t s = 0; s < a.S; ++s) {
          const int64_t pw = v + a.pad_l - s * a.dil_w;
          if (pw < 0 || pw % a.stride_w != 0 || pw / a.stride_w >= a.Wo) continue;
          sum = fma(static_cast<acc>(dyp[(ph / a.stride_h) * a.ys[2] + (pw / a.stride_w) * a.ys[3]]),
                    static_cast<acc>(wp[r * a.ws[2] + s * a.ws[3]]), sum);
        }
      }
    }
    dx[e] = static_cast<T>(sum);
  }
}

// Sum of one value per thread of the block, in a fixed order.
template <typename A>
__device__ A block_sum(A v, A* sm) {
  sm[threadIdx.x] = v;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) sm[threadIdx.x] += sm[threadIdx.x + half];
    __syncthreads();
  }
  const A total = sm[0];
  __syncthreads();  // sm is reused by the next call
  return total;
}

// dw[k, 0, r, s] = sum_{n, p, q} dy[n, k, p, q] * x[n, k / Kg, p*sh - pt + r*dh, q*sw - pl + s*dw]
template <typename T>
__global__ void direct_backward_weight_kernel(const DirectArgs a, const T* __restrict__ dy,
                                              const T* __restrict__ x, T* __restrict__ dw,
                                              int64_t dws0, int64_t dws2, int64_t dws3) {
  using acc = at::opmath_type<T>;
  __shared__ acc sm[kThreads];
  const int64_t pixels = a.N * a.Ho * a.Wo;
  for (int64_t b = blockIdx.x; b < a.K * a.R * a.S; b += gridDim.x) {
    const int64_t k = b / (a.R * a.S), r = (b / a.S) % a.R, s = b % a.S;
    const T* xp = x + (k / a.Kg) * a.xs[1];
    const T* dyp = dy + k * a.ys[1];
    acc sum = acc(0);
    for (int64_t t = threadIdx.x; t < pixels; t += kThreads) {
      const int64_t q = t % a.Wo, p = (t / a.Wo) % a.Ho, n = t / (a.Wo * a.Ho);
      const int64_t h = p * a.stride_h - a.pad_t + r * a.dil_h;
      const int64_t v = q * a.stride_w - a.pad_l + s * a.dil_w;
      if (h < 0 || h >= a.H || v < 0 || v >= a.W) continue;
      sum = fma(static_cast<acc>(dyp[n * a.ys[0] + p * a.ys[2] + q * a.ys[3]]),
                static_cast<acc>(xp[n * a.xs[0] + h * a.xs[2] + v * a.xs[3]]), sum);
    }
    sum = block_sum(sum, sm);
    if (threadIdx.x == 0) dw[k * dws0 + r * dws2 + s * dws3] = static_cast<T>(sum);
  }
}

// Bias gradient, pass 1 for channels_last dy ([pixels, K] row-major): block (32, 8) sums the
// rows of one chunk for 32 channels; partial[chunk, k]. Chunks of at least kRowsPerChunk rows,
// more when that would take more than kMaxChunks chunks (gridDim.y).
constexpr int64_t kRowsPerChunk = 512;
constexpr int64_t kMaxChunks = 65535;

template <typename T>
__global__ void bias_partial_nhwc_kernel(const T* __restrict__ dy, int64_t pixels, int64_t K,
                                         int64_t rows_per_chunk,
                                         at::opmath_type<T>* __restrict__ partial) {
  using acc = at::opmath_type<T>;
  __shared__ acc sm[8][33];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t end = std::min(begin + rows_per_chunk, pixels);
  acc sum = acc(0);
  if (k < K) {
    for (int64_t row = begin + threadIdx.y; row < end; row += 8) sum += static_cast<acc>(dy[row * K + k]);
  }
  sm[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && k < K) {
    acc total = sm[0][threadIdx.x];
    for (int i = 1; i < 8; ++i) total += sm[i][threadIdx.x];
    partial[blockIdx.y * K + k] = total;
  }
}

// Pass 1 for NCHW dy: block (k, chunk of images) sums the planes dy[n, k, :, :] of its images.
template <typename T>
__global__ void bias_partial_nchw_kernel(const T* __restrict__ dy, int64_t N, int64_t K,
                                         int64_t plane, int64_t images_per_chunk,
                                         at::opmath_type<T>* __restrict__ partial) {
  using acc = at::opmath_type<T>;
  __shared__ acc sm[kThreads];
  const int64_t k = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * images_per_chunk;
  const int64_t n1 = std::min(n0 + images_per_chunk, N);
  acc sum = acc(0);
  for (int64_t n = n0; n < n1; ++n) {
    const T* p = dy + (n * K + k) * plane;
    for (int64_t i = threadIdx.x; i < plane; i += kThreads) sum += static_cast<acc>(p[i]);
  }
  sum = block_sum(sum, sm);
  if (threadIdx.x == 0) partial[blockIdx.y * K + k] = sum;
}

// Pass 2: db[k] = sum over chunks, in order.
template <typename T>
__global__ void bias_finish_kernel(const at::opmath_type<T>* __restrict__ partial, int64_t chunks,
                                   int64_t K, T* __restrict__ db) {
  using acc = at::opmath_type<T>;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < K;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc sum = acc(0);
    for (int64_t c = 0; c < chunks; ++c) sum += partial[c * K + k];
    db[k] = static_cast<T>(sum);
  }
}

}  // namespace

void direct_forward(const Conv2dGeometry& g, const at::Tensor& x, const at::Tensor& w,
                    const at::Tensor& bias, at::Tensor& y) {
  DirectArgs a = direct_args(g);
  copy_strides(a.xs, x);
  copy_strides(a.ws, w);
  const int64_t total = y.numel();
  const bool cl = y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dlext::conv2d", [&] {
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const auto grid = cuda::grid_for(total, kThreads);
    if (cl) {
      direct_forward_kernel<scalar_t, true><<<grid, kThreads, 0, cuda::current_stream()>>>(
          a, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b,
          y.mutable_data_ptr<scalar_t>());
    } else {
      direct_forward_kernel<scalar_t, false><<<grid, kThreads, 0, cuda::current_stream()>>>(
          a, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b,
          y.mutable_data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void direct_backward_input(const Conv2dGeometry& g, const at::Tensor& dy, const at::Tensor& w,
                           at::Tensor& dx) {
  DirectArgs a = direct_args(g);
  copy_strides(a.ys, dy);
  copy_strides(a.ws, w);
  const int64_t total = dx.numel();
  const bool cl = dx.is_contiguous(at::MemoryFormat::ChannelsLast) && !dx.is_contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(),
                                  "dlext::conv2d_backward", [&] {
    const auto grid = cuda::grid_for(total, kThreads);
    if (cl) {
      direct_backward_input_kernel<scalar_t, true><<<grid, kThreads, 0, cuda::current_stream()>>>(
          a, dy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          dx.mutable_data_ptr<scalar_t>());
    } else {
      direct_backward_input_kernel<scalar_t, false><<<grid, kThreads, 0, cuda::current_stream()>>>(
          a, dy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          dx.mutable_data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void direct_backward_weight(const Conv2dGeometry& g, const at::Tensor& dy, const at::Tensor& x,
                            at::Tensor& dw) {
  DirectArgs a = direct_args(g);
  copy_strides(a.ys, dy);
  copy_strides(a.xs, x);
  const int64_t blocks = std::min<int64_t>(g.K * g.R * g.S, int64_t{1} << 30);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(),
                                  "dlext::conv2d_backward", [&] {
    direct_backward_weight_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0,
                                              cuda::current_stream()>>>(
        a, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        dw.mutable_data_ptr<scalar_t>(), dw.stride(0), dw.stride(2), dw.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bias_backward(const at::Tensor& dy, at::Tensor& db) {
  const int64_t N = dy.size(0), K = dy.size(1), plane = dy.size(2) * dy.size(3);
  const bool cl = !dy.is_contiguous();  // the caller passes a dense NCHW or NHWC tensor
  const int64_t pixels = N * plane;
  auto divup = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t rows_per_chunk = std::max(kRowsPerChunk, divup(pixels, kMaxChunks));
  const int64_t images_per_chunk = std::max({int64_t{1}, 16384 / std::max<int64_t>(plane, 1),
                                             divup(N, kMaxChunks)});
  const int64_t chunks = cl ? divup(pixels, rows_per_chunk) : divup(N, images_per_chunk);
  TORCH_CHECK(chunks >= 1 && chunks <= kMaxChunks && (cl || K <= (int64_t{1} << 31) - 1),
              "dlext::conv2d_backward (CUDA): grad_output is too large for the bias gradient "
              "kernel");
  const at::ScalarType acc_type = dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor partial = at::empty({chunks, K}, dy.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(),
                                  "dlext::conv2d_backward", [&] {
    using acc = at::opmath_type<scalar_t>;
    acc* part = partial.mutable_data_ptr<acc>();
    const cudaStream_t stream = cuda::current_stream();
    if (cl) {
      const dim3 grid(static_cast<unsigned>((K + 31) / 32), static_cast<unsigned>(chunks));
      bias_partial_nhwc_kernel<scalar_t><<<grid, dim3(32, 8), 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), pixels, K, rows_per_chunk, part);
    } else {
      const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(chunks));
      bias_partial_nchw_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), N, K, plane, images_per_chunk, part);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bias_finish_kernel<scalar_t><<<cuda::grid_for(K, kThreads), kThreads, 0, stream>>>(
        part, chunks, K, db.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace conv2d_cuda
}  // namespace dlext
