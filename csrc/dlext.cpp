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

  // Fused softmax + cross-entropy over the (N, C, D) view of the input (D: the spatial
  // dimensions flattened, 1 for (N, C)). target: int64/uint8 class indices (N, D) or class
  // probabilities shaped like input; reduction: 0 none, 1 mean, 2 sum (torch's enum). Returns
  // the loss ((N, D) or a scalar, in input's dtype), the log-sum-exp of each row in two parts,
  // (2, N, D) = (max, log(sum exp(x - max))), so that large logits lose no precision, and the
  // mean's denominator, both in the accumulation dtype: all the backward needs besides the
  // inputs. The backward returns the gradients of input, target and weight asked for in
  // output_mask (target and weight only for class probabilities).
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
