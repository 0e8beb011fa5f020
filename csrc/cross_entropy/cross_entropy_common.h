// The fused softmax + cross-entropy operators, shared by the CPU and CUDA kernels: torch's shape
// rules and argument checks (its errors, in its words and exception types), the label-smoothing
// coefficients, and the layout contract of the gradients (dlext/autograd.py's fake kernels mirror
// it).
//
// The operators take torch's shapes: input (C,), (N, C) or (N, C, d1, ..., dK); target class
// indices (int64 or uint8) shaped like input without C, or class probabilities shaped like input.
// The kernels see the input as (N, C, D), D the product of the spatial dimensions (1 without), and
// the target as (N, D) or (N, C, D). Per row (n, d), with p = softmax over the C classes, w the
// class weights (1 without) and eps the label smoothing:
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
#include <vector>

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

// What the arguments describe: the target's kind, the (N, C, D) view and the shape of the loss
// for reduction 'none' (the input's shape without C).
struct CEProblem {
  CETarget kind;
  int64_t N, C, D;
  std::vector<int64_t> loss_shape;
};

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

// The layout of grad_input (and grad_target), for the (N, C, D) view x of the input: x's own
// strides when it is dense and a kernel walks it as it is; otherwise class-contiguous rows,
// strides (C * D, 1, C). Empty inputs get contiguous gradients. Either is then viewed back to the
// input's shape.
inline bool ce_grad_keeps_input_layout(const at::Tensor& x) {
  return x.numel() > 0 && ce_layout(x) != CELayout::kNone && x.is_non_overlapping_and_dense();
}

// Class indices as the kernels read them: int64 of shape (N, D) (uint8 targets are widened).
inline at::Tensor index_targets(const at::Tensor& target, int64_t N, int64_t D) {
  const at::Tensor t = target.reshape({N, D});
  return t.scalar_type() == at::kLong ? t : t.to(at::kLong);
}

// The class weights as the kernels read them: C contiguous values of the accumulation dtype.
inline at::Tensor weights_in_acc(const std::optional<at::Tensor>& weight,
                                 const at::Tensor& input) {
  if (!weight.has_value() || !weight->defined()) return {};
  return weight->to(at::toOpMathType(input.scalar_type())).contiguous();
}

// torch's shape and dtype rules for class-index targets (nll_loss_nd's), in its words.
inline void check_class_index_target(const at::Tensor& input, const at::Tensor& target) {
  TORCH_CHECK_VALUE(input.dim() >= 1, "Expected 1 or more dimensions (got ", input.dim(), ")");
  TORCH_CHECK_VALUE(input.dim() == 1 || (target.dim() >= 1 && input.size(0) == target.size(0)),
                    "Expected input batch_size (", input.size(0),
                    ") to match target batch_size (", target.dim() >= 1 ? target.size(0) : 0,
                    ").");
  TORCH_CHECK(input.dim() > 2 || target.dim() <= 1,
              "0D or 1D target tensor expected, multi-target not supported");
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte,
              "expected target dtype to be Long or Byte, but got ", target.scalar_type());
  TORCH_CHECK_VALUE(input.dim() != 1 || target.numel() == 1,
                    "For 1D input, 1D target must have size 1, but got target size: ",
                    target.numel());
  TORCH_CHECK(input.dim() != 4 || target.dim() == 3,
              "only batches of spatial targets supported (3D tensors) but got targets of "
              "dimension: ", target.dim());
  if (input.dim() >= 3) {
    std::vector<int64_t> expected{input.size(0)};
    expected.insert(expected.end(), input.sizes().begin() + 2, input.sizes().end());
    TORCH_CHECK(target.sizes() == at::IntArrayRef(expected), "Expected target size ",
                at::IntArrayRef(expected), ", got ", target.sizes());
    TORCH_CHECK(target.scalar_type() == at::kLong, "expected scalar type Long but found ",
                target.scalar_type());
  }
}

// Checks the forward operator's arguments as torch's cross_entropy does; returns the problem.
inline CEProblem check_cross_entropy_args(const at::Tensor& input, const at::Tensor& target,
                                          const std::optional<at::Tensor>& weight,
                                          int64_t reduction, int64_t ignore_index,
                                          double label_smoothing, const char* op) {
  check_defined(input, op, "input");
  check_defined(target, op, "target");
  const auto dtype = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": not implemented for '", dtype, "'; expected a float32, float64, float16 or bfloat16 "
      "'input'");
  check_same_device(input, target, op, "input", "target");
  TORCH_CHECK(reduction == at::Reduction::None || reduction == at::Reduction::Mean ||
                  reduction == at::Reduction::Sum,
              op, ": expected 'reduction' to be 0 (none), 1 (mean) or 2 (sum), but got ",
              reduction);
  CEProblem p;
  if (input.sizes() == target.sizes()) {  // class probabilities, as torch decides
    TORCH_CHECK(at::isFloatingType(target.scalar_type()),
                "Expected floating point type for target with class probabilities, got ",
                target.scalar_type());
    TORCH_CHECK(ignore_index < 0, "ignore_index is not supported for floating point target");
    TORCH_CHECK_INDEX(input.dim() >= 1, op, ": expected 'input' with a class dimension, but got "
                      "a 0-dimensional tensor");
    check_same_dtype(input, target, op, "input", "target");
    p.kind = CETarget::kProbabilities;
  } else {
    TORCH_CHECK(!(label_smoothing > 1.0),
                "label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
    check_class_index_target(input, target);
    p.kind = CETarget::kIndices;
  }
  TORCH_CHECK(!(label_smoothing > 1.0),
              "label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
  const bool batched = input.dim() >= 2;
  p.N = batched ? input.size(0) : 1;
  p.C = input.size(batched ? 1 : 0);
  p.D = 1;
  for (int64_t i = 2; i < input.dim(); ++i) p.D *= input.size(i);
  if (batched) {
    p.loss_shape.push_back(p.N);
    p.loss_shape.insert(p.loss_shape.end(), input.sizes().begin() + 2, input.sizes().end());
  }
  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    check_same_device(input, w, op, "input", "weight");
    TORCH_CHECK(w.dim() == 1 && w.numel() == p.C,
                "weight tensor should be defined either for all ", p.C,
                " classes or no classes but got weight tensor of shape: ", w.sizes());
    check_same_dtype(input, w, op, "input", "weight");
  }
  return p;
}

// Checks the backward operator's arguments beyond the forward's; returns the problem.
inline CEProblem check_cross_entropy_backward_args(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& total_weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing,
    std::array<bool, 3> output_mask, const char* op) {
  CEProblem p = check_cross_entropy_args(input, target, weight, reduction, ignore_index,
                                         label_smoothing, op);
  check_defined(grad_output, op, "grad_output");
  check_defined(lse, op, "lse");
  check_defined(total_weight, op, "total_weight");
  check_same_device(input, grad_output, op, "input", "grad_output");
  check_same_device(input, lse, op, "input", "lse");
  check_same_device(input, total_weight, op, "input", "total_weight");
  check_same_dtype(input, grad_output, op, "input", "grad_output");
  const auto acc = at::toOpMathType(input.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc && lse.dim() == 3 && lse.size(0) == 2 &&
                  lse.size(1) == p.N && lse.size(2) == p.D,
              op, ": expected 'lse' to be the (2, N, D) = [2, ", p.N, ", ", p.D, "] ", acc,
              " tensor of the forward, but got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(total_weight.scalar_type() == acc && total_weight.numel() == 1, op,
              ": expected 'total_weight' to be the single-element ", acc,
              " tensor of the forward, but got ", total_weight.scalar_type(), " ",
              total_weight.sizes());
  if (reduction == at::Reduction::None) {
    TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(p.loss_shape), op,
                ": expected 'grad_output' of the loss's shape ", at::IntArrayRef(p.loss_shape),
                " for reduction 'none', but got ", grad_output.sizes());
  } else {
    TORCH_CHECK(grad_output.dim() <= 1 && grad_output.numel() == 1, op,
                ": expected a single element 'grad_output' for reduction '",
                reduction_name(reduction), "', but got ", grad_output.sizes());
  }
  TORCH_CHECK(p.kind == CETarget::kProbabilities || !(output_mask[1] || output_mask[2]), op,
              ": class-index targets have no gradient, and the loss is not differentiable with "
              "respect to 'weight' for them (as torch's nll_loss); only class-probability targets "
              "give gradients for 'target' and 'weight'");
  return p;
}

}  // namespace dlext
