// See mutable_autograd.h.
#include "common/mutable_autograd.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/DispatchKeySet.h>

#include <vector>

namespace dlext {

void mutable_op_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const auto& formals = schema.arguments();
  const auto args = torch::jit::last(*stack, formals.size());
  std::vector<at::Tensor> written;
  bool writes = true;
  for (size_t i = 0; i < formals.size(); ++i) {
    if (formals[i].name() == "training" && args[i].isBool()) writes = args[i].toBool();
    if (!args[i].isTensor()) continue;
    const at::Tensor& t = args[i].toTensor();
    TORCH_CHECK(!(at::GradMode::is_enabled() && t.defined() && t.requires_grad()), schema.name(),
                ": argument '", formals[i].name(),
                "' requires grad, but this in-place operator is not differentiable when called "
                "directly; use dlext.functional (e.g. relu(x, inplace=True)), whose "
                "autograd.Function differentiates it");
    if (formals[i].alias_info() != nullptr && formals[i].alias_info()->isWrite()) {
      written.push_back(t);
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
  if (!writes) return;
  for (const at::Tensor& t : written) {
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace dlext
