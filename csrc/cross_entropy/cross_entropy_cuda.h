// The cross-entropy CUDA kernels as seen from the operators (cross_entropy_cuda.cu): one entry
// point per pass, defined next to its kernels in cross_entropy_cuda_forward.cu / _backward.cu.
// The operators have checked the arguments, answered the shapes without rows or classes, set the
// device and allocated the outputs; the entry points launch on the current stream.
//
// Tensors are the (N, C, D) views of cross_entropy_common.h, walked with their own strides (no
// copy: a kernel reads classes with 16-byte packs where every row allows it, element by element
// otherwise). Formulas: cross_entropy_common.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dlext {
namespace ce_cuda {

// What both passes read.
struct Inputs {
  at::Tensor x;       // logits (N, C, D), any strides
  at::Tensor t;       // class indices, int64 (N, D); undefined for probabilities
  at::Tensor y;       // probabilities (N, C, D), x's dtype; undefined for class indices
  at::Tensor w;       // class weights, C contiguous values in the accumulation dtype; or undefined
  int64_t ignore_index;
  bool smooth;        // label smoothing on (class indices only)
  double a, b;        // CESmoothing
  int64_t* bad;       // device int64 set to the first row whose target is out of range (the
                      // caller initialised it to kNoBadRow); nullptr: no report (such rows give
                      // NaN either way)
};

// Larger than any row index: no out-of-range target. Bytes 0x7f, so one memset sets it.
constexpr int64_t kNoBadRow = 0x7f7f7f7f7f7f7f7fLL;

// Forward: lse (2, N, D) of the accumulation dtype, contiguous; loss (N, D) contiguous for
// reduction 'none', else a scalar; total_weight a scalar of the accumulation dtype.
void forward(const Inputs& in, int64_t reduction, const at::Tensor& loss, const at::Tensor& lse,
             const at::Tensor& total_weight);

// Backward: grad_output (N, D) for reduction 'none' (any strides, 0 included), else a
// single-element tensor; lse contiguous. gx / gy (N, C, D) with the same strides, either
// undefined when not asked for; gw C contiguous values of x's dtype, or undefined.
void backward(const Inputs& in, int64_t reduction, const at::Tensor& grad_output,
              const at::Tensor& lse, const at::Tensor& total_weight, const at::Tensor& gx,
              const at::Tensor& gy, const at::Tensor& gw);

}  // namespace ce_cuda
}  // namespace dlext
