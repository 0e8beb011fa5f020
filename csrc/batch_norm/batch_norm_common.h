// Argument checks and output shapes shared by the CPU and CUDA BatchNorm kernels: the same errors
// torch raises, in torch's words where it has clear ones, naming the argument otherwise.
//
// The dtype rules are torch's CPU rules. The input is float32, float64, bfloat16 or float16. The
// per-channel parameters (weight, bias, running_mean, running_var) all share one dtype: the
// input's, or float32 for a bfloat16/float16 input ("mixed dtype"). Statistics (mean, var,
// invstd) and the reductions of the backward pass are kept in the accumulation dtype,
// at::opmath_type of the input: float for bfloat16/float16/float32, double for float64.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

#include <optional>

#include "common/checks.h"

namespace dlext {

inline bool bn_is_reduced_float(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

// The dtype of mean, var, invstd and the backward sums for an input of dtype `t`.
inline at::ScalarType bn_acc_dtype(at::ScalarType t) {
  return bn_is_reduced_float(t) ? at::kFloat : t;
}

inline void check_bn_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble ||
          bn_is_reduced_float(input.scalar_type()),
      op, ": \"batch_norm\" not implemented for '", input.scalar_type(),
      "' (expected 'input' to be float32, float64, bfloat16 or float16)");
  TORCH_CHECK(input.dim() >= 2, op,
              ": expected 'input' to have at least 2 dimensions (N, C, ...), but got a ",
              input.dim(), "-D tensor of shape ", input.sizes());
}

// A per-channel tensor: defined, on the input's device, 1-D with one element per channel.
inline void check_bn_per_channel(const at::Tensor& input, const at::Tensor& t, const char* op,
                                 const char* name) {
  check_defined(t, op, name);
  check_same_device(input, t, op, "input", name);
  TORCH_CHECK(t.numel() == input.size(1), op, ": ", name, " should contain ", input.size(1),
              " elements not ", t.numel(), " (one per channel, dim 1 of 'input')");
  TORCH_CHECK(t.dim() == 1, op, ": expected '", name, "' to be 1-D (one value per channel), ",
              "but got shape ", t.sizes());
}

// Statistics handed back to a kernel (mean, invstd, sum_dy, ...): per channel, accumulation dtype.
inline void check_bn_stat(const at::Tensor& input, const at::Tensor& t, const char* op,
                          const char* name) {
  check_bn_per_channel(input, t, op, name);
  const at::ScalarType acc = bn_acc_dtype(input.scalar_type());
  TORCH_CHECK(t.scalar_type() == acc, op, ": expected '", name, "' to have dtype ", acc,
              " (the accumulation dtype of a ", input.scalar_type(), " input), but got ",
              t.scalar_type());
}

// Per-channel parameters (weight, bias, running stats): torch's mixed-dtype rule. `param_dtype`
// remembers the dtype of the first defined one, which every later one must share.
inline void check_bn_param(const at::Tensor& input, const std::optional<at::Tensor>& p,
                           const char* op, const char* name,
                           std::optional<at::ScalarType>& param_dtype) {
  if (!p.has_value() || !p->defined()) return;
  check_bn_per_channel(input, *p, op, name);
  const at::ScalarType in = input.scalar_type();
  const at::ScalarType t = p->scalar_type();
  if (param_dtype.has_value()) {
    TORCH_CHECK(t == *param_dtype, op, ": expected '", name,
                "' to have the dtype of the other per-channel parameters (", *param_dtype,
                "), but got ", t);
    return;
  }
  TORCH_CHECK(t == in || (bn_is_reduced_float(in) && t == at::kFloat), op, ": expected '", name,
              "' to have dtype ", in,
              bn_is_reduced_float(in) ? " or Float (float32 parameters of a 16-bit input)" : "",
              " like 'input', but got ", t);
  param_dtype = t;
}

inline bool bn_defined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// The dtype of grad_weight / grad_bias: the weight's when there is one, else the accumulation
// dtype (the gradient of an implicit weight of ones, kept at full precision).
inline at::ScalarType bn_param_grad_dtype(const at::Tensor& input,
                                          const std::optional<at::Tensor>& weight) {
  return bn_defined(weight) ? weight->scalar_type() : bn_acc_dtype(input.scalar_type());
}

// The memory format of every input-shaped result (torch's: suggest_memory_format, i.e.
// channels_last for a 4-D/5-D input laid out like channels_last, contiguous otherwise).
inline at::MemoryFormat bn_memory_format(const at::Tensor& input) {
  return input.suggest_memory_format();
}

inline void check_bn_grad_output(const at::Tensor& input, const at::Tensor& grad_output,
                                 const char* op) {
  check_same_device(input, grad_output, op, "input", "grad_output");
  check_same_shape(input, grad_output, op, "input", "grad_output");
  check_same_dtype(input, grad_output, op, "input", "grad_output");
}

// The argument checks of each operator, shared by the CPU and CUDA implementations (same checks,
// same order, so both backends raise the same error).
inline void check_bn_elemt_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                const at::Tensor& invstd, const char* op) {
  check_bn_input(input, op);
  std::optional<at::ScalarType> param_dtype;
  check_bn_param(input, weight, op, "weight", param_dtype);
  check_bn_param(input, bias, op, "bias", param_dtype);
  check_bn_stat(input, mean, op, "mean");
  check_bn_stat(input, invstd, op, "invstd");
}

inline void check_bn_backward_reduce_args(const at::Tensor& grad_output, const at::Tensor& input,
                                          const at::Tensor& mean, const at::Tensor& invstd,
                                          const std::optional<at::Tensor>& weight,
                                          const char* op) {
  check_bn_input(input, op);
  check_bn_grad_output(input, grad_output, op);
  check_bn_stat(input, mean, op, "mean");
  check_bn_stat(input, invstd, op, "invstd");
  std::optional<at::ScalarType> param_dtype;
  check_bn_param(input, weight, op, "weight", param_dtype);
}

// count: the values per channel over every process, at least this input's N * spatial size.
inline void check_bn_backward_elemt_args(const at::Tensor& grad_output, const at::Tensor& input,
                                         const at::Tensor& mean, const at::Tensor& invstd,
                                         const std::optional<at::Tensor>& weight,
                                         const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                         int64_t count, const char* op) {
  check_bn_backward_reduce_args(grad_output, input, mean, invstd, weight, op);
  check_bn_stat(input, sum_dy, op, "sum_dy");
  check_bn_stat(input, sum_dy_xmu, op, "sum_dy_xmu");
  int64_t per_channel = input.size(0);
  for (int64_t d = 2; d < input.dim(); ++d) per_channel *= input.size(d);
  TORCH_CHECK(count >= per_channel && (count > 0 || per_channel == 0), op,
              ": expected 'count' (values per channel over every process) to be at least the ",
              "input's ", per_channel, " values per channel, but got ", count);
}

inline void check_bn_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                   const std::optional<at::Tensor>& weight,
                                   const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                   const char* op) {
  check_bn_input(input, op);
  check_bn_grad_output(input, grad_output, op);
  std::optional<at::ScalarType> param_dtype;
  check_bn_param(input, weight, op, "weight", param_dtype);
  check_bn_stat(input, save_mean, op, "save_mean");
  check_bn_stat(input, save_invstd, op, "save_invstd");
}

// The arguments of the fused dlext::batch_norm, checked as torch checks native_batch_norm's.
inline void check_batch_norm_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var, bool training,
                                  const char* op) {
  check_bn_input(input, op);
  if (!training && input.numel() > 0) {  // torch returns an empty input unchecked
    TORCH_CHECK(bn_defined(running_mean), op, ": running_mean must be defined in evaluation mode");
    TORCH_CHECK(bn_defined(running_var), op, ": running_var must be defined in evaluation mode");
  }
  TORCH_CHECK_VALUE(bn_defined(running_mean) == bn_defined(running_var), op,
                    ": running_mean and running_var must either both be None or neither be None");
  std::optional<at::ScalarType> param_dtype;
  check_bn_param(input, running_mean, op, "running_mean", param_dtype);
  check_bn_param(input, running_var, op, "running_var", param_dtype);
  check_bn_param(input, weight, op, "weight", param_dtype);
  check_bn_param(input, bias, op, "bias", param_dtype);
}

}  // namespace dlext
