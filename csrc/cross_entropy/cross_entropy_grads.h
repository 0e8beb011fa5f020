// The gradients dlext::cross_entropy_backward returns, allocated the same way by the CPU and CUDA
// operators (and mirrored by the fake kernel in dlext/autograd.py): on the (N, C, D) view, in the
// input's layout where a kernel walks it as it is (ce_grad_keeps_input_layout), else
// class-contiguous; only those output_mask asks for.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <tuple>

#include "common/outputs.h"
#include "cross_entropy/cross_entropy_common.h"

namespace dlext {

struct CEGrads {
  bool keep;                  // gradients laid out as the input (x)
  at::Tensor input, target, weight;

  // The gradients in the shapes of the operator's arguments.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> in_user_shapes(const at::Tensor& in,
                                                                const at::Tensor& tgt) const {
    return std::make_tuple(input.defined() ? input.reshape(in.sizes()) : input,
                           target.defined() ? target.reshape(tgt.sizes()) : target, weight);
  }
};

// x: the input as (N, C, D).
inline CEGrads ce_new_grads(const at::Tensor& x, std::array<bool, 3> output_mask) {
  const int64_t N = x.size(0), C = x.size(1), D = x.size(2);
  CEGrads g{ce_grad_keeps_input_layout(x), {}, {}, {}};
  auto new_grad = [&] {
    if (x.numel() == 0) return new_empty({N, C, D}, x.options());
    return g.keep ? new_empty_like(x) : new_empty({N, D, C}, x.options()).transpose(1, 2);
  };
  if (output_mask[0]) g.input = new_grad();
  if (output_mask[1]) g.target = new_grad();
  if (output_mask[2]) g.weight = new_empty({C}, x.options());
  return g;
}

}  // namespace dlext
