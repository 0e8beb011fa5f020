// Fused softmax + cross-entropy on CUDA: the dlext::cross_entropy and cross_entropy_backward
// operators (schemas in csrc/dlext.cpp) over the kernels of cross_entropy_cuda_forward.cu and
// _backward.cu.
//
// Each operator checks its arguments exactly as the CPU operator does (cross_entropy_common.h:
// torch's errors, device mismatches included), answers the shapes without rows or classes as the
// CPU does, allocates the same outputs in the same layouts, and runs the kernels on the input's
// device and its current stream. The inputs are walked with their own strides: no copy of the
// logits, whatever their layout. Out-of-range class indices are found by the kernels and raised
// here as the CPU raises them (IndexError, the same message), after one small copy to the host
// that can be turned off (cross_entropy_check.h).
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include "common/cuda_launch.cuh"
#include "common/outputs.h"
#include "cross_entropy/cross_entropy_check.h"
#include "cross_entropy/cross_entropy_common.h"
#include "cross_entropy/cross_entropy_grads.h"
#include "cross_entropy/cross_entropy_cuda.h"

namespace dlext {
namespace {

// Whether this call checks its targets on the host (see cross_entropy_check.h).
bool checking_targets() {
  return cross_entropy_check_targets() &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

// A device int64 set to ce_cuda::kNoBadRow, for the kernels to lower to the first bad row.
at::Tensor new_bad_row(const at::Tensor& like) {
  at::Tensor bad = at::empty({1}, like.options().dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemsetAsync(bad.mutable_data_ptr(), 0x7f, sizeof(int64_t),
                                 cuda::current_stream()));
  return bad;
}

// Raises the CPU operators' error for the first row the kernels found out of range.
void raise_bad_target(const at::Tensor& bad, const at::Tensor& t, int64_t C) {
  const int64_t row = bad.item<int64_t>();  // waits for the kernels
  if (row == ce_cuda::kNoBadRow) return;
  const int64_t value = t.reshape(-1)[row].item<int64_t>();
  TORCH_CHECK_INDEX(false, "dlext::cross_entropy: Target ", value,
                    " is out of bounds. (expected a class index in [0, ", C,
                    ") or ignore_index)");
}

// Forward outputs when there is no row or no class (then every target must be ignored): the
// CPU operator's values (cross_entropy_cpu.cpp), NaN for a mean over nothing.
void forward_without_rows(CETarget kind, const at::Tensor& t, int64_t C, int64_t ignore_index,
                          const CESmoothing& sm, int64_t reduction, at::Tensor& loss,
                          at::Tensor& lse, at::Tensor& total_weight) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  lse.fill_(-std::numeric_limits<double>::infinity());
  if (kind == CETarget::kProbabilities) {
    loss.fill_(reduction == at::Reduction::Mean ? nan : -0.0);
    total_weight.fill_(static_cast<double>(lse.numel() / 2));
    return;
  }
  if (t.numel() > 0 && checking_targets()) {
    const at::Tensor flat = t.reshape(-1);
    const at::Tensor counted = flat.masked_select(flat.ne(ignore_index));
    if (counted.numel() > 0) {
      TORCH_CHECK_INDEX(false, "dlext::cross_entropy: Target ", counted[0].item<int64_t>(),
                        " is out of bounds. (expected a class index in [0, ", C,
                        ") or ignore_index)");
    }
  }
  loss.fill_(reduction == at::Reduction::Mean ? nan : sm.a * 0.0 + sm.b * 0.0);
  total_weight.fill_(0.0);
}

ce_cuda::Inputs kernel_inputs(const at::Tensor& x, const at::Tensor& t, const at::Tensor& y,
                              const at::Tensor& w, int64_t ignore_index, const CESmoothing& sm,
                              bool prob, int64_t* bad) {
  return {x, t, y, w, ignore_index, sm.on && !prob, sm.a, sm.b, bad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing) {
  const CEProblem p = check_cross_entropy_args(input, target, weight, reduction, ignore_index,
                                                label_smoothing, "dlext::cross_entropy");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = p.N, C = p.C, D = p.D;
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  at::Tensor loss = reduction == at::Reduction::None ? new_empty(p.loss_shape, input.options())
                                                     : new_empty({}, input.options());
  at::Tensor lse = new_empty({2, N, D}, acc_options);
  at::Tensor total_weight = new_empty({}, acc_options);
  const CESmoothing sm = ce_smoothing(label_smoothing, C);
  const bool prob = p.kind == CETarget::kProbabilities;
  const at::Tensor t = prob ? at::Tensor() : index_targets(target, N, D);
  if (N * D == 0 || C == 0) {
    forward_without_rows(p.kind, t, C, ignore_index, sm, reduction, loss, lse, total_weight);
    return {loss, lse, total_weight};
  }
  const at::Tensor x = input.reshape({N, C, D});
  const at::Tensor y = prob ? target.reshape({N, C, D}) : at::Tensor();
  const bool check = !prob && checking_targets();
  const at::Tensor bad = check ? new_bad_row(input) : at::Tensor();
  ce_cuda::forward(kernel_inputs(x, t, y, weights_in_acc(weight, input), ignore_index, sm, prob,
                                 check ? bad.mutable_data_ptr<int64_t>() : nullptr),
                   reduction, loss, lse, total_weight);
  if (check) raise_bad_target(bad, t, C);
  return {loss, lse, total_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse,
    const at::Tensor& total_weight, int64_t reduction, int64_t ignore_index,
    double label_smoothing, std::array<bool, 3> output_mask) {
  const CEProblem p = check_cross_entropy_backward_args(
      grad_output, input, target, weight, lse, total_weight, reduction, ignore_index,
      label_smoothing, output_mask, "dlext::cross_entropy_backward");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = p.N, C = p.C, D = p.D;
  const bool prob = p.kind == CETarget::kProbabilities;
  const at::Tensor x = input.reshape({N, C, D});
  CEGrads grads = ce_new_grads(x, output_mask);  // cross_entropy_grads.h
  at::Tensor &gx = grads.input, &gy = grads.target, &gw = grads.weight;
  auto in_user_shapes = [&] { return grads.in_user_shapes(input, target); };
  if (!(output_mask[0] || output_mask[1] || output_mask[2])) return {gx, gy, gw};
  if (x.numel() == 0) {
    if (gw.defined()) gw.zero_();
    return in_user_shapes();
  }
  const CESmoothing sm = ce_smoothing(label_smoothing, C);
  const at::Tensor t = prob ? at::Tensor() : index_targets(target, N, D);
  const at::Tensor y = prob ? target.reshape({N, C, D}) : at::Tensor();
  const at::Tensor go =
      reduction == at::Reduction::None ? grad_output.reshape({N, D}) : grad_output;
  const bool check = !prob && gx.defined() && checking_targets();
  const at::Tensor bad = check ? new_bad_row(input) : at::Tensor();
  ce_cuda::backward(kernel_inputs(x, t, y, weights_in_acc(weight, input), ignore_index, sm, prob,
                                  check ? bad.mutable_data_ptr<int64_t>() : nullptr),
                    reduction, go, lse.contiguous(), total_weight, gx, gy, gw);
  if (check) raise_bad_target(bad, t, C);
  return in_user_shapes();
}

}  // namespace
}  // namespace dlext

TORCH_LIBRARY_IMPL(dlext, CUDA, m) {
  m.impl("cross_entropy", &dlext::cross_entropy_cuda);
  m.impl("cross_entropy_backward", &dlext::cross_entropy_backward_cuda);
}
