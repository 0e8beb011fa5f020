// Autograd-key kernel for dlext's mutating operators (relu_, ...), which cannot carry a Python
// autograd formula. Called directly, such an op would otherwise overwrite a tensor without
// autograd noticing: this kernel refuses tensor arguments that require grad while grad mode is
// on (the differentiable path is the autograd.Function in dlext/autograd.py), runs the backend
// kernel, then bumps the version counter of every argument the schema marks as written, so a
// tensor saved for backward and overwritten later raises in backward, as with torch's own ops.
// An op with a bool argument `training` writes only when it is true (batch_norm's running
// statistics): in evaluation nothing is bumped, so inference tensors and saved statistics work.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

namespace dlext {

void mutable_op_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack);

}  // namespace dlext
