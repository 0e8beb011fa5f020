// Every dlext operator schema, in one place. Backward passes are operators of their own so that
// autograd, torch.library.opcheck and torch.compile all see them. Kernels are registered per
// backend at the bottom of csrc/<op>/<op>_{cpu.cpp,cuda.cu}; autograd formulas of the functional
// ops are registered from Python (dlext/autograd.py); the mutating ops get the C++ Autograd
// kernel of common/mutable_autograd.h here.
#include <torch/library.h>

#include "common/mutable_autograd.h"

TORCH_LIBRARY(dlext, m) {
  // ReLU. relu_ mutates its input and returns nothing (the Python wrapper returns the input), so
  // torch.compile can functionalize it.
  m.def("relu(Tensor self) -> Tensor");
  m.def("relu_(Tensor(a!) self) -> ()");
  m.def("relu_backward(Tensor grad_output, Tensor result) -> Tensor");

  // max_pool2d: values and int64 indices (flat h * W + w per plane, torch's convention). An empty
  // stride means stride = kernel_size. The backward sends each gradient to the input element its
  // index names, in a tensor of input_size laid out like indices; it takes the forward's
  // parameters so a kernel can bound the windows that cover an input element.
  m.def(
      "max_pool2d(Tensor self, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode) -> (Tensor, Tensor)");
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor indices, int[] input_size, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) "
      "-> Tensor");

  // BatchNorm. Input (N, C, ...) with 2 or more dims; per-channel tensors are 1-D of C values.
  // weight, bias and the running statistics share one dtype: the input's, or float32 for a
  // bfloat16/float16 input. mean, var, invstd and the sums are in the accumulation dtype (float32
  // for 16-bit and float32 inputs, float64 for float64). Input-shaped results take the input's
  // suggested memory format (channels_last stays channels_last).
  //
  // The primitives, which a synchronised multi-process BatchNorm combines around its
  // all-reduces: per-channel statistics (biased var); y = (x - mean) * invstd * weight + bias;
  // the backward sums sum(dy) and sum(dy * (x - mean)) (with grad_weight = sum_dy_xmu * invstd
  // and grad_bias = sum_dy); and the training-mode input gradient for sums over `count` values
  // per channel (the count over every process).
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def("batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor invstd) -> Tensor");
  m.def("batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean, "
        "Tensor invstd, Tensor? weight, bool[3] output_mask) -> (Tensor sum_dy, "
        "Tensor sum_dy_xmu, Tensor grad_weight, Tensor grad_bias)");
  m.def("batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor mean, "
        "Tensor invstd, Tensor? weight, Tensor sum_dy, Tensor sum_dy_xmu, int count) -> Tensor");
  // The single-process layer. Training normalises with the batch statistics and updates the
  // running statistics in place (unbiased variance); evaluation uses the running statistics.
  // save_mean / save_invstd are the mean and invstd it normalised with, in either mode, so the
  // backward needs neither the running statistics nor eps.
  m.def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, bool training, float momentum, float eps) -> (Tensor out, "
        "Tensor save_mean, Tensor save_invstd)");
  m.def("batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, "
        "Tensor save_mean, Tensor save_invstd, bool training, bool[3] output_mask) -> "
        "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // conv2d. padding is [top, bottom, left, right], so padding='same' with an even kernel needs
  // no padded copy. conv2d_backward returns None for each gradient output_mask does not ask for
  // (grad_input, grad_weight, grad_bias).
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
        "int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
        "int[4] padding, int[2] dilation, int groups, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");

  // Fused softmax + cross-entropy, torch's shapes and semantics: input (C,), (N, C) or
  // (N, C, d1, ..., dK); target int64/uint8 class indices (input's shape without C) or class
  // probabilities (input's shape); reduction: 0 none, 1 mean, 2 sum (torch's enum). Returns the
  // loss (in input's dtype), the log-sum-exp of each (n, d) row in two parts, (2, N, D) =
  // (max, log(sum exp(x - max))) with D the product of the spatial sizes, so that large logits
  // lose no precision, and the mean's denominator, both in the accumulation dtype: all the
  // backward needs besides the inputs. The backward returns the gradients of input, target and
  // weight asked for in output_mask (target and weight only for class probabilities).
  m.def(
      "cross_entropy(Tensor input, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing) -> (Tensor loss, Tensor lse, Tensor total_weight)");
  m.def(
      "cross_entropy_backward(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor total_weight, int reduction, int ignore_index, float label_smoothing, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_target, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(dlext, Autograd, m) {
  m.impl("relu_", torch::CppFunction::makeFromBoxedFunction<&dlext::mutable_op_autograd>());
  m.impl("batch_norm", torch::CppFunction::makeFromBoxedFunction<&dlext::mutable_op_autograd>());
}
