// The BatchNorm CUDA kernels as seen from the operators (batch_norm_cuda.cu): one entry point per
// operator, defined next to its kernels in batch_norm_cuda_forward.cu / _backward.cu. The
// operators have checked the arguments, made the input dense in its memory format, allocated
// the outputs and set the device; the entry points launch on the current stream.
//
// Per-channel tensors (weight, bias, running statistics, mean, invstd, the backward sums) may have
// any of the allowed dtypes and any stride; the kernels read and write them in place. Outputs
// that are not wanted are undefined tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace dlext {
namespace bn_cuda {

using OptTensor = std::optional<at::Tensor>;

// The dense input seen as (N, C, L), L the product of the spatial sizes: planes (N C L contiguous)
// or rows (channels innermost: channels_last, or L == 1).
struct Layout {
  int64_t N, C, L;
  bool rows;
  int64_t count() const { return N * L; }  // values per channel
};

// ------------------------------------------------------------------ batch_norm_cuda_forward.cu

// mean and biased var (accumulation dtype) of each channel; 0 and 0 for a channel of no values.
void stats(const at::Tensor& x, const Layout& g, const at::Tensor& mean, const at::Tensor& var);

// Training: batch statistics, running statistics updated in place, out normalised.
void forward_train(const at::Tensor& x, const Layout& g, const OptTensor& weight,
                   const OptTensor& bias, const OptTensor& running_mean,
                   const OptTensor& running_var, double momentum, double eps,
                   const at::Tensor& out, const at::Tensor& save_mean,
                   const at::Tensor& save_invstd);

// Evaluation: out normalised with the running statistics.
void forward_eval(const at::Tensor& x, const Layout& g, const OptTensor& weight,
                  const OptTensor& bias, const at::Tensor& running_mean,
                  const at::Tensor& running_var, double eps, const at::Tensor& out,
                  const at::Tensor& save_mean, const at::Tensor& save_invstd);

// out = (x - mean) * invstd * weight + bias.
void elemt(const at::Tensor& x, const Layout& g, const OptTensor& weight, const OptTensor& bias,
           const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& out);

// ----------------------------------------------------------------- batch_norm_cuda_backward.cu

// sum dy and sum dy * (x - mean) per channel, and grad_weight / grad_bias from them.
void backward_reduce(const at::Tensor& dy, const at::Tensor& x, const Layout& g,
                     const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dy,
                     const at::Tensor& sum_dy_xmu, const at::Tensor& grad_weight,
                     const at::Tensor& grad_bias);

// Training-mode grad_input from given sums over `count` values per channel.
void backward_elemt(const at::Tensor& dy, const at::Tensor& x, const Layout& g,
                    const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& weight,
                    const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, int64_t count,
                    const at::Tensor& grad_input);

// The single-process backward: the sums when needed, then grad_input, grad_weight, grad_bias.
void backward(const at::Tensor& dy, const at::Tensor& x, const Layout& g, const OptTensor& weight,
              const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
              const at::Tensor& grad_input, const at::Tensor& grad_weight,
              const at::Tensor& grad_bias);

}  // namespace bn_cuda
}  // namespace dlext
