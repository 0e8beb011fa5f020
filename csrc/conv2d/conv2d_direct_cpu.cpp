// conv2d on the CPU for one input channel per group (depthwise convolutions and channel
// multipliers), by direct loops over NCHW planes:
//   forward        y[n,k] = b[k] + sum_{r,s} w[k,r,s] * x[n, k/Kg] shifted by (r, s)
//   grad input     dx[n,c] = sum_{k in group c} sum_{r,s} w[k,r,s] * dy[n,k] shifted back
//   grad weight    dw[k,r,s] = sum_{n} <dy[n,k], x[n, k/Kg] shifted by (r, s)>
// Here a GEMM per group would be Kg x R*S times R*S x pixels, too thin to pay for im2col; with
// more output channels per input channel (LeNet's first layer: 6) the GEMM path wins again.
//
// Why it is fast: every kernel tap is one pass along a row, a vectorised axpy (or dot) over
// contiguous memory when the stride is 1, with the row's in-image range computed once per tap
// instead of a bounds test per element; an output row is finished while it is in L1. Threads
// split planes (forward, grad input) or output channels (grad weight), so each output element is
// computed by one thread in a fixed order: no atomics, deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "conv2d/conv2d_kernels_cpu.h"
#include "conv2d/conv2d_patches_cpu.h"

namespace dlext {
namespace conv2d_cpu {
namespace {

// Plane work is cheap: give each task at least this many multiply-adds.
constexpr int64_t kMinTaskFlops = 1 << 15;

// y[j * incy] += a * x[j * incx], j in [0, n).
template <typename T>
inline void axpy(int64_t n, T a, const T* x, int64_t incx, T* y, int64_t incy) {
  using Vec = at::vec::Vectorized<T>;
  int64_t j = 0;
  if (incx == 1 && incy == 1) {
    const Vec va(a);
    for (; j + Vec::size() <= n; j += Vec::size()) {
      at::vec::fmadd(va, Vec::loadu(x + j), Vec::loadu(y + j)).store(y + j);
    }
  }
  for (; j < n; ++j) y[j * incy] += a * x[j * incx];
}

// sum_j y[j] * x[j * incx], j in [0, n).
template <typename T>
inline T dot(int64_t n, const T* y, const T* x, int64_t incx) {
  using Vec = at::vec::Vectorized<T>;
  int64_t j = 0;
  T sum(0);
  if (incx == 1) {
    Vec acc0(T(0)), acc1(T(0));
    for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
      acc0 = at::vec::fmadd(Vec::loadu(y + j), Vec::loadu(x + j), acc0);
      acc1 = at::vec::fmadd(Vec::loadu(y + j + Vec::size()), Vec::loadu(x + j + Vec::size()), acc1);
    }
    sum = at::vec::vec_reduce_all([](Vec& a, Vec& b) { return a + b; }, acc0 + acc1);
  }
  for (; j < n; ++j) sum += y[j] * x[j * incx];
  return sum;
}

// Whether every one of n values is finite: 0 * v is 0 for them and NaN otherwise.
template <typename T>
bool all_finite(const T* p, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    acc = at::vec::fmadd(Vec::loadu(p + j), Vec(T(0)), acc);
  }
  T tail(0);
  for (; j < n; ++j) tail += p[j] * T(0);
  return at::vec::vec_reduce_all([](Vec& a, Vec& b) { return a + b; }, acc) + tail == T(0);
}

// Padded taps. The loops skip taps that fall in the zero padding, where torch's CPU convolution
// (and dlext's GEMM path) multiplies the padding by the other factor, so a non-finite weight
// (forward) or output gradient (weight gradient) there makes the result NaN. These calls mark
// exactly those results NaN; they run only when such a factor exists.

// Calls fn(oh, r, s, lo, hi) for every output row oh and tap (r, s): outputs [lo, hi) of the row
// read the input, the others read padding.
template <typename Fn>
void for_each_tap_span(const Conv2dGeometry& g, const Fn& fn) {
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t ih = oh * g.stride_h - g.pad_t + r * g.dil_h;
      for (int64_t s = 0; s < g.S; ++s) {
        const Span v = ih < 0 || ih >= g.H
                           ? Span{0, 0}
                           : valid_span(s * g.dil_w - g.pad_l, g.stride_w, g.W, g.Wo);
        fn(oh, r, s, v.lo, v.hi);
      }
    }
  }
}

// Forward plane yp of output channel k with weights wk: NaN where a padded tap has a non-finite
// weight.
template <typename T>
void nan_at_padded_weights(const Conv2dGeometry& g, const T* wk, T* yp) {
  if (all_finite(wk, g.R * g.S)) return;
  for_each_tap_span(g, [&](int64_t oh, int64_t r, int64_t s, int64_t lo, int64_t hi) {
    if (std::isfinite(wk[r * g.S + s])) return;
    T* yrow = yp + oh * g.Wo;
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      if (ow < lo || ow >= hi) yrow[ow] = std::numeric_limits<T>::quiet_NaN();
    }
  });
}

// Weight gradient acc (R*S taps) from output-gradient plane dyp: NaN for a tap that pairs a
// non-finite gradient with padding.
template <typename T>
void nan_at_padded_grads(const Conv2dGeometry& g, const T* dyp, T* acc) {
  if (all_finite(dyp, g.Ho * g.Wo)) return;
  for_each_tap_span(g, [&](int64_t oh, int64_t r, int64_t s, int64_t lo, int64_t hi) {
    const T* dyrow = dyp + oh * g.Wo;
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      if ((ow < lo || ow >= hi) && !std::isfinite(dyrow[ow])) {
        acc[r * g.S + s] = std::numeric_limits<T>::quiet_NaN();
      }
    }
  });
}

int64_t plane_grain(int64_t work_per_plane) {
  return std::max<int64_t>(1, kMinTaskFlops / std::max<int64_t>(1, work_per_plane));
}

template <typename T>
void forward_kernel(const Conv2dGeometry& g, const T* x, const T* w, const T* bias, T* y) {
  const int64_t P = g.Ho * g.Wo, HW = g.H * g.W, RS = g.R * g.S;
  at::parallel_for(0, g.N * g.K, plane_grain(P * RS), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.K, k = plane % g.K;
      const T* xp = x + (n * g.C + k / g.Kg) * HW;
      const T* wk = w + k * RS;
      T* yp = y + plane * P;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        T* yrow = yp + oh * g.Wo;
        std::fill(yrow, yrow + g.Wo, bias == nullptr ? T(0) : bias[k]);
        for (int64_t r = 0; r < g.R; ++r) {
          const int64_t ih = oh * g.stride_h - g.pad_t + r * g.dil_h;
          if (ih < 0 || ih >= g.H) continue;
          for (int64_t s = 0; s < g.S; ++s) {
            const int64_t iw0 = s * g.dil_w - g.pad_l;
            const Span v = valid_span(iw0, g.stride_w, g.W, g.Wo);
            axpy(v.hi - v.lo, wk[r * g.S + s], xp + (ih * g.W + iw0 + v.lo * g.stride_w),
                 g.stride_w, yrow + v.lo, 1);
          }
        }
      }
      nan_at_padded_weights(g, wk, yp);
    }
  });
}

template <typename T>
void backward_input_kernel(const Conv2dGeometry& g, const T* dy, const T* w, T* dx) {
  const int64_t P = g.Ho * g.Wo, HW = g.H * g.W, RS = g.R * g.S;
  at::parallel_for(0, g.N * g.C, plane_grain(P * RS * g.Kg), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.C, c = plane % g.C;
      T* dxp = dx + plane * HW;
      std::fill(dxp, dxp + HW, T(0));
      for (int64_t k = c * g.Kg; k < (c + 1) * g.Kg; ++k) {
        const T* dyp = dy + (n * g.K + k) * P;
        const T* wk = w + k * RS;
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          for (int64_t r = 0; r < g.R; ++r) {
            const int64_t ih = oh * g.stride_h - g.pad_t + r * g.dil_h;
            if (ih < 0 || ih >= g.H) continue;
            for (int64_t s = 0; s < g.S; ++s) {
              const int64_t iw0 = s * g.dil_w - g.pad_l;
              const Span v = valid_span(iw0, g.stride_w, g.W, g.Wo);
              axpy(v.hi - v.lo, wk[r * g.S + s], dyp + oh * g.Wo + v.lo, 1,
                   dxp + (ih * g.W + iw0 + v.lo * g.stride_w), g.stride_w);
            }
          }
        }
      }
    }
  });
}

template <typename T>
void backward_weight_kernel(const Conv2dGeometry& g, const T* dy, const T* x, T* dw) {
  const int64_t P = g.Ho * g.Wo, HW = g.H * g.W, RS = g.R * g.S;
  at::parallel_for(0, g.K, plane_grain(g.N * P * RS), [&](int64_t begin, int64_t end) {
    std::vector<T> acc(RS);
    for (int64_t k = begin; k < end; ++k) {
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t n = 0; n < g.N; ++n) {
        const T* xp = x + (n * g.C + k / g.Kg) * HW;
        const T* dyp = dy + (n * g.K + k) * P;
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          for (int64_t r = 0; r < g.R; ++r) {
            const int64_t ih = oh * g.stride_h - g.pad_t + r * g.dil_h;
            if (ih < 0 || ih >= g.H) continue;
            for (int64_t s = 0; s < g.S; ++s) {
              const int64_t iw0 = s * g.dil_w - g.pad_l;
              const Span v = valid_span(iw0, g.stride_w, g.W, g.Wo);
              acc[r * g.S + s] += dot(v.hi - v.lo, dyp + oh * g.Wo + v.lo,
                                      xp + (ih * g.W + iw0 + v.lo * g.stride_w), g.stride_w);
            }
          }
        }
        nan_at_padded_grads(g, dyp, acc.data());
      }
      std::copy(acc.begin(), acc.end(), dw + k * RS);
    }
  });
}

}  // namespace

void direct_forward(const Conv2dGeometry& g, const at::Tensor& x, const at::Tensor& w,
                    const at::Tensor& bias, at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dlext::conv2d", [&] {
    forward_kernel<scalar_t>(g, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                             bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                             y.mutable_data_ptr<scalar_t>());
  });
}

void direct_backward_input(const Conv2dGeometry& g, const at::Tensor& dy, const at::Tensor& w,
                           at::Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "dlext::conv2d_backward", [&] {
    backward_input_kernel<scalar_t>(g, dy.const_data_ptr<scalar_t>(),
                                    w.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>());
  });
}

void direct_backward_weight(const Conv2dGeometry& g, const at::Tensor& dy, const at::Tensor& x,
                            at::Tensor& dw) {
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "dlext::conv2d_backward", [&] {
    backward_weight_kernel<scalar_t>(g, dy.const_data_ptr<scalar_t>(),
                                     x.const_data_ptr<scalar_t>(), dw.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace conv2d_cpu
}  // namespace dlext
