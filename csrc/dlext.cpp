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
}

TORCH_LIBRARY_IMPL(dlext, Autograd, m) {
  m.impl("relu_", torch::CppFunction::makeFromBoxedFunction<&dlext::mutable_op_autograd>());
}
