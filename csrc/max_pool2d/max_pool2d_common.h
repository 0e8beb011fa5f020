// max_pool2d geometry and argument checks, shared by the CPU and CUDA kernels.
//
// Output size, window bounds and every error follow torch's max_pool2d_with_indices (the same
// checks, in the same order, with the same words). Indices are flat per plane (h * W + w) in the
// unpadded input, as torch's. One deliberate difference: a window that holds no input element
// (possible with dilation, e.g. kernel 2, padding 1, dilation 5 on a 4-wide input) gives -inf with
// index -1, where torch reports an index outside the plane that its backward would write through.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "common/dense.h"

namespace dlext {

struct Pool2d {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t batch, channels, in_h, in_w, out_h, out_w;
  bool channels_last;  // input is_channels_last (common/dense.h): output and indices follow it

  // First tap of output row oh inside the input, and one past the last tap (both clamped). The
  // window is empty when begin >= end.
  int64_t h_begin(int64_t oh) const { return first_tap(oh * sh - ph, dh); }
  int64_t h_end(int64_t oh) const { return std::min(oh * sh - ph + (kh - 1) * dh + 1, in_h); }
  int64_t w_begin(int64_t ow) const { return first_tap(ow * sw - pw, dw); }
  int64_t w_end(int64_t ow) const { return std::min(ow * sw - pw + (kw - 1) * dw + 1, in_w); }

 private:
  static int64_t first_tap(int64_t start, int64_t step) {
    return start >= 0 ? start : start + ((-start + step - 1) / step) * step;
  }
};

inline int64_t pool_output_size(int64_t in, int64_t k, int64_t pad, int64_t stride,
                                int64_t dilation, bool ceil_mode) {
  TORCH_CHECK(stride != 0, "stride should not be zero");
  TORCH_CHECK(pad >= 0, "pad must be non-negative, but got pad: ", pad);
  TORCH_CHECK(pad <= ((k - 1) * dilation + 1) / 2,
              "pad should be at most half of effective kernel size, but got pad=", pad,
              ", kernel_size=", k, " and dilation=", dilation);
  const int64_t numer = in + 2 * pad - dilation * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  // floor division (numer may be negative)
  int64_t out = (numer >= 0 ? numer / stride : -((-numer + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) {
    --out;  // the last window would start in the right padding: torch drops it
  }
  return out;
}

// The geometry of pooling an input of `input_size` ([N,] C, H, W), checked as torch checks it.
inline Pool2d max_pool2d_geometry(at::IntArrayRef input_size, bool channels_last,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  bool ceil_mode) {
  TORCH_CHECK(kernel_size.size() == 1 || kernel_size.size() == 2,
              "max_pool2d: kernel_size must either be a single int, or a tuple of two ints");
  TORCH_CHECK(stride.empty() || stride.size() == 1 || stride.size() == 2,
              "max_pool2d: stride must either be omitted, a single int, or a tuple of two ints");
  TORCH_CHECK(padding.size() == 1 || padding.size() == 2,
              "max_pool2d: padding must either be a single int, or a tuple of two ints");
  TORCH_CHECK(dilation.size() == 1 || dilation.size() == 2,
              "max_pool2d: dilation must be either a single int, or a tuple of two ints");
  Pool2d p{};
  p.kh = kernel_size[0];
  p.kw = kernel_size.size() == 1 ? p.kh : kernel_size[1];
  p.sh = stride.empty() ? p.kh : stride[0];
  p.sw = stride.empty() ? p.kw : stride.size() == 1 ? p.sh : stride[1];
  p.ph = padding[0];
  p.pw = padding.size() == 1 ? p.ph : padding[1];
  p.dh = dilation[0];
  p.dw = dilation.size() == 1 ? p.dh : dilation[1];
  // torch narrows these to int; past that the window arithmetic below could overflow int64.
  const std::pair<const char*, int64_t> params[] = {
      {"kernel_size", p.kh}, {"kernel_size", p.kw}, {"stride", p.sh}, {"stride", p.sw},
      {"padding", p.ph},     {"padding", p.pw},     {"dilation", p.dh}, {"dilation", p.dw}};
  for (const auto& [name, v] : params) {
    using limits = std::numeric_limits<int32_t>;
    TORCH_CHECK(v >= limits::min() && v <= limits::max(), "max_pool2d: ", name, " value ", v,
                " cannot be converted to type int without overflow");
  }

  const int64_t dim = static_cast<int64_t>(input_size.size());
  p.channels_last = channels_last;
  TORCH_CHECK(dim == 3 || dim == 4, "non-empty 3D or 4D (batch mode) tensor expected for input");
  p.batch = dim == 4 ? input_size[0] : 1;
  p.channels = input_size[dim - 3];
  p.in_h = input_size[dim - 2];
  p.in_w = input_size[dim - 1];
  p.out_h = pool_output_size(p.in_h, p.kh, p.ph, p.sh, p.dh, ceil_mode);
  p.out_w = pool_output_size(p.in_w, p.kw, p.pw, p.sw, p.dw, ceil_mode);

  TORCH_CHECK(p.kw > 0 && p.kh > 0, "kernel size should be greater than zero, but got kH: ", p.kh,
              " kW: ", p.kw);
  TORCH_CHECK(p.sw > 0 && p.sh > 0, "stride should be greater than zero, but got dH: ", p.sh,
              " dW: ", p.sw);
  TORCH_CHECK(p.dh > 0 && p.dw > 0, "dilation should be greater than zero, but got dilationH: ",
              p.dh, " dilationW: ", p.dw);
  TORCH_CHECK(p.channels != 0 && p.in_h != 0 && p.in_w != 0,
              "Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, "
              "but got:", input_size);
  TORCH_CHECK(p.kw / 2 >= p.pw && p.kh / 2 >= p.ph,
              "pad should be smaller than or equal to half of kernel size, but got padW = ", p.pw,
              ", padH = ", p.ph, ", kW = ", p.kw, ", kH = ", p.kh);
  TORCH_CHECK(p.out_w >= 1 && p.out_h >= 1, "Given input size: (", p.channels, "x", p.in_h, "x",
              p.in_w, "). Calculated output size: (", p.channels, "x", p.out_h, "x", p.out_w,
              "). Output size is too small");
  return p;
}

inline void check_max_pool2d_dtype(const at::Tensor& input) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !at::isComplexType(input.scalar_type()) && input.scalar_type() != at::kBool,
      "\"max_pool2d\" not implemented for '", input.scalar_type(), "'");
}

// Output (and indices) sizes for an input of `input_size`: [N,] C, out_h, out_w.
inline std::vector<int64_t> pool_output_sizes(at::IntArrayRef input_size, const Pool2d& p) {
  std::vector<int64_t> sizes(input_size.begin(), input_size.end());
  sizes[sizes.size() - 2] = p.out_h;
  sizes[sizes.size() - 1] = p.out_w;
  return sizes;
}

// The backward's arguments, and the geometry of the forward they come from.
inline Pool2d check_max_pool2d_backward_args(const at::Tensor& grad_output,
                                             const at::Tensor& indices,
                                             at::IntArrayRef input_size,
                                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                             at::IntArrayRef padding, at::IntArrayRef dilation,
                                             bool ceil_mode) {
  const char* op = "dlext::max_pool2d_backward";
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": expected 'indices' to be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(grad_output.sizes() == indices.sizes(), op,
              ": expected 'grad_output' to have the shape of 'indices' ", indices.sizes(),
              ", but got ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == indices.device(), op,
              ": expected 'grad_output' and 'indices' on the same device, got ",
              grad_output.device(), " and ", indices.device());
  TORCH_CHECK(static_cast<int64_t>(input_size.size()) == indices.dim() &&
                  (indices.dim() == 3 || indices.dim() == 4),
              op, ": expected 'input_size' of ", indices.dim(), " dims (3 or 4), got ",
              input_size);
  for (int64_t d = 0; d < indices.dim() - 2; ++d) {
    TORCH_CHECK(input_size[d] == indices.size(d), op, ": 'input_size' ", input_size,
                " does not match the leading dims of 'indices' ", indices.sizes());
  }
  TORCH_CHECK(at::isFloatingType(grad_output.scalar_type()), op,
              ": expected a floating-point 'grad_output', got ", grad_output.scalar_type());
  const Pool2d p = max_pool2d_geometry(input_size, is_channels_last(indices), kernel_size, stride,
                                       padding, dilation, ceil_mode);
  TORCH_CHECK(indices.size(-2) == p.out_h && indices.size(-1) == p.out_w, op, ": 'indices' ",
              indices.sizes(), " do not match the pooling of 'input_size' ", input_size,
              " (expected ", p.out_h, "x", p.out_w, " outputs per plane)");
  return p;
}

}  // namespace dlext
