// dlext's C++ API for LibTorch users: each function calls the registered operator through the
// dispatcher, so it runs the CPU or CUDA kernel that matches its inputs.
#pragma once

#include <ATen/core/Tensor.h>

namespace dlext {

at::Tensor relu(const at::Tensor& self);
at::Tensor& relu_(at::Tensor& self);
at::Tensor relu_backward(const at::Tensor& grad_output, const at::Tensor& result);

}  // namespace dlext
