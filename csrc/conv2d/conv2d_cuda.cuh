// conv2d on CUDA: what the host code (conv2d_cuda.cu) hands the kernels, and the kernels' entry
// points. The kernels themselves are in conv2d_igemm_cuda.cuh (implicit GEMM, instantiated per
// dtype in conv2d_igemm_*_cuda.cu) and conv2d_direct_cuda.cu (depthwise / small channel
// multipliers, bias gradient).
//
// The implicit-GEMM view. Per group g, with activations in NHWC and C/K the total channel counts:
//   forward          out[m, j]  = sum_kk A[m, kk] * B[j, kk]   m = (n, p, q)   j = cout in group
//                    A = x gathered at (p*sh - pad_t + r*dh, q*sw - pad_l + s*dw),  kk = (r, s, c)
//                    B = weight as K x (R*S*Cg), "KRSC" (the weight in channels_last)
//   backward-data    dx[m, j]   = sum_kk A[m, kk] * B[j, kk]   m = (n, h, w)   j = cin in group
//                    A = dy gathered at p = (h + pad_t - r*dh) / sh (only where it divides) and
//                        likewise q,  kk = (r, s, k)
//                    B = weight transposed to [G][Cg][R][S][Kg] (made once per call)
//   backward-weight  dw[i, j]   = sum_kk A[i, kk] * B[j, kk]   i = cout in group, j = (r, s, c),
//                    kk = (n, p, q): A = dy, B = x gathered as in the forward
// In all three, c (resp. k) is the fastest part of kk and of j, so a run of channels is contiguous
// in NHWC memory: that is what makes NHWC (channels_last) the fast layout. The output of each
// GEMM is written through the strides of the result tensor, so NCHW results cost no extra pass;
// NCHW operands are converted to NHWC once on the way in (one read and one write of each).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "conv2d/conv2d_common.h"

namespace dlext {
namespace conv2d_cuda {

enum class Kind { kForward, kBackwardData, kBackwardWeight };

// Tensor-core tiles BM x BN (BK is 64 bytes of K: 32 halves or 16 floats); see choose_tile in
// conv2d_cuda.cu for which shape gets which.
enum class Tile { k128x128, k128x64, k64x64 };

// One implicit GEMM. Sizes are 64-bit; per-dimension sizes are checked to stay below 2^30 on the
// host (conv2d_cuda.cu), so coordinate arithmetic inside a dimension may use 32-bit ints.
struct IGemmArgs {
  // Geometry. N, C, H, W: the input; K: output channels; Ho, Wo: the output.
  int64_t N, C, H, W, K, Ho, Wo;
  int32_t R, S, Cg, Kg, groups;
  int32_t stride_h, stride_w, pad_t, pad_l, dil_h, dil_w;
  // The GEMM per group: rows x cols, reduced over depth (see the table above).
  int64_t rows, cols, depth;
  // Operands, as raw pointers to the tensor's dtype (see the table above for their layouts).
  const void* a;
  const void* b;
  const void* bias;  // forward only; may be null
  // The result, written through its strides: out_stride[0..3] for the dims of the result tensor
  // (y: N, K, Ho, Wo; dx: N, C, H, W; dw: K, Cg, R, S).
  void* out;
  int64_t out_stride[4];
  // Backward-weight split-K: `splits` slices of the depth, each writing its partial tile into
  // `workspace` (float, or double for double) as [split][group][rows][cols]; a second kernel adds
  // the slices in order. splits == 1 writes `out` directly.
  int32_t splits;
  int64_t ktiles_per_split;
  void* workspace;
  // Groups handled by this launch start here (grid z covers at most 65535 groups x splits).
  int32_t group_base, groups_in_launch;
};

// Tensor-core implicit GEMM for T in {c10::Half, c10::BFloat16, float (TF32)}. `vec`: operands
// may be read as 16-byte vectors along channels (the host checked divisibility and alignment).
template <typename T>
void igemm_tensor_core(Kind kind, Tile tile, bool vec, const IGemmArgs& args);

// The same tiling computed with plain FMAs: float (exact, TF32 off), double, and the 16-bit types
// on GPUs without bfloat16/float16 tensor cores (compute capability below 8.0).
template <typename T>
void igemm_fma(Kind kind, bool vec, const IGemmArgs& args);

// Sums the split-K partial tiles of a backward-weight GEMM into args.out (fixed order).
template <typename T>
void splitk_reduce(const IGemmArgs& args);

// Direct kernels (conv2d_direct_cuda.cu) for one input channel per group: tensors in any strides,
// results dense NCHW or NHWC as allocated.
void direct_forward(const Conv2dGeometry& g, const at::Tensor& x, const at::Tensor& w,
                    const at::Tensor& bias, at::Tensor& y);
void direct_backward_input(const Conv2dGeometry& g, const at::Tensor& dy, const at::Tensor& w,
                           at::Tensor& dx);
void direct_backward_weight(const Conv2dGeometry& g, const at::Tensor& dy, const at::Tensor& x,
                            at::Tensor& dw);

// db[k] = sum of dy[:, k, :, :] for a dense NCHW or NHWC dy (deterministic two-pass sum).
void bias_backward(const at::Tensor& dy, at::Tensor& db);

}  // namespace conv2d_cuda
}  // namespace dlext
