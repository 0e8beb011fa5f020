// BatchNorm on CUDA: the dlext::batch_norm* operators (schemas and their contracts in
// csrc/dlext.cpp) over the kernels of batch_norm_cuda_forward.cu and _backward.cu.
//
// Each operator checks its arguments exactly as the CPU operator does (batch_norm_common.h, so
// both raise the same errors, device mismatches included), brings the input into torch's suggested
// memory format (a no-op for contiguous and channels_last inputs), allocates its outputs in that
// format, and runs the kernels on the input's device (the checks put every tensor there; the
// dispatcher sent the call here because one of them is on CUDA) and its current stream. The
// formulas, dtypes and edge cases (no values, a single value, var == eps == 0) are the CPU
// operators'.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "batch_norm/batch_norm_common.h"
#include "batch_norm/batch_norm_cuda.h"
#include "common/outputs.h"

namespace dlext {
namespace {

using bn_cuda::Layout;
using OptTensor = std::optional<at::Tensor>;

// The input dense in its memory format, and how the kernels see it.
struct DenseInput {
  at::Tensor x;
  at::MemoryFormat format;
  Layout g;
};

DenseInput dense_input(const at::Tensor& input) {
  const at::MemoryFormat format = bn_memory_format(input);
  at::Tensor x = input.contiguous(format);
  int64_t L = 1;
  for (int64_t d = 2; d < x.dim(); ++d) L *= x.size(d);
  const bool rows = format != at::MemoryFormat::Contiguous || L == 1;
  return {x, format, Layout{x.size(0), x.size(1), L, rows}};
}

at::Tensor new_per_channel(const at::Tensor& input, at::ScalarType dtype) {
  return new_empty({input.size(1)}, input.options().dtype(dtype));
}

// ------------------------------------------------------------------------------ primitives

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  constexpr const char* op = "dlext::batch_norm_stats";
  check_bn_input(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const DenseInput in = dense_input(input);
  const at::ScalarType acc = bn_acc_dtype(input.scalar_type());
  at::Tensor mean = new_per_channel(input, acc);
  at::Tensor var = new_per_channel(input, acc);
  bn_cuda::stats(in.x, in.g, mean, var);
  return {mean, var};
}

at::Tensor batch_norm_elemt_cuda(const at::Tensor& input, const OptTensor& weight,
                                 const OptTensor& bias, const at::Tensor& mean,
                                 const at::Tensor& invstd) {
  constexpr const char* op = "dlext::batch_norm_elemt";
  check_bn_elemt_args(input, weight, bias, mean, invstd, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const DenseInput in = dense_input(input);
  at::Tensor out = new_empty(input.sizes(), input.options(), in.format);
  if (input.numel() == 0) return out;
  bn_cuda::elemt(in.x, in.g, weight, bias, mean, invstd, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const OptTensor& weight, std::array<bool, 3> output_mask) {
  constexpr const char* op = "dlext::batch_norm_backward_reduce";
  check_bn_backward_reduce_args(grad_output, input, mean, invstd, weight, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::ScalarType acc = bn_acc_dtype(input.scalar_type());
  const at::ScalarType pgrad = bn_param_grad_dtype(input, weight);
  at::Tensor sum_dy, sum_dy_xmu, grad_weight, grad_bias;
  if (output_mask[0]) {
    sum_dy = new_per_channel(input, acc);
    sum_dy_xmu = new_per_channel(input, acc);
  }
  if (output_mask[1]) grad_weight = new_per_channel(input, pgrad);
  if (output_mask[2]) grad_bias = new_per_channel(input, pgrad);
  if (!(output_mask[0] || output_mask[1] || output_mask[2]) || input.size(1) == 0) {
    return {sum_dy, sum_dy_xmu, grad_weight, grad_bias};
  }
  const DenseInput in = dense_input(input);
  const at::Tensor dy = grad_output.contiguous(in.format);
  bn_cuda::backward_reduce(dy, in.x, in.g, mean, invstd, sum_dy, sum_dy_xmu, grad_weight,
                           grad_bias);
  return {sum_dy, sum_dy_xmu, grad_weight, grad_bias};
}

at::Tensor batch_norm_backward_elemt_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                          const at::Tensor& mean, const at::Tensor& invstd,
                                          const OptTensor& weight, const at::Tensor& sum_dy,
                                          const at::Tensor& sum_dy_xmu, int64_t count) {
  constexpr const char* op = "dlext::batch_norm_backward_elemt";
  check_bn_backward_elemt_args(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count,
                               op);
  const c10::cuda::CUDAGuard guard(input.device());
  const DenseInput in = dense_input(input);
  at::Tensor grad_input = new_empty(input.sizes(), input.options(), in.format);
  if (input.numel() == 0) return grad_input;
  const at::Tensor dy = grad_output.contiguous(in.format);
  bn_cuda::backward_elemt(dy, in.x, in.g, mean, invstd, weight, sum_dy, sum_dy_xmu, count,
                          grad_input);
  return grad_input;
}

// ------------------------------------------------------------------------ fused single-process

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cuda(
    const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
    double eps) {
  constexpr const char* op = "dlext::batch_norm";
  check_batch_norm_args(input, weight, bias, running_mean, running_var, training, op);
  const c10::cuda::CUDAGuard guard(input.device());

  const DenseInput in = dense_input(input);
  const at::ScalarType acc = bn_acc_dtype(input.scalar_type());
  at::Tensor out = new_empty(input.sizes(), input.options(), in.format);
  at::Tensor save_mean = new_per_channel(input, acc);
  at::Tensor save_invstd = new_per_channel(input, acc);
  if (in.g.C == 0) return {out, save_mean, save_invstd};
  if (training) {
    bn_cuda::forward_train(in.x, in.g, weight, bias, running_mean, running_var, momentum, eps, out,
                           save_mean, save_invstd);
  } else if (!bn_defined(running_mean)) {  // an empty input (checked): as the CPU operator
    save_mean.zero_();
    save_invstd.fill_(1.0 / std::sqrt(1.0 + eps));
  } else {
    bn_cuda::forward_eval(in.x, in.g, weight, bias, *running_mean, *running_var, eps, out,
                          save_mean, save_invstd);
  }
  return {out, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const OptTensor& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "dlext::batch_norm_backward";
  check_bn_backward_args(grad_output, input, weight, save_mean, save_invstd, op);
  const c10::cuda::CUDAGuard guard(input.device());

  const DenseInput in = dense_input(input);
  const at::ScalarType pgrad = bn_param_grad_dtype(input, weight);
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = new_empty(input.sizes(), input.options(), in.format);
  if (output_mask[1]) grad_weight = new_per_channel(input, pgrad);
  if (output_mask[2]) grad_bias = new_per_channel(input, pgrad);
  if (in.g.C == 0 || !(output_mask[0] || output_mask[1] || output_mask[2])) {
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor dy = grad_output.contiguous(in.format);
  bn_cuda::backward(dy, in.x, in.g, weight, save_mean, save_invstd, training, grad_input,
                    grad_weight, grad_bias);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace dlext

TORCH_LIBRARY_IMPL(dlext, CUDA, m) {
  m.impl("batch_norm_stats", &dlext::batch_norm_stats_cuda);
  m.impl("batch_norm_elemt", &dlext::batch_norm_elemt_cuda);
  m.impl("batch_norm_backward_reduce", &dlext::batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &dlext::batch_norm_backward_elemt_cuda);
  m.impl("batch_norm", &dlext::batch_norm_cuda);
  m.impl("batch_norm_backward", &dlext::batch_norm_backward_cuda);
}
