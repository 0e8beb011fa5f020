// BatchNorm on the CPU: the dlext::batch_norm* operators (schemas and their contracts in
// csrc/dlext.cpp) over the kernels of batch_norm_cpu_kernels.h.
//
// Each operator checks its arguments (batch_norm_common.h), brings the input into torch's
// suggested memory format (a no-op for contiguous and channels_last inputs), allocates its
// outputs in that format, and runs the kernels in the accumulation type. Per-channel parameters
// are read once into acc_t arrays whatever their dtype and strides; the per-channel results
// (running statistics, grad_weight, grad_bias) are written back in their own dtype. Scalars per
// channel follow torch's CPU formulas: invstd = 1 / sqrt(var + eps) (0 when var == eps == 0) in
// training, 1 / sqrt(running_var + eps) in evaluation, and the running statistics move by
// running = momentum * batch + (1 - momentum) * running in double, with the unbiased variance.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "batch_norm/batch_norm_common.h"
#include "batch_norm/batch_norm_cpu_kernels.h"
#include "common/outputs.h"

namespace dlext {
namespace {

using bn_cpu::Geometry;
using OptTensor = std::optional<at::Tensor>;

#define DLEXT_BN_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// The input dense in its memory format, and how the kernels see it.
struct DenseInput {
  at::Tensor x;
  at::MemoryFormat format;
  Geometry g;
};

DenseInput dense_input(const at::Tensor& input) {
  const at::MemoryFormat format = bn_memory_format(input);
  at::Tensor x = input.contiguous(format);
  int64_t L = 1;
  for (int64_t d = 2; d < x.dim(); ++d) L *= x.size(d);
  const bool rows = format != at::MemoryFormat::Contiguous || L == 1;
  return {x, format, Geometry{x.size(0), x.size(1), L, rows}};
}

// `t` laid out like the dense input (same memory format), copying only if needed.
at::Tensor like_input(const at::Tensor& t, const DenseInput& in) {
  return t.contiguous(in.format);
}

at::Tensor new_per_channel(const at::Tensor& input, at::ScalarType dtype) {
  return new_empty({input.size(1)}, input.options().dtype(dtype));
}

// The C values of a per-channel tensor (any floating dtype, any stride) as acc_t; `fill` for None.
template <typename acc_t>
std::vector<acc_t> channel_values(const OptTensor& t, int64_t C, acc_t fill) {
  std::vector<acc_t> v(static_cast<size_t>(C), fill);
  if (!bn_defined(t)) return v;
  DLEXT_BN_DISPATCH(t->scalar_type(), "dlext::batch_norm", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    const int64_t stride = t->stride(0);
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<acc_t>(p[c * stride]);
  });
  return v;
}

// t[c] = value(c) for a per-channel tensor of any floating dtype and stride.
template <typename F>
void write_channels(at::Tensor& t, const F& value) {
  DLEXT_BN_DISPATCH(t.scalar_type(), "dlext::batch_norm", [&] {
    scalar_t* p = t.mutable_data_ptr<scalar_t>();
    const int64_t stride = t.stride(0);
    for (int64_t c = 0; c < t.numel(); ++c) p[c * stride] = static_cast<scalar_t>(value(c));
  });
}

// running = momentum * batch + (1 - momentum) * running, in double as torch does.
template <typename acc_t>
void update_running(const OptTensor& running, const std::vector<acc_t>& batch, double momentum) {
  if (!bn_defined(running)) return;
  at::Tensor r = *running;
  DLEXT_BN_DISPATCH(r.scalar_type(), "dlext::batch_norm", [&] {
    scalar_t* p = r.mutable_data_ptr<scalar_t>();
    const int64_t stride = r.stride(0);
    for (int64_t c = 0; c < r.numel(); ++c) {
      const double old = static_cast<double>(p[c * stride]);
      p[c * stride] = static_cast<scalar_t>(momentum * static_cast<double>(batch[c]) +
                                            (1 - momentum) * old);
    }
  });
}

// Training-mode invstd from the biased variance (torch's InvStd: computed in double).
template <typename acc_t>
acc_t train_invstd(acc_t var, double eps) {
  if (var == acc_t(0) && eps == 0) return acc_t(0);
  return static_cast<acc_t>(1 / std::sqrt(static_cast<double>(var) + eps));
}

// ------------------------------------------------------------------------------ primitives

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input) {
  constexpr const char* op = "dlext::batch_norm_stats";
  check_bn_input(input, op);
  const DenseInput in = dense_input(input);
  const at::ScalarType acc = bn_acc_dtype(input.scalar_type());
  at::Tensor mean = new_per_channel(input, acc);
  at::Tensor var = new_per_channel(input, acc);
  if (in.g.C == 0) return {mean, var};
  if (in.g.count() == 0) {  // no values: mean 0, var 0 (keeps merges and gradients finite)
    write_channels(mean, [](int64_t) { return 0.0; });
    write_channels(var, [](int64_t) { return 0.0; });
    return {mean, var};
  }
  DLEXT_BN_DISPATCH(in.x.scalar_type(), op, [&] {
    using acc_t = bn_cpu::acc_type<scalar_t>;
    std::vector<acc_t> m2(static_cast<size_t>(in.g.C));
    bn_cpu::channel_moments(in.x.const_data_ptr<scalar_t>(), in.g, mean.mutable_data_ptr<acc_t>(),
                            m2.data());
    acc_t* v = var.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < in.g.C; ++c) v[c] = m2[c] / static_cast<acc_t>(in.g.count());
  });
  return {mean, var};
}

at::Tensor batch_norm_elemt_cpu(const at::Tensor& input, const OptTensor& weight,
                                const OptTensor& bias, const at::Tensor& mean,
                                const at::Tensor& invstd) {
  constexpr const char* op = "dlext::batch_norm_elemt";
  check_bn_elemt_args(input, weight, bias, mean, invstd, op);
  const DenseInput in = dense_input(input);
  at::Tensor out = new_empty(input.sizes(), input.options(), in.format);
  if (input.numel() == 0) return out;
  DLEXT_BN_DISPATCH(in.x.scalar_type(), op, [&] {
    using acc_t = bn_cpu::acc_type<scalar_t>;
    const int64_t C = in.g.C;
    const std::vector<acc_t> m = channel_values<acc_t>(mean, C, 0);
    std::vector<acc_t> scale = channel_values<acc_t>(weight, C, 1);
    const std::vector<acc_t> is = channel_values<acc_t>(invstd, C, 0);
    for (int64_t c = 0; c < C; ++c) scale[c] *= is[c];
    const std::vector<acc_t> shift = channel_values<acc_t>(bias, C, 0);
    bn_cpu::normalise(in.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), in.g,
                      m.data(), scale.data(), shift.data());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const OptTensor& weight, std::array<bool, 3> output_mask) {
  constexpr const char* op = "dlext::batch_norm_backward_reduce";
  check_bn_backward_reduce_args(grad_output, input, mean, invstd, weight, op);
  const at::ScalarType acc = bn_acc_dtype(input.scalar_type());
  const at::ScalarType pgrad = bn_param_grad_dtype(input, weight);
  at::Tensor sum_dy, sum_dy_xmu, grad_weight, grad_bias;
  if (output_mask[0]) {
    sum_dy = new_per_channel(input, acc);
    sum_dy_xmu = new_per_channel(input, acc);
  }
  if (output_mask[1]) grad_weight = new_per_channel(input, pgrad);
  if (output_mask[2]) grad_bias = new_per_channel(input, pgrad);
  if (!(output_mask[0] || output_mask[1] || output_mask[2]) || input.size(1) == 0) {
    return {sum_dy, sum_dy_xmu, grad_weight, grad_bias};
  }
  const DenseInput in = dense_input(input);
  const at::Tensor dy = like_input(grad_output, in);
  DLEXT_BN_DISPATCH(in.x.scalar_type(), op, [&] {
    using acc_t = bn_cpu::acc_type<scalar_t>;
    const int64_t C = in.g.C;
    const std::vector<acc_t> m = channel_values<acc_t>(mean, C, 0);
    const std::vector<acc_t> is = channel_values<acc_t>(invstd, C, 0);
    std::vector<acc_t> sdy(static_cast<size_t>(C), acc_t(0));
    std::vector<acc_t> sdxm(static_cast<size_t>(C), acc_t(0));
    if (in.g.count() > 0) {
      bn_cpu::channel_grad_sums(dy.const_data_ptr<scalar_t>(), in.x.const_data_ptr<scalar_t>(),
                                in.g, m.data(), sdy.data(), sdxm.data());
    }
    if (output_mask[0]) {
      write_channels(sum_dy, [&](int64_t c) { return sdy[c]; });
      write_channels(sum_dy_xmu, [&](int64_t c) { return sdxm[c]; });
    }
    if (output_mask[1]) write_channels(grad_weight, [&](int64_t c) { return sdxm[c] * is[c]; });
    if (output_mask[2]) write_channels(grad_bias, [&](int64_t c) { return sdy[c]; });
  });
  return {sum_dy, sum_dy_xmu, grad_weight, grad_bias};
}

at::Tensor batch_norm_backward_elemt_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                         const at::Tensor& mean, const at::Tensor& invstd,
                                         const OptTensor& weight, const at::Tensor& sum_dy,
                                         const at::Tensor& sum_dy_xmu, int64_t count) {
  constexpr const char* op = "dlext::batch_norm_backward_elemt";
  check_bn_backward_elemt_args(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count,
                               op);
  const DenseInput in = dense_input(input);
  at::Tensor grad_input = new_empty(input.sizes(), input.options(), in.format);
  if (input.numel() == 0) return grad_input;
  const at::Tensor dy = like_input(grad_output, in);
  DLEXT_BN_DISPATCH(in.x.scalar_type(), op, [&] {
    using acc_t = bn_cpu::acc_type<scalar_t>;
    const int64_t C = in.g.C;
    const std::vector<acc_t> m = channel_values<acc_t>(mean, C, 0);
    const std::vector<acc_t> is = channel_values<acc_t>(invstd, C, 0);
    const std::vector<acc_t> w = channel_values<acc_t>(weight, C, 1);
    const std::vector<acc_t> sdy = channel_values<acc_t>(sum_dy, C, 0);
    const std::vector<acc_t> sdxm = channel_values<acc_t>(sum_dy_xmu, C, 0);
    const acc_t n = static_cast<acc_t>(count);
    std::vector<bn_cpu::GradCoeffs<acc_t>> coeffs(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) {
      coeffs[c] = {m[c], sdy[c] / n, sdxm[c] * is[c] * is[c] / n, is[c] * w[c]};
    }
    bn_cpu::apply_grad(dy.const_data_ptr<scalar_t>(), in.x.const_data_ptr<scalar_t>(),
                       grad_input.mutable_data_ptr<scalar_t>(), in.g, coeffs.data(),
                       /*train=*/true);
  });
  return grad_input;
}

// ------------------------------------------------------------------------ fused single-process

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cpu(
    const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
    double eps) {
  constexpr const char* op = "dlext::batch_norm";
  check_batch_norm_args(input, weight, bias, running_mean, running_var, training, op);

  const DenseInput in = dense_input(input);
  const at::ScalarType acc = bn_acc_dtype(input.scalar_type());
  at::Tensor out = new_empty(input.sizes(), input.options(), in.format);
  at::Tensor save_mean = new_per_channel(input, acc);
  at::Tensor save_invstd = new_per_channel(input, acc);
  const int64_t C = in.g.C;
  if (C == 0) return {out, save_mean, save_invstd};

  DLEXT_BN_DISPATCH(in.x.scalar_type(), op, [&] {
    using acc_t = bn_cpu::acc_type<scalar_t>;
    acc_t* sm = save_mean.mutable_data_ptr<acc_t>();
    acc_t* si = save_invstd.mutable_data_ptr<acc_t>();
    const std::vector<acc_t> w = channel_values<acc_t>(weight, C, 1);
    const std::vector<acc_t> b = channel_values<acc_t>(bias, C, 0);
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();

    if (!training) {  // the running statistics, as torch computes them in evaluation
      const std::vector<acc_t> rm = channel_values<acc_t>(running_mean, C, 0);
      const std::vector<acc_t> rv = channel_values<acc_t>(running_var, C, 1);
      std::vector<acc_t> scale(static_cast<size_t>(C));
      for (int64_t c = 0; c < C; ++c) {
        sm[c] = rm[c];
        si[c] = acc_t(1) / std::sqrt(rv[c] + static_cast<acc_t>(eps));
        scale[c] = si[c] * w[c];
      }
      if (input.numel() > 0) bn_cpu::normalise(x, y, in.g, sm, scale.data(), b.data());
      return;
    }
    const int64_t n = in.g.count();
    if (n == 0) {  // nothing to normalise; the running statistics stay as they are (as in torch)
      for (int64_t c = 0; c < C; ++c) {
        sm[c] = 0;
        si[c] = train_invstd(acc_t(0), eps);
      }
      return;
    }
    std::vector<acc_t> unbiased(static_cast<size_t>(C));
    bn_cpu::moments_then_normalise(x, y, in.g, [&](int64_t c, const bn_cpu::Moments<acc_t>& m) {
      sm[c] = m.mean;
      si[c] = train_invstd(m.m2 / static_cast<acc_t>(n), eps);
      unbiased[c] = m.m2 / static_cast<acc_t>(n - 1);  // NaN for a single value, as in torch
      return bn_cpu::Affine<acc_t>{m.mean, si[c] * w[c], b[c]};
    });
    update_running(running_mean, std::vector<acc_t>(sm, sm + C), momentum);
    update_running(running_var, unbiased, momentum);
  });
  return {out, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const OptTensor& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "dlext::batch_norm_backward";
  check_bn_backward_args(grad_output, input, weight, save_mean, save_invstd, op);

  const DenseInput in = dense_input(input);
  const at::ScalarType pgrad = bn_param_grad_dtype(input, weight);
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = new_empty(input.sizes(), input.options(), in.format);
  if (output_mask[1]) grad_weight = new_per_channel(input, pgrad);
  if (output_mask[2]) grad_bias = new_per_channel(input, pgrad);
  const int64_t C = in.g.C;
  if (C == 0 || !(output_mask[0] || output_mask[1] || output_mask[2])) {
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor dy = like_input(grad_output, in);
  DLEXT_BN_DISPATCH(in.x.scalar_type(), op, [&] {
    using acc_t = bn_cpu::acc_type<scalar_t>;
    const std::vector<acc_t> mean = channel_values<acc_t>(save_mean, C, 0);
    const std::vector<acc_t> invstd = channel_values<acc_t>(save_invstd, C, 0);
    const std::vector<acc_t> w = channel_values<acc_t>(weight, C, 1);
    const int64_t n = in.g.count();
    std::vector<acc_t> sdy(static_cast<size_t>(C), acc_t(0));
    std::vector<acc_t> sdxm(static_cast<size_t>(C), acc_t(0));
    if (n > 0) {
      const bool reduce = output_mask[1] || output_mask[2] || (output_mask[0] && training);
      const acc_t count = static_cast<acc_t>(n);
      bn_cpu::sums_then_grad(
          dy.const_data_ptr<scalar_t>(), in.x.const_data_ptr<scalar_t>(),
          output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr, in.g, mean.data(),
          reduce, training, [&](int64_t c, acc_t s, acc_t p) {
            sdy[c] = s;
            sdxm[c] = p;
            // torch's formula: dx = (dy - sum_dy / n - (x - mean) * k) * invstd * w
            const acc_t k = p * invstd[c] * invstd[c] / count;
            return bn_cpu::GradCoeffs<acc_t>{mean[c], s / count, k, invstd[c] * w[c]};
          });
    }
    if (output_mask[1]) write_channels(grad_weight, [&](int64_t c) { return sdxm[c] * invstd[c]; });
    if (output_mask[2]) write_channels(grad_bias, [&](int64_t c) { return sdy[c]; });
  });
  return {grad_input, grad_weight, grad_bias};
}

#undef DLEXT_BN_DISPATCH

}  // namespace
}  // namespace dlext

TORCH_LIBRARY_IMPL(dlext, CPU, m) {
  m.impl("batch_norm_stats", &dlext::batch_norm_stats_cpu);
  m.impl("batch_norm_elemt", &dlext::batch_norm_elemt_cpu);
  m.impl("batch_norm_backward_reduce", &dlext::batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &dlext::batch_norm_backward_elemt_cpu);
  m.impl("batch_norm", &dlext::batch_norm_cpu);
  m.impl("batch_norm_backward", &dlext::batch_norm_backward_cpu);
}
