// Argument checks shared by the CPU and CUDA ReLU kernels (the same errors torch raises).
#pragma once

#include <ATen/core/Tensor.h>

#include "common/checks.h"

namespace dlext {

inline void check_relu_dtype(const at::Tensor& t, const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(t.scalar_type() != at::kBool, op,
                              ": Boolean inputs not supported for relu");
  TORCH_CHECK_NOT_IMPLEMENTED(!t.is_complex(), op,
                              ": relu is not supported for complex types, got ", t.scalar_type());
}

inline void check_relu_backward_args(const at::Tensor& grad_output, const at::Tensor& result) {
  const char* op = "dlext::relu_backward";
  check_same_device(result, grad_output, op, "result", "grad_output");
  check_same_shape(result, grad_output, op, "result", "grad_output");
  check_same_dtype(result, grad_output, op, "result", "grad_output");
  check_relu_dtype(result, op);
}

}  // namespace dlext
