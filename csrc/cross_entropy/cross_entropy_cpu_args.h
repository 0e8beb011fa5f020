// What the CPU cross-entropy kernels read and write (raw pointers and element strides of the
// (N, C, D) view), the per-block partial sums of the forward, and the fixed-order sum that
// combines them. See cross_entropy_common.h for the formulas.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <vector>

namespace dlext {
namespace cpu {

template <typename scalar_t>
struct CEArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t N = 0, C = 0, D = 0;
  // Logits: x[n * x_sn + c * x_sc + d * x_sd]; x_sc == 1 for the row kernels, x_sd == 1 for the
  // plane kernels.
  const scalar_t* x = nullptr;
  int64_t x_sn = 0, x_sc = 0, x_sd = 0;
  // Class indices (int64, (N, D)) or probabilities ((N, C, D), walked like x): one of the two.
  const int64_t* t = nullptr;
  int64_t t_sn = 0, t_sd = 0;
  const scalar_t* y = nullptr;
  int64_t y_sn = 0, y_sc = 0, y_sd = 0;
  const acc_t* w = nullptr;  // C class weights in acc_t, or nullptr for none
  acc_t w_sum = 0;           // sum of the weights (C without)
  int64_t ignore_index = -100;
  acc_t a = 1, b = 0;  // see CESmoothing: loss = a * nll + b * smooth
  // The log-sum-exp of each row in two parts, lse = max + log_sum with
  // log_sum = log(sum_c exp(x_c - max)): x_c - lse is then (x_c - max) - log_sum, which keeps
  // its precision when the logits are large (a float lse of 1e4 would be off by up to 5e-4).
  // Both (N, D) contiguous: the two halves of the operator's (2, N, D) `lse`.
  acc_t* lse_max = nullptr;
  acc_t* lse_log_sum = nullptr;

  const scalar_t* row_x(int64_t n, int64_t d) const { return x + n * x_sn + d * x_sd; }
  const scalar_t* row_y(int64_t n, int64_t d) const { return y + n * y_sn + d * y_sd; }
  int64_t target(int64_t n, int64_t d) const { return t[n * t_sn + d * t_sd]; }
};

// Forward outputs besides the lse parts: per-row losses (reduction 'none', (N, D) contiguous)
// and one partial sum per block of rows; the blocks are fixed by the shape alone, so the reduced
// loss and the total weight do not depend on the number of threads.
template <typename scalar_t>
struct CEForwardOut {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* loss = nullptr;          // reduction 'none', else nullptr
  acc_t* block_loss = nullptr;       // sum of the block's losses
  acc_t* block_weight = nullptr;     // sum of w[t] over the block's counted rows (weighted)
  int64_t* block_count = nullptr;    // number of counted (not ignored) rows in the block
};

template <typename scalar_t>
struct CEBackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  // grad_output: one value per row (reduction 'none': go[n * go_sn + d * go_sd], strides may be
  // 0) or, when go is nullptr, `scale` for every row ('sum': grad_output; 'mean': divided by the
  // total weight).
  const scalar_t* go = nullptr;
  int64_t go_sn = 0, go_sd = 0;
  acc_t scale = 0;
  // grad_input and grad_target (probabilities only), walked with the same strides; either may be
  // nullptr when not requested.
  scalar_t* gx = nullptr;
  scalar_t* gy = nullptr;
  int64_t g_sn = 0, g_sc = 0, g_sd = 0;

  acc_t row_scale(int64_t n, int64_t d) const {
    return go ? static_cast<acc_t>(go[n * go_sn + d * go_sd]) : scale;
  }
};

// Sum of v[0], v[stride], ..., v[(n - 1) * stride] by pairwise halving: error O(log n) rounding
// steps instead of O(n), and the same order on every run.
template <typename T>
T pairwise_sum(const T* v, int64_t n, int64_t stride = 1) {
  if (n <= 8) {
    T s = 0;
    for (int64_t i = 0; i < n; ++i) s += v[i * stride];
    return s;
  }
  const int64_t half = n / 2;
  return pairwise_sum(v, half, stride) + pairwise_sum(v + half * stride, n - half, stride);
}

}  // namespace cpu
}  // namespace dlext
