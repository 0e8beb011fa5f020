// Layout helpers for elementwise kernels, which walk memory linearly. A tensor qualifies when it is
// non-overlapping and dense in any dimension order (contiguous, channels_last, a permutation);
// outputs are allocated with empty_like, which keeps that order, as torch's own ops do. Anything
// else (slices with gaps, expanded grads with stride 0) is copied once into the reference layout.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

namespace dlext {

// The layout rule every dlext op uses to decide that a 4-D tensor is channels_last (and so gives
// channels_last results): its strides are channels_last-contiguous and not also plain contiguous.
// dlext/autograd.py's fake kernels apply the identical rule.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// `t` itself when it is dense, else a contiguous copy.
inline at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

// `t` laid out exactly like the dense tensor `ref` (same sizes and strides), copying only if needed.
inline at::Tensor like_layout(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides() && t.is_non_overlapping_and_dense()) {
    return t;
  }
  at::Tensor out = at::empty_like(ref, t.options());
  out.copy_(t);
  return out;
}

}  // namespace dlext
