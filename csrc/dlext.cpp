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
}
