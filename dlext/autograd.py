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


def _is_channels_last(t: torch.Tensor) -> bool:
    """The rule of csrc/common/dense.h: 4-D, channels_last-contiguous and not plain contiguous."""
    return (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
            and not t.is_contiguous())


def _empty(sizes, like: torch.Tensor, channels_last: bool, dtype=None) -> torch.Tensor:
    fmt = torch.channels_last if channels_last and len(sizes) == 4 else torch.contiguous_format
    return torch.empty(sizes, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


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


# ---------------------------------------------------------------------------------- max_pool2d

def _pool_out(size, k, pad, stride, dilation, ceil_mode):
    """torch's pooling output size (csrc/max_pool2d/max_pool2d_common.h)."""
    out = (size + 2 * pad - dilation * (k - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@register_fake("dlext::max_pool2d")
def _max_pool2d_fake(self, kernel_size, stride, padding, dilation, ceil_mode):
    two = lambda v: (v[0], v[-1])  # noqa: E731  (one value or two)
    (kh, kw), (ph, pw), (dh, dw) = two(kernel_size), two(padding), two(dilation)
    sh, sw = two(stride) if len(stride) else (kh, kw)
    sizes = [*self.shape[:-2], _pool_out(self.shape[-2], kh, ph, sh, dh, ceil_mode),
             _pool_out(self.shape[-1], kw, pw, sw, dw, ceil_mode)]
    cl = _is_channels_last(self)
    return _empty(sizes, self, cl), _empty(sizes, self, cl, torch.long)


@register_fake("dlext::max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, indices, input_size, kernel_size, stride, padding,
                              dilation, ceil_mode):
    return _empty(list(input_size), grad_output, _is_channels_last(indices))


def _max_pool2d_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.geometry = (list(inputs[0].shape), *inputs[1:])  # input_size, kernel, stride, ..., ceil


class MaxPool2dFunction(torch.autograd.Function):
    """(values, indices) = max_pool2d(x, ...); only the values are differentiable."""

    @staticmethod
    def forward(ctx, input, kernel_size, stride, padding, dilation, ceil_mode):
        output = _run(ops.max_pool2d.default, input, kernel_size, stride, padding, dilation,
                      ceil_mode)
        _max_pool2d_setup(ctx, (input, kernel_size, stride, padding, dilation, ceil_mode), output)
        return output

    @staticmethod
    def backward(ctx, grad_output, grad_indices):
        (indices,) = ctx.saved_tensors
        grad_input = _differentiable(MaxPool2dBackwardFunction, ops.max_pool2d_backward.default,
                                     grad_output, indices, *ctx.geometry)
        return grad_input, None, None, None, None, None


def _max_pool2d_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


class MaxPool2dBackwardFunction(torch.autograd.Function):
    """grad_input = scatter of grad_output to the argmax positions; linear in grad_output, so its
    own gradient gathers the incoming gradient back at the same positions."""

    @staticmethod
    def forward(ctx, grad_output, indices, *geometry):
        output = _run(ops.max_pool2d_backward.default, grad_output, indices, *geometry)
        _max_pool2d_backward_setup(ctx, (grad_output, indices, *geometry), output)
        return output

    @staticmethod
    def backward(ctx, grad_grad_input):
        (indices,) = ctx.saved_tensors
        flat_idx = indices.flatten(-2)
        empty = flat_idx < 0                      # windows with no input element (index -1)
        gathered = grad_grad_input.flatten(-2).gather(-1, flat_idx.clamp_min(0))
        gathered = gathered.masked_fill(empty, 0).view(indices.shape)
        return gathered, None, None, None, None, None, None, None


_register("dlext::max_pool2d", _max_pool2d_setup, MaxPool2dFunction)
_register("dlext::max_pool2d_backward", _max_pool2d_backward_setup, MaxPool2dBackwardFunction)
