// Fused softmax + cross-entropy on the CPU, host side: picks how the kernels walk the (N, C, D)
// view of the input (cross_entropy_cpu_rows.h: class-contiguous rows; cross_entropy_cpu_lanes.h:
// planes, and the forward of rows of few classes; cross_entropy_cpu_flat.h: the backward of
// those), answers the empty shapes as torch does, runs the kernels over threads and combines the
// per-block sums in a fixed order. Nothing of size N x C is allocated in the forward (only the lse
// of each row, in two parts, is kept for the backward); the backward writes each gradient element
// once. Formulas: cross_entropy_common.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/outputs.h"
#include "cross_entropy/cross_entropy_common.h"
#include "cross_entropy/cross_entropy_grads.h"
#include "cross_entropy/cross_entropy_mean.h"
#include "cross_entropy/cross_entropy_cpu_args.h"
#include "cross_entropy/cross_entropy_cpu_flat.h"
#include "cross_entropy/cross_entropy_cpu_lanes.h"
#include "cross_entropy/cross_entropy_cpu_rows.h"

namespace dlext {
namespace {

using cpu::CEArgs;
using cpu::CEBackwardArgs;
using cpu::CEForwardOut;

// t with strides (C * D, 1, C): each (n, d) row of classes contiguous.
at::Tensor class_contiguous(const at::Tensor& t) {
  return t.transpose(1, 2).contiguous().transpose(1, 2);
}

// The probability target laid out the way the kernel walks the input.
at::Tensor probs_for_layout(const at::Tensor& y, CELayout layout) {
  if (layout == CELayout::kPlanes) return y.stride(2) == 1 ? y : y.contiguous();
  return (y.size(1) <= 1 || y.stride(1) == 1) ? y : class_contiguous(y);
}

// Calls f(std::bool_constant<v>{}), so a runtime flag picks a template instantiation.
template <typename F>
void with_bool(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Everything but the outputs: pointers and strides, class weights in acc_t, smoothing.
template <typename scalar_t>
CEArgs<scalar_t> make_args(const at::Tensor& x, const at::Tensor& t, const at::Tensor& y,
                           const at::Tensor& w_acc, int64_t ignore_index,
                           const CESmoothing& sm, const at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  CEArgs<scalar_t> A;
  A.N = x.size(0);
  A.C = x.size(1);
  A.D = x.size(2);
  A.x = x.const_data_ptr<scalar_t>();
  A.x_sn = x.stride(0);
  A.x_sc = x.stride(1);
  A.x_sd = x.stride(2);
  if (t.defined()) {
    A.t = t.const_data_ptr<int64_t>();
    A.t_sn = t.stride(0);
    A.t_sd = t.stride(1);
  }
  if (y.defined()) {
    A.y = y.const_data_ptr<scalar_t>();
    A.y_sn = y.stride(0);
    A.y_sc = y.stride(1);
    A.y_sd = y.stride(2);
  }
  if (w_acc.defined()) {
    A.w = w_acc.const_data_ptr<acc_t>();
    A.w_sum = cpu::pairwise_sum(A.w, A.C);
  } else {
    A.w_sum = static_cast<acc_t>(A.C);
  }
  A.ignore_index = ignore_index;
  A.a = static_cast<acc_t>(sm.a);
  A.b = static_cast<acc_t>(sm.b);
  if (lse.defined()) {
    A.lse_max = lse.mutable_data_ptr<acc_t>();
    A.lse_log_sum = A.lse_max + A.N * A.D;
  }
  return A;
}

// Blocks of the forward: kCERowsPerBlock rows, or kCEPlaneBlock positions of one batch entry.
struct Blocks {
  int64_t count, per_n, size;
};

Blocks forward_blocks(CELayout layout, int64_t N, int64_t D) {
  if (layout == CELayout::kRows) {
    const int64_t size = cpu::kCERowsPerBlock;
    return {(N * D + size - 1) / size, 0, size};
  }
  const int64_t size = cpu::kCEPlaneBlock;
  const int64_t per_n = (D + size - 1) / size;
  return {N * per_n, per_n, size};
}

template <typename scalar_t, bool kProb, bool kSmooth, bool kWeighted>
void run_forward(const CEArgs<scalar_t>& A, const CEForwardOut<scalar_t>& out, CELayout layout,
                 const Blocks& blocks) {
  const int64_t grain = std::max<int64_t>(1, cpu::kCEGrain / (blocks.size * A.C));
  const bool small = A.C <= cpu::kCESmallC;
  at::parallel_for(0, blocks.count, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (layout == CELayout::kPlanes) {
        const int64_t n = b / blocks.per_n;
        const int64_t d0 = (b - n * blocks.per_n) * blocks.size;
        cpu::planes_forward<scalar_t, kProb, kSmooth, kWeighted>(
            A, out, b, n, d0, std::min(A.D, d0 + blocks.size));
        continue;
      }
      const int64_t r0 = b * blocks.size, r1 = std::min(A.N * A.D, r0 + blocks.size);
      if (small) {
        cpu::small_rows_forward<scalar_t, kProb, kSmooth, kWeighted>(A, out, b, r0, r1);
      } else if constexpr (kProb) {
        cpu::rows_forward_prob<scalar_t, kWeighted>(A, out, b, r0, r1);
      } else {
        cpu::rows_forward_index<scalar_t, kSmooth, kWeighted>(A, out, b, r0, r1);
      }
    }
  });
}

template <typename scalar_t, bool kProb, bool kSmooth, bool kWeighted>
void run_backward(const CEArgs<scalar_t>& A, const CEBackwardArgs<scalar_t>& B, CELayout layout) {
  constexpr int64_t W = at::vec::Vectorized<at::opmath_type<scalar_t>>::size();
  const int64_t rows = A.N * A.D;
  if (layout == CELayout::kRows) {
    const int64_t grain = std::max<int64_t>(1, cpu::kCEGrain / A.C);
    if constexpr (!kProb) {
      if (A.C >= W && A.C <= cpu::kCEFlatMaxC &&
          cpu::rows_are_flat(A.N, A.C, A.D, A.x_sn, A.x_sc, A.x_sd) &&
          cpu::rows_are_flat(A.N, A.C, A.D, B.g_sn, B.g_sc, B.g_sd)) {
        at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
          cpu::flat_backward_index<scalar_t, kSmooth, kWeighted>(A, B, r0, r1);
        });
        return;
      }
    }
    const cpu::RowTail<at::vec::Vectorized<at::opmath_type<scalar_t>>> tail(A.C);
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      cpu::RowCursor cur(r0, A.D);
      for (int64_t r = r0; r < r1; ++r, cur.next()) {
        if constexpr (kProb) {
          cpu::row_backward_prob<scalar_t, kWeighted>(A, B, tail, cur.n, cur.d);
        } else {
          cpu::row_backward_index<scalar_t, kSmooth, kWeighted>(A, B, tail, cur.n, cur.d);
        }
      }
    });
    return;
  }
  // Plane kernels, one group of W positions per step.
  const int64_t grain = std::max<int64_t>(1, cpu::kCEGrain / (W * A.C));
  const int64_t per_n = (A.D + W - 1) / W;
  at::parallel_for(0, A.N * per_n, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n = g / per_n, d = (g - n * per_n) * W;
      cpu::planes_backward<scalar_t, kProb, kSmooth, kWeighted>(A, B, n, d, std::min(W, A.D - d));
    }
  });
}

// Gradient of the loss with respect to the class weights (probability targets):
// gw_c = sum over rows of scale * y'_c * (lse - x_c). Rarely asked for, so plain loops over
// blocks of rows fixed by the shape (256 at most), each with its own C partial sums, combined
// in block order: deterministic, with no N x C temporary.
template <typename scalar_t>
void weight_grad_prob(const CEArgs<scalar_t>& A, const CEBackwardArgs<scalar_t>& B,
                      scalar_t* gw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = A.N * A.D, C = A.C;
  const int64_t nb = std::min<int64_t>(256, (R + 63) / 64);
  const int64_t per = (R + nb - 1) / nb;
  std::vector<acc_t> part(nb * C, acc_t(0));
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* acc = part.data() + b * C;
      for (int64_t r = b * per; r < std::min(R, (b + 1) * per); ++r) {
        const int64_t n = r / A.D, d = r - n * A.D;
        const acc_t s = B.row_scale(n, d), M = A.lse_max[r], log_sum = A.lse_log_sum[r];
        const scalar_t* x = A.x + n * A.x_sn + d * A.x_sd;
        const scalar_t* y = A.y + n * A.y_sn + d * A.y_sd;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t yp = A.a * static_cast<acc_t>(y[c * A.y_sc]) + A.b;
          acc[c] += s * yp * ((M - static_cast<acc_t>(x[c * A.x_sc])) + log_sum);
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    gw[c] = static_cast<scalar_t>(cpu::pairwise_sum(part.data() + c, nb, C));
  }
}

// Outputs of the forward when there is no row (N * D == 0) or no class (C == 0; every row must
// then be ignored): torch's values, NaN for a mean over nothing.
void forward_without_rows(CETarget kind, const at::Tensor& t, int64_t ignore_index,
                          const CESmoothing& sm, int64_t reduction, at::Tensor& loss,
                          at::Tensor& lse, at::Tensor& total_weight) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  lse.fill_(-std::numeric_limits<double>::infinity());
  if (kind == CETarget::kProbabilities) {
    // -(sum over no classes): negative zero, as torch's -(logp * y).sum().
    loss.fill_(reduction == at::Reduction::Mean ? nan : -0.0);
    total_weight.fill_(static_cast<double>(lse.numel() / 2));  // N * D, lse being (2, N, D)
    return;
  }
  const at::Tensor flat = t.reshape(-1);
  const int64_t* tp = flat.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    if (tp[i] != ignore_index) cpu::check_target(tp[i], 0);
  }
  // Every row is ignored: (1 - eps) * 0 + eps / C * 0, which is NaN when C == 0 and eps > 0.
  const double zero_loss = sm.a * 0.0 + sm.b * 0.0;
  loss.fill_(reduction == at::Reduction::Mean ? nan : zero_loss);
  total_weight.fill_(0.0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing) {
  const CEProblem p = check_cross_entropy_args(input, target, weight, reduction, ignore_index,
                                                label_smoothing, "dlext::cross_entropy");
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
    forward_without_rows(p.kind, t, ignore_index, sm, reduction, loss, lse, total_weight);
    return {loss, lse, total_weight};
  }
  at::Tensor x = input.reshape({N, C, D});
  CELayout layout = ce_layout(x);
  if (layout == CELayout::kNone) {
    x = class_contiguous(x);
    layout = CELayout::kRows;
  }
  const at::Tensor y = prob ? probs_for_layout(target.reshape({N, C, D}), layout) : at::Tensor();
  const at::Tensor w_acc = weights_in_acc(weight, input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dlext::cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CEArgs<scalar_t> A = make_args<scalar_t>(x, t, y, w_acc, ignore_index, sm, lse);
    const Blocks blocks = forward_blocks(layout, N, D);
    std::vector<acc_t> block_loss(blocks.count), block_weight(blocks.count);
    std::vector<int64_t> block_count(blocks.count);
    CEForwardOut<scalar_t> out;
    out.loss = reduction == at::Reduction::None ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    out.block_loss = block_loss.data();
    out.block_weight = block_weight.data();
    out.block_count = block_count.data();
    with_bool(prob, [&](auto P) {
      with_bool(sm.on && !prob, [&](auto S) {
        with_bool(w_acc.defined(), [&](auto Wt) {
          run_forward<scalar_t, decltype(P)::value, decltype(S)::value, decltype(Wt)::value>(
              A, out, layout, blocks);
        });
      });
    });
    // The mean's denominator: the weights of the counted targets, their number without weights
    // (exact in int64), or N * D for probabilities.
    int64_t counted = 0;
    for (const int64_t k : block_count) counted += k;
    const acc_t tw = (!prob && A.w) ? cpu::pairwise_sum(block_weight.data(), blocks.count)
                                    : static_cast<acc_t>(counted);
    *total_weight.mutable_data_ptr<acc_t>() = tw;
    if (reduction != at::Reduction::None) {
      const acc_t sum = cpu::pairwise_sum(block_loss.data(), blocks.count);
      *loss.mutable_data_ptr<scalar_t>() =
          static_cast<scalar_t>(reduction == at::Reduction::Mean ? ce_mean(sum, tw) : sum);
    }
  });
  return {loss, lse, total_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse,
    const at::Tensor& total_weight, int64_t reduction, int64_t ignore_index,
    double label_smoothing, std::array<bool, 3> output_mask) {
  const CEProblem p = check_cross_entropy_backward_args(
      grad_output, input, target, weight, lse, total_weight, reduction, ignore_index,
      label_smoothing, output_mask, "dlext::cross_entropy_backward");
  const int64_t N = p.N, C = p.C, D = p.D;
  const bool prob = p.kind == CETarget::kProbabilities;
  at::Tensor x = input.reshape({N, C, D});
  CEGrads grads = ce_new_grads(x, output_mask);  // cross_entropy_grads.h
  const bool keep = grads.keep;
  at::Tensor &gx = grads.input, &gy = grads.target, &gw = grads.weight;
  auto in_user_shapes = [&] { return grads.in_user_shapes(input, target); };
  if (!(output_mask[0] || output_mask[1] || output_mask[2])) return {gx, gy, gw};
  if (x.numel() == 0) {
    if (gw.defined()) gw.zero_();
    return in_user_shapes();
  }
  CELayout layout = ce_layout(x);
  if (!keep && layout != CELayout::kRows) {
    x = class_contiguous(x);
    layout = CELayout::kRows;
  }
  const CESmoothing sm = ce_smoothing(label_smoothing, C);
  const at::Tensor t = prob ? at::Tensor() : index_targets(target, N, D);
  const at::Tensor y = prob ? probs_for_layout(target.reshape({N, C, D}), layout) : at::Tensor();
  // grad_output per row ('none'; strides may be 0) as (N, D).
  const at::Tensor go =
      reduction == at::Reduction::None ? grad_output.reshape({N, D}) : grad_output;
  const at::Tensor w_acc = weights_in_acc(weight, input);
  // Read only here; CEArgs holds mutable pointers for the forward.
  at::Tensor lse_c = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dlext::cross_entropy_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CEArgs<scalar_t> A = make_args<scalar_t>(x, t, y, w_acc, ignore_index, sm, lse_c);
    CEBackwardArgs<scalar_t> B;
    if (reduction == at::Reduction::None) {
      B.go = go.const_data_ptr<scalar_t>();
      B.go_sn = go.stride(0);
      B.go_sd = go.stride(1);
    } else {
      const acc_t g = static_cast<acc_t>(*grad_output.const_data_ptr<scalar_t>());
      B.scale = reduction == at::Reduction::Mean ? g / *total_weight.const_data_ptr<acc_t>() : g;
    }
    const at::Tensor& g_any = gx.defined() ? gx : gy;
    if (g_any.defined()) {
      B.gx = gx.defined() ? gx.mutable_data_ptr<scalar_t>() : nullptr;
      B.gy = gy.defined() ? gy.mutable_data_ptr<scalar_t>() : nullptr;
      B.g_sn = g_any.stride(0);
      B.g_sc = g_any.stride(1);
      B.g_sd = g_any.stride(2);
      with_bool(prob, [&](auto P) {
        with_bool(sm.on && !prob, [&](auto S) {
          with_bool(w_acc.defined(), [&](auto Wt) {
            run_backward<scalar_t, decltype(P)::value, decltype(S)::value, decltype(Wt)::value>(
                A, B, layout);
          });
        });
      });
    }
    if (gw.defined()) weight_grad_prob<scalar_t>(A, B, gw.mutable_data_ptr<scalar_t>());
  });
  return in_user_shapes();
}

}  // namespace
}  // namespace dlext

TORCH_LIBRARY_IMPL(dlext, CPU, m) {
  m.impl("cross_entropy", &dlext::cross_entropy_cpu);
  m.impl("cross_entropy_backward", &dlext::cross_entropy_backward_cpu);
}
