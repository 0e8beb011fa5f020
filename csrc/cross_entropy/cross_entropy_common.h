// The fused softmax + cross-entropy operators, shared by the CPU and CUDA kernels: argument
// checks (the errors torch raises), the label-smoothing coefficients, and the layout contract of
// the gradients (dlext/autograd.py's fake kernels mirror it).
//
// The operators see the input as (N, C, D): batch, classes, and the product of the spatial
// dimensions (dlext.functional views (C,), (N, C) and (N, C, d1..dK) that way). The target holds
// class indices, int64 or uint8 of shape (N, D), or class probabilities of the input's shape and
// dtype. Per row (n, d), with p = softmax over the C classes, w the class weights (1 without) and
// eps the label smoothing:
//   class indices:  loss = (1 - eps) * w[t] * -log p[t] + eps / C * sum_c w[c] * -log p[c]
//   probabilities:  loss = sum_c w[c] * ((1 - eps) * y[c] + eps / C) * -log p[c]
// Rows whose index is ignore_index count for nothing. 'mean' divides the sum by the weights of the
// counted targets (indices) or by N * D (probabilities), as torch does.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>

#include "common/checks.h"

namespace dlext {

enum class CETarget { kIndices, kProbabilities };

inline const char* reduction_name(int64_t reduction) {
  switch (reduction) {
    case at::Reduction::None: return "none";
    case at::Reduction::Mean: return "mean";
    default: return "sum";
  }
}

// loss = a * nll + b * smooth for class indices, target mixed as a * y + b for probabilities.
// torch applies smoothing only when label_smoothing > 0 (a negative or NaN value means none).
struct CESmoothing {
  bool on;
  double a;  // 1 - eps
  double b;  // eps / C (infinite when C == 0, as in torch)
};

inline CESmoothing ce_smoothing(double label_smoothing, int64_t C) {
  if (!(label_smoothing > 0.0)) return {false, 1.0, 0.0};
  return {true, 1.0 - label_smoothing, label_smoothing / static_cast<double>(C)};
}

// How a kernel walks the (N, C, D) input. kPlanes: each (n, c) plane of D positions is contiguous
// (NCHW images), so positions fill the vector lanes; kRows: each (n, d) row of C classes is
// contiguous ((N, C) logits, channels_last images), so classes fill the lanes; kNone: neither
// (the input is first copied to class-contiguous rows). Class indices must fit the int32 lanes
// the plane kernels compare them in.
enum class CELayout { kRows, kPlanes, kNone };

inline CELayout ce_layout(const at::Tensor& x) {
  const int64_t C = x.size(1), D = x.size(2);
  if (D > 1 && x.stride(2) == 1 && C <= std::numeric_limits<int32_t>::max()) {
    return CELayout::kPlanes;
  }
  if (C <= 1 || x.stride(1) == 1) return CELayout::kRows;
  return CELayout::kNone;
}

// The layout of grad_input (and grad_target): the input's own strides when it is dense and a
// kernel walks it as it is; otherwise class-contiguous rows, strides (C * D, 1, C). Empty inputs
// get contiguous gradients.
inline bool ce_grad_keeps_input_layout(const at::Tensor& x) {
  return x.numel() > 0 && ce_layout(x) != CELayout::kNone && x.is_non_overlapping_and_dense();
}

inline void check_cross_entropy_common(const at::Tensor& input, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight, int64_t reduction,
                                       double label_smoothing, const char* op) {
  check_defined(input, op, "input");
  check_defined(target, op, "target");
  const auto dtype = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": not implemented for '", dtype, "'; expected a float32, float64, float16 or bfloat16 'input'");
  TORCH_CHECK(input.dim() == 3, op, ": expected 'input' to be 3-D (N, C, D), but got ",
              input.dim(), "-D ", input.sizes());
  check_same_device(input, target, op, "input", "target");
  TORCH_CHECK(reduction == at::Reduction::None || reduction == at::Reduction::Mean ||
                  reduction == at::Reduction::Sum,
              op, ": expected 'reduction' to be 0 (none), 1 (mean) or 2 (sum), but got ", reduction);
  TORCH_CHECK(!(label_smoothing > 1.0), op,
              ": label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    check_same_device(input, w, op, "input", "weight");
    TORCH_CHECK(w.dim() == 1 && w.numel() == input.size(1), op,
                ": weight tensor should be defined either for all ", input.size(1),
                " classes or no classes but got weight tensor of shape: ", w.sizes());
    check_same_dtype(input, w, op, "input", "weight");
  }
}

// Checks the forward operator's arguments; returns what the target holds.
inline CETarget check_cross_entropy_args(const at::Tensor& input, const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight,
                                         int64_t reduction, int64_t ignore_index,
                                         double label_smoothing, const char* op) {
  check_cross_entropy_common(input, target, weight, reduction, label_smoothing, op);
  if (at::isFloatingType(target.scalar_type())) {
    check_same_dtype(input, target, op, "input", "target");
    check_same_shape(input, target, op, "input", "target");
    TORCH_CHECK(ignore_index < 0, op, ": ignore_index is not supported for floating point target",
                " (class probabilities), but got ignore_index=", ignore_index);
    return CETarget::kProbabilities;
  }
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte, op,
              ": expected target dtype to be Long or Byte (class indices) or the input's floating "
              "dtype (class probabilities), but got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 2 && target.size(0) == input.size(0) &&
                  target.size(1) == input.size(2),
              op, ": expected class-index 'target' of shape (N, D) = [", input.size(0), ", ",
              input.size(2), "] for 'input' of shape ", input.sizes(), ", but got ", target.sizes());
  return CETarget::kIndices;
}

// Checks the backward operator's arguments beyond the forward's; returns what the target holds.
inline CETarget check_cross_entropy_backward_args(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& total_weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing,
    std::array<bool, 3> output_mask, const char* op) {
  const CETarget kind = check_cross_entropy_args(input, target, weight, reduction, ignore_index,
                                                 label_smoothing, op);
  check_defined(grad_output, op, "grad_output");
  check_defined(lse, op, "lse");
  check_defined(total_weight, op, "total_weight");
  check_same_device(input, grad_output, op, "input", "grad_output");
  check_same_device(input, lse, op, "input", "lse");
  check_same_device(input, total_weight, op, "input", "total_weight");
  check_same_dtype(input, grad_output, op, "input", "grad_output");
  const auto acc = at::toOpMathType(input.scalar_type());
  const int64_t N = input.size(0), D = input.size(2);
  TORCH_CHECK(lse.scalar_type() == acc && lse.dim() == 3 && lse.size(0) == 2 &&
                  lse.size(1) == N && lse.size(2) == D,
              op, ": expected 'lse' to be the (2, N, D) = [2, ", N, ", ", D, "] ", acc,
              " tensor of the forward, but got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(total_weight.scalar_type() == acc && total_weight.numel() == 1, op,
              ": expected 'total_weight' to be the single-element ", acc,
              " tensor of the forward, but got ", total_weight.scalar_type(), " ",
              total_weight.sizes());
  if (reduction == at::Reduction::None) {
    TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == N && grad_output.size(1) == D, op,
                ": expected 'grad_output' of shape (N, D) = [", N, ", ", D,
                "] for reduction 'none', but got ", grad_output.sizes());
  } else {
    TORCH_CHECK(grad_output.dim() <= 1 && grad_output.numel() == 1, op,
                ": expected a single element 'grad_output' for reduction '",
                reduction_name(reduction), "', but got ", grad_output.sizes());
  }
  TORCH_CHECK(kind == CETarget::kProbabilities || !(output_mask[1] || output_mask[2]), op,
              ": class-index targets have no gradient, and the loss is not differentiable with "
              "respect to 'weight' for them (as torch's nll_loss); only class-probability targets "
              "give gradients for 'target' and 'weight'");
  return kind;
}

}  // namespace dlext
