// Conv2d geometry and argument checks shared by every conv2d kernel (CPU and CUDA): the
// errors torch raises, in torch's words where it has good ones, and the one rule that picks the
// memory format of the outputs (the fake kernels in dlext/autograd.py apply the same rule).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "common/checks.h"

namespace dlext {

// Everything a conv2d kernel needs to know about its problem, validated.
// padding is {top, bottom, left, right}: 'same' with an even kernel pads one more at the bottom
// and right, and needs no padded copy of the input.
struct Conv2dGeometry {
  int64_t N, C, H, W;          // input
  int64_t K, R, S;             // weight: K output channels, an R x S kernel
  int64_t groups, Cg, Kg;      // groups; input and output channels per group
  int64_t stride_h, stride_w;
  int64_t pad_t, pad_b, pad_l, pad_r;
  int64_t dil_h, dil_w;
  int64_t Ho, Wo;              // output
  bool channels_last;          // outputs (and the computation) in NHWC

  // torch's convolution returns no channels at all for an input without channels (its
  // "empty" backend, mirrored by its meta kernel), whatever the weight says; so does dlext.
  int64_t out_channels() const { return C == 0 ? 0 : K; }
  int64_t patch() const { return Cg * R * S; }  // length of one receptive field
  bool empty() const { return N == 0 || C == 0; }
  std::vector<int64_t> output_sizes() const { return {N, out_channels(), Ho, Wo}; }
  at::MemoryFormat memory_format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

inline bool suggests_channels_last(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// The output layout: channels_last when the input or the weight is laid out channels_last (as
// torch's convolution decides), contiguous for an empty input (as torch's empty backend) and for
// float64 on CUDA (torch's cuDNN convolution keeps float64 in NCHW).
inline bool conv2d_uses_channels_last(const at::Tensor& input, const at::Tensor& weight) {
  if (input.size(0) == 0 || input.size(1) == 0) return false;
  if (input.is_cuda() && input.scalar_type() == at::kDouble) return false;
  return suggests_channels_last(input) || suggests_channels_last(weight);
}

inline void check_conv2d_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": expected '", name, "' to be a floating-point tensor (float32, float64, float16 ",
              "or bfloat16), but got ", st);
}

// Validates input / weight / parameters (and bias when given) and returns the geometry. The
// order of the checks is torch's, so the same bad call raises the same complaint first.
inline Conv2dGeometry conv2d_geometry(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups, const char* op) {
  check_same_device(input, weight, op, "input", "weight");
  check_conv2d_dtype(input, op, "input");
  check_same_dtype(input, weight, op, "input", "weight");
  TORCH_CHECK(input.dim() == 4, op, ": expected 'input' to be 4-D (N, C, H, W), but got ",
              input.dim(), "-D input of size ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": expected 'weight' to be 4-D (out_channels, ",
              "in_channels / groups, kH, kW), but got ", weight.dim(), "-D weight of size ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 2, op, ": expected 'stride' to have 2 values, but got ", stride);
  TORCH_CHECK(padding.size() == 4, op, ": expected 'padding' to have 4 values (top, bottom, left, ",
              "right), but got ", padding);
  TORCH_CHECK(dilation.size() == 2, op, ": expected 'dilation' to have 2 values, but got ",
              dilation);
  TORCH_CHECK(groups > 0, op, ": non-positive groups is not supported, but got groups=", groups);
  for (const int64_t s : stride) {
    TORCH_CHECK(s > 0, op, ": non-positive stride is not supported, but got stride=", stride);
  }
  for (const int64_t p : padding) {
    TORCH_CHECK(p >= 0, op, ": negative padding is not supported, but got padding=", padding);
    // Beyond this, padded sizes could overflow int64; no real input comes near it.
    TORCH_CHECK(p <= std::numeric_limits<int64_t>::max() / 4, op, ": padding=", padding,
                " is too large; expected at most ", std::numeric_limits<int64_t>::max() / 4);
  }
  for (const int64_t d : dilation) {
    TORCH_CHECK(d > 0, op, ": non-positive dilation is not supported, but got dilation=",
                dilation);
  }
  const auto ws = weight.sizes();
  TORCH_CHECK(ws[0] >= groups, op, ": Given groups=", groups, ", expected weight to be at least ",
              groups, " at dimension 0, but got weight of size ", ws, " instead");
  TORCH_CHECK(ws[0] % groups == 0, op, ": Given groups=", groups,
              ", expected weight to be divisible by ", groups,
              " at dimension 0, but got weight of size ", ws, " instead");
  TORCH_CHECK(ws[2] > 0 && ws[3] > 0, op, ": expected 'weight' to have a positive kernel size, ",
              "but got weight of size ", ws);
  TORCH_CHECK(input.size(1) == ws[1] * groups, op, ": Given groups=", groups, ", weight of size ",
              ws, ", expected input", input.sizes(), " to have ", ws[1] * groups,
              " channels, but got ", input.size(1), " channels instead");
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    check_same_device(input, b, op, "input", "bias");
    check_same_dtype(input, b, op, "input", "bias");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == ws[0], op, ": Given weight of size ", ws,
                ", expected bias to be 1-dimensional with ", ws[0],
                " elements, but got bias of size ", b.sizes(), " instead");
  }

  Conv2dGeometry g;
  g.N = input.size(0);
  g.C = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.K = ws[0];
  g.R = ws[2];
  g.S = ws[3];
  g.groups = groups;
  g.Cg = ws[1];
  g.Kg = g.K / groups;
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_t = padding[0];
  g.pad_b = padding[1];
  g.pad_l = padding[2];
  g.pad_r = padding[3];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];

  // Dilated kernel extent (saturating instead of overflowing) against the padded input size.
  const int64_t padded_h = g.H + g.pad_t + g.pad_b, padded_w = g.W + g.pad_l + g.pad_r;
  const auto extent = [](int64_t k, int64_t d) {
    constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
    return (k - 1) > (kMax - 1) / d ? kMax : d * (k - 1) + 1;
  };
  const int64_t ext_h = extent(g.R, g.dil_h), ext_w = extent(g.S, g.dil_w);
  TORCH_CHECK(padded_h >= ext_h && padded_w >= ext_w, op,
              ": Calculated padded input size per channel: (", padded_h, " x ", padded_w,
              "). Kernel size: (", ext_h, " x ", ext_w,
              "). Kernel size can't be greater than actual input size");
  TORCH_CHECK(g.N == 0 || g.C == 0 || input.numel() > 0, op,
              ": Only zero batch or zero channel inputs are supported, but got input shape: ",
              input.sizes());
  g.Ho = (padded_h - ext_h) / g.stride_h + 1;
  g.Wo = (padded_w - ext_w) / g.stride_w + 1;
  g.channels_last = conv2d_uses_channels_last(input, weight);
  return g;
}

// conv2d_backward's extra checks: grad_output is what the forward returned, in shape and kind.
inline void check_conv2d_grad_output(const at::Tensor& grad_output, const at::Tensor& input,
                                     const Conv2dGeometry& g, const char* op) {
  check_same_device(input, grad_output, op, "input", "grad_output");
  check_same_dtype(input, grad_output, op, "input", "grad_output");
  const std::vector<int64_t> expected = g.output_sizes();
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), op,
              ": expected 'grad_output' to have the shape of the convolution's output ",
              at::IntArrayRef(expected), ", but got ", grad_output.sizes());
}

}  // namespace dlext
