// The CPU conv2d kernels behind dlext::conv2d and dlext::conv2d_backward (conv2d_cpu.cpp picks
// one and prepares its operands). Every tensor is float or double (half and bfloat16 are computed
// in float), dense in the geometry's layout: NCHW-contiguous, or NHWC (channels_last) when
// g.channels_last. A weight laid out that way is a (K, Cg*R*S) matrix whose rows are patches in
// the same (c, r, s) or (r, s, c) order as the patch matrices.
#pragma once

#include <ATen/core/Tensor.h>

#include "conv2d/conv2d_common.h"

namespace dlext {
namespace conv2d_cpu {

// Any convolution: patch tiles (im2col / im2row) times the weight, with a BLAS GEMM.
// bias may be undefined. dx and dw may be undefined (not wanted); dx comes back fully written.
void gemm_forward(const Conv2dGeometry& g, const at::Tensor& x, const at::Tensor& w,
                  const at::Tensor& bias, at::Tensor& y);
void gemm_backward(const Conv2dGeometry& g, const at::Tensor& dy, const at::Tensor& x,
                   const at::Tensor& w, at::Tensor& dx, at::Tensor& dw);

// One input channel per group (depthwise convolutions, channel multipliers): direct loops, NCHW
// only. Correct for any Kg; conv2d_cpu.cpp sends only Kg <= 3 here.
void direct_forward(const Conv2dGeometry& g, const at::Tensor& x, const at::Tensor& w,
                    const at::Tensor& bias, at::Tensor& y);
void direct_backward_input(const Conv2dGeometry& g, const at::Tensor& dy, const at::Tensor& w,
                           at::Tensor& dx);
void direct_backward_weight(const Conv2dGeometry& g, const at::Tensor& dy, const at::Tensor& x,
                            at::Tensor& dw);

// db[k] = sum of dy over batch and pixels, in either layout.
void bias_backward(const Conv2dGeometry& g, const at::Tensor& dy, at::Tensor& db);

}  // namespace conv2d_cpu
}  // namespace dlext
