// Argument checks shared by every op: each names the argument and says what was expected, in the
// words PyTorch uses, so a user's mistake is a clear Python exception rather than a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace dlext {

inline void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": expected '", name, "' to be a tensor, got None");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected all tensors to be on the same device, but '",
              name_a, "' is on ", a.device(), " and '", name_b, "' is on ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": expected '", name_b,
              "' to have the same dtype as '", name_a, "' (", a.scalar_type(), "), but got ",
              b.scalar_type());
}

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": expected '", name_b, "' to have the shape of '",
              name_a, "' ", a.sizes(), ", but got ", b.sizes());
}

}  // namespace dlext
