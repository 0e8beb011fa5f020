// See api.h. Operator handles are looked up once and cached.
#include "api.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace dlext {

at::Tensor relu(const at::Tensor& self) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dlext::relu", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op.call(self);
}

at::Tensor& relu_(at::Tensor& self) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dlext::relu_", "")
                             .typed<void(at::Tensor&)>();
  op.call(self);
  return self;
}

at::Tensor relu_backward(const at::Tensor& grad_output, const at::Tensor& result) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dlext::relu_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_output, result);
}

}  // namespace dlext
