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


# -------------------------------------------------------------------------------------- conv2d

def _conv2d_channels_last(input, weight) -> bool:
    """The kernels' output layout (csrc/conv2d/conv2d_common.h): channels_last when the input or
    the weight is laid out so (torch's suggest_memory_format), contiguous for an empty input."""
    if input.shape[0] == 0 or input.shape[1] == 0:
        return False
    suggest = torch._prims_common.suggest_memory_format
    return torch.channels_last in (suggest(input), suggest(weight))


def _conv2d_format(input, weight):
    return torch.channels_last if _conv2d_channels_last(input, weight) else torch.contiguous_format


def _conv2d_output_shape(input, weight, stride, padding, dilation):
    n, c, h, w = input.shape
    k, _, r, s = weight.shape
    ho = (h + padding[0] + padding[1] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    wo = (w + padding[2] + padding[3] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    torch._check(ho > 0 and wo > 0, lambda: "dlext::conv2d: Kernel size can't be greater than "
                 "actual input size")
    return (n, 0 if c == 0 else k, ho, wo)  # no input channels: no output channels, as torch


@register_fake("dlext::conv2d")
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups):
    shape = _conv2d_output_shape(input, weight, stride, padding, dilation)
    return torch.empty(shape, dtype=input.dtype, device=input.device,
                       memory_format=_conv2d_format(input, weight))


@register_fake("dlext::conv2d_backward")
def _conv2d_backward_fake(grad_output, input, weight, stride, padding, dilation, groups,
                          output_mask):
    fmt = _conv2d_format(input, weight)
    return (torch.empty_like(input, memory_format=fmt) if output_mask[0] else None,
            torch.empty_like(weight, memory_format=fmt) if output_mask[1] else None,
            weight.new_empty(weight.shape[0]) if output_mask[2] else None)


def _conv2d(input, weight, bias, args):
    return _differentiable(Conv2dFunction, ops.conv2d.default, input, weight, bias, *args)


def _conv2d_backward(grad_output, input, weight, args, output_mask):
    return _differentiable(Conv2dBackwardFunction, ops.conv2d_backward.default, grad_output,
                           input, weight, *args, output_mask)


def _conv2d_setup(ctx, inputs, output):
    input, weight, _, *args = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = tuple(args)  # stride, padding, dilation, groups


class Conv2dFunction(torch.autograd.Function):
    """y = conv2d(x, w, b); its backward computes only the gradients autograd asks for."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups):
        output = _run(ops.conv2d.default, input, weight, bias, stride, padding, dilation, groups)
        _conv2d_setup(ctx, (input, weight, bias, stride, padding, dilation, groups), output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        if not any(mask):
            return (None,) * 7
        grads = _conv2d_backward(grad_output, input, weight, ctx.conv_args, mask)
        return (*grads, None, None, None, None)


def _conv2d_backward_setup(ctx, inputs, output):
    grad_output, input, weight, *args, _ = inputs
    ctx.save_for_backward(grad_output, input, weight)
    ctx.conv_args = tuple(args)


class Conv2dBackwardFunction(torch.autograd.Function):
    """(dx, dw, db) = conv2d_backward(dy, x, w). Each output is bilinear in (dy, w) or (dy, x),
    so its derivatives are convolutions again: for incoming ddx, ddw, ddb,
        d dy = conv2d(ddx, w, ddb) + conv2d(x, ddw)
        d x  = the grad_input of conv2d_backward(dy, x, ddw)
        d w  = the grad_weight of conv2d_backward(dy, ddx, w)."""

    @staticmethod
    def forward(ctx, grad_output, input, weight, stride, padding, dilation, groups, output_mask):
        grads = _run(ops.conv2d_backward.default, grad_output, input, weight, stride, padding,
                     dilation, groups, output_mask)
        _conv2d_backward_setup(ctx, (grad_output, input, weight, stride, padding, dilation,
                                     groups, output_mask), grads)
        return grads

    @staticmethod
    def backward(ctx, ggrad_input, ggrad_weight, ggrad_bias):
        grad_output, input, weight = ctx.saved_tensors
        args = ctx.conv_args
        need_grad_output, need_input, need_weight = ctx.needs_input_grad[:3]
        d_grad_output = d_input = d_weight = None
        if need_grad_output:
            terms = []
            if ggrad_input is not None:
                terms.append(_conv2d(ggrad_input, weight, ggrad_bias, args))
            elif ggrad_bias is not None:
                terms.append(ggrad_bias.view(1, -1, 1, 1).expand(grad_output.shape))
            if ggrad_weight is not None:
                terms.append(_conv2d(input, ggrad_weight, None, args))
            if terms:
                d_grad_output = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        if need_input and ggrad_weight is not None:
            d_input = _conv2d_backward(grad_output, input, ggrad_weight, args,
                                       [True, False, False])[0]
        if need_weight and ggrad_input is not None:
            d_weight = _conv2d_backward(grad_output, ggrad_input, weight, args,
                                        [False, True, False])[1]
        return d_grad_output, d_input, d_weight, None, None, None, None, None


_register("dlext::conv2d", _conv2d_setup, Conv2dFunction)
_register("dlext::conv2d_backward", _conv2d_backward_setup, Conv2dBackwardFunction)
