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
}

TORCH_LIBRARY_IMPL(dlext, Autograd, m) {
  m.impl("relu_", torch::CppFunction::makeFromBoxedFunction<&dlext::mutable_op_autograd>());
}
