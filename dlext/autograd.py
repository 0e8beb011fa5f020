"""torch.autograd.Function classes over the dlext operators, and their fake (meta) kernels.

One block per op. Each Function's forward runs the forward op and its backward runs the backward
op through another Function, so gradients are themselves differentiable (double backward).

The same setup_context / backward pair is registered on each functional raw operator with
torch.library.register_autograd, so torch.ops.dlext.<op> is differentiable on its own too. The
Functions themselves call the kernels below that Python autograd layer (see `_run`): inside a
Function it has nothing to do and would cost several microseconds per call. In-place operators
cannot carry a Python autograd formula; their C++ Autograd kernel bumps the version counter and
refuses inputs that require grad (csrc/common/inplace_autograd.h).

The fake kernels describe output shapes, dtypes and strides without computing, so
torch.compile(fullgraph=True) and torch.library.opcheck can trace the ops. Functions are
old-style (forward takes ctx): new-style ones bind arguments by introspection on every call.
"""
from __future__ import annotations

import torch
from torch.library import register_autograd, register_fake

ops = torch.ops.dlext
_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd


def _run(op, *args):
    """Call op's CPU/CUDA kernel directly, skipping its Python autograd kernel.

    Under torch.compile the plain call is traced instead (dynamo does not trace the guard).
    """
    if torch.compiler.is_compiling():
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


def _differentiable(fn: type[torch.autograd.Function], op, *args):
    """fn.apply(*args) where a graph may be recorded (double backward), else just the kernel."""
    if torch.is_grad_enabled():
        return fn.apply(*args)
    return _run(op, *args)


def _register(op_name: str, setup_context, fn: type[torch.autograd.Function]) -> None:
    register_autograd(op_name, fn.backward, setup_context=setup_context)


def _is_dense(t: torch.Tensor) -> bool:
    """Tensor::is_non_overlapping_and_dense, which Python does not expose."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _empty_dense_like(t: torch.Tensor) -> torch.Tensor:
    """The layout the kernels give an elementwise result: t's own when dense, else contiguous."""
    return torch.empty_like(t) if _is_dense(t) else torch.empty(t.shape, dtype=t.dtype,
                                                                device=t.device)


# ---------------------------------------------------------------------------------------- relu

@register_fake("dlext::relu")
def _relu_fake(self):
    return _empty_dense_like(self)


@register_fake("dlext::relu_")
def _relu_inplace_fake(self):
    return None


@register_fake("dlext::relu_backward")
def _relu_backward_fake(grad_output, result):
    return _empty_dense_like(result)


def _relu_setup(ctx, inputs, output):
    ctx.save_for_backward(output)  # the mask is output > 0; the input is not kept


class ReLUFunction(torch.autograd.Function):
    """y = relu(x)."""

    @staticmethod
    def forward(ctx, input):
        output = _run(ops.relu.default, input)
        _relu_setup(ctx, (input,), output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (result,) = ctx.saved_tensors
        return _differentiable(ReLUBackwardFunction, ops.relu_backward.default, grad_output, result)


class ReLUInplaceFunction(torch.autograd.Function):
    """relu_(x): overwrites x, bumps its version counter, and differentiates like ReLUFunction."""

    @staticmethod
    def forward(ctx, input):
        _run(ops.relu_.default, input)
        ctx.mark_dirty(input)
        _relu_setup(ctx, (input,), input)
        return input

    backward = ReLUFunction.backward


def _relu_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


class ReLUBackwardFunction(torch.autograd.Function):
    """dx = relu_backward(dy, y): linear in dy; its derivative in y is zero almost everywhere."""

    @staticmethod
    def forward(ctx, grad_output, result):
        output = _run(ops.relu_backward.default, grad_output, result)
        _relu_backward_setup(ctx, (grad_output, result), output)
        return output

    @staticmethod
    def backward(ctx, grad_grad_input):
        (result,) = ctx.saved_tensors
        return _differentiable(ReLUBackwardFunction, ops.relu_backward.default, grad_grad_input,
                               result), None


_register("dlext::relu", _relu_setup, ReLUFunction)
_register("dlext::relu_backward", _relu_backward_setup, ReLUBackwardFunction)
