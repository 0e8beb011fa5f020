// The 'mean' reduction of the loss, shared by the CPU and CUDA forwards: sum / total_weight.
//
// torch divides the two parts of a label-smoothed loss separately, (1 - eps) * nll_sum / tw +
// smooth_sum / tw, so when every counted target has weight 0 (tw == 0) its first part is 0 / 0
// and the mean is NaN even though smooth_sum is not 0; a single sum / tw would give inf. The
// same NaN covers an all-ignored batch. (With non-negative class weights, tw == 0 means every
// counted nll term is 0, so this is exactly torch's value.)
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace dlext {

template <typename acc_t>
C10_HOST_DEVICE inline acc_t ce_mean(acc_t sum, acc_t total_weight) {
  return total_weight == acc_t(0) ? static_cast<acc_t>(NAN) : sum / total_weight;
}

}  // namespace dlext
