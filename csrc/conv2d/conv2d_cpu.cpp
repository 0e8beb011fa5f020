// conv2d on the CPU: the dlext::conv2d and dlext::conv2d_backward kernels. Each checks its
// arguments (conv2d_common.h), picks an algorithm and a layout to compute in (choose), lays the
// operands out for it and runs it:
//   one input channel and at most 3 output channels per group (depthwise convolutions and small
//       channel multipliers, where a GEMM's dimensions would be tiny): direct loops on NCHW
//       planes (conv2d_direct_cpu.cpp);
//   anything else: patch tiles times weights with a GEMM (conv2d_gemm_cpu.cpp), in NCHW or NHWC.
// Operands in another layout than the one computed in are converted once in and once out, which
// is cheap next to a patch matrix that holds every input pixel R*S times. float and double
// compute in their own type; half and bfloat16 are converted to float on the way in and rounded
// once on the way out, so every sum accumulates in float.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/outputs.h"
#include "conv2d/conv2d_common.h"
#include "conv2d/conv2d_kernels_cpu.h"

namespace dlext {
namespace {

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}

// t as a dense tensor of the given dtype and layout; t itself when it already is one.
at::Tensor dense_as(const at::Tensor& t, at::ScalarType dtype, at::MemoryFormat format) {
  if (t.scalar_type() == dtype) return t.contiguous(format);
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(dtype).memory_format(format));
  out.copy_(t);
  return out;
}

// Where a kernel writes `result`: result itself when it has the kernel's dtype and layout, else
// a scratch tensor copied into result afterwards (copy_back).
at::Tensor workspace_for(const at::Tensor& result, at::ScalarType dtype, at::MemoryFormat format) {
  if (!result.defined()) return result;
  if (result.scalar_type() == dtype && result.is_contiguous(format)) return result;
  return at::empty(result.sizes(), result.options().dtype(dtype).memory_format(format));
}

void copy_back(at::Tensor& result, const at::Tensor& work) {
  if (result.defined() && !work.is_same(result)) result.copy_(work);
}

// Output rows shorter than this make NCHW patch rows too short to copy efficiently; NHWC patch
// rows copy runs of S*C elements instead (LeNet's 10-pixel rows: about twice as fast).
constexpr int64_t kShortRow = 16;

struct Algorithm {
  bool direct;
  at::MemoryFormat format;  // the layout computed in
};

Algorithm choose(const Conv2dGeometry& g) {
  if (g.Cg == 1 && g.Kg < 4) return {true, at::MemoryFormat::Contiguous};
  const bool pointwise = g.R == 1 && g.S == 1 && g.stride_h == 1 && g.stride_w == 1 &&
                         g.pad_t + g.pad_b + g.pad_l + g.pad_r == 0;
  const bool nhwc = g.channels_last || (!pointwise && g.Wo < kShortRow);
  return {false, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous};
}

at::Tensor conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Conv2dGeometry g =
      conv2d_geometry(input, weight, bias, stride, padding, dilation, groups, "dlext::conv2d");
  at::Tensor out = new_empty(g.output_sizes(), input.options(), g.memory_format());
  if (out.numel() == 0) return out;

  const at::ScalarType dtype = compute_type(input.scalar_type());
  const auto [direct, format] = choose(g);
  Conv2dGeometry gc = g;
  gc.channels_last = format == at::MemoryFormat::ChannelsLast;  // the layout computed in
  const at::Tensor x = dense_as(input, dtype, format);
  const at::Tensor w = dense_as(weight, dtype, format);
  const at::Tensor b = bias.has_value() && bias->defined()
                           ? dense_as(*bias, dtype, at::MemoryFormat::Contiguous)
                           : at::Tensor();
  at::Tensor y = workspace_for(out, dtype, format);
  if (direct) {
    conv2d_cpu::direct_forward(gc, x, w, b, y);
  } else {
    conv2d_cpu::gemm_forward(gc, x, w, b, y);
  }
  copy_back(out, y);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const char* op = "dlext::conv2d_backward";
  Conv2dGeometry g =
      conv2d_geometry(input, weight, std::nullopt, stride, padding, dilation, groups, op);
  check_conv2d_grad_output(grad_output, input, g, op);

  // Gradients in the layout of the forward's output; only those asked for.
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = new_empty(input.sizes(), input.options(), g.memory_format());
  if (output_mask[1]) grad_weight = new_empty(weight.sizes(), weight.options(), g.memory_format());
  if (output_mask[2]) grad_bias = new_empty({g.K}, weight.options());
  if (g.empty()) {  // no products at all: grad_input has no elements, the others are zero
    if (grad_weight.defined()) grad_weight.zero_();
    if (grad_bias.defined()) grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }

  const at::ScalarType dtype = compute_type(input.scalar_type());
  const auto [direct, format] = choose(g);
  g.channels_last = format == at::MemoryFormat::ChannelsLast;  // the layout computed in
  const at::Tensor dy = dense_as(grad_output, dtype, format);

  if (grad_bias.defined()) {
    at::Tensor db = workspace_for(grad_bias, dtype, at::MemoryFormat::Contiguous);
    conv2d_cpu::bias_backward(g, dy, db);
    copy_back(grad_bias, db);
  }
  if (!grad_input.defined() && !grad_weight.defined()) return {grad_input, grad_weight, grad_bias};

  const at::Tensor x = grad_weight.defined() ? dense_as(input, dtype, format) : at::Tensor();
  const at::Tensor w = grad_input.defined() ? dense_as(weight, dtype, format) : at::Tensor();
  at::Tensor dx = workspace_for(grad_input, dtype, format);
  at::Tensor dw = workspace_for(grad_weight, dtype, format);
  if (direct) {
    if (dx.defined()) conv2d_cpu::direct_backward_input(g, dy, w, dx);
    if (dw.defined()) conv2d_cpu::direct_backward_weight(g, dy, x, dw);
  } else {
    conv2d_cpu::gemm_backward(g, dy, x, w, dx, dw);
  }
  copy_back(grad_input, dx);
  copy_back(grad_weight, dw);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace dlext

TORCH_LIBRARY_IMPL(dlext, CPU, m) {
  m.impl("conv2d", &dlext::conv2d_forward_cpu);
  m.impl("conv2d_backward", &dlext::conv2d_backward_cpu);
}
