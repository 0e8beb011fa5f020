// Output allocation for every kernel. In poison mode (tests turn it on; DLEXT_POISON_OUTPUTS=1
// at start-up does too) each new output is filled with NaN, or all-ones bits for integer dtypes,
// before the kernel writes it, so an element a kernel forgets to write fails the comparison
// against native instead of passing by luck on zeroed memory.
#pragma once

#include <ATen/core/Tensor.h>

namespace dlext {

bool poison_outputs();
void set_poison_outputs(bool enabled);

// Fills `t` with the poison pattern when poison mode is on; returns it.
at::Tensor& maybe_poison(at::Tensor& t);

// at::empty_like / at::empty, then maybe_poison.
at::Tensor new_empty_like(const at::Tensor& ref);
at::Tensor new_empty_like(const at::Tensor& ref, const at::TensorOptions& options);
at::Tensor new_empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                     at::MemoryFormat format = at::MemoryFormat::Contiguous);

}  // namespace dlext
