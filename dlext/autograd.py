"""torch.autograd.Function classes over the dlext operators, and their fake (meta) kernels.

One block per op. Each Function's forward runs the forward op and its backward runs the backward
op through another Function, so gradients are themselves differentiable (double backward).

The same setup_context / backward pair is registered on each functional raw operator with
torch.library.register_autograd, so torch.ops.dlext.<op> is differentiable on its own too. The
Functions themselves call the kernels below that Python autograd layer (see `_run`): inside a
Function it has nothing to do and would cost several microseconds per call. In-place operators
cannot carry a Python autograd formula; their C++ Autograd kernel bumps the version counter and
refuses inputs that require grad (csrc/common/mutable_autograd.h).

The fake kernels describe output shapes, dtypes and strides without computing, so
torch.compile(fullgraph=True) and torch.library.opcheck can trace the ops. Functions are
old-style (forward takes ctx): new-style ones bind arguments by introspection on every call.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch.library import register_autograd, register_fake

ops = torch.ops.dlext
_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd


def _run(op, *args):
    """Call op's CPU/CUDA kernel directly, skipping its Python autograd kernel.

    Under torch.compile and torch.export the plain call is traced instead (dynamo does not trace
    the guard), without grad mode, as a Function's forward runs in eager: tracing may run forward
    with grad mode on, where an in-place op's Autograd kernel would refuse inputs that require
    grad.
    """
    if torch.compiler.is_compiling():
        with torch.no_grad():
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


def _fake(op_name: str):
    """register_fake(op_name) for the decorated function, behind the check every dlext kernel
    makes first: all tensor arguments on one device. A real tensor mixed with a meta tensor
    dispatches to the fake kernel (Meta outranks CPU), which must then fail as the kernel would
    instead of handing back uninitialised memory."""
    def decorate(fn):
        names = list(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            first = None
            for name, value in (*zip(names, args), *kwargs.items()):
                if not isinstance(value, torch.Tensor):
                    continue
                if first is None:
                    first = (name, value.device)
                    continue
                torch._check(value.device == first[1], lambda: (
                    f"{op_name}: expected all tensors to be on the same device, but "
                    f"'{first[0]}' is on {first[1]} and '{name}' is on {value.device}"))
            return fn(*args, **kwargs)

        register_fake(op_name)(checked)
        return fn
    return decorate


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

@_fake("dlext::relu")
def _relu_fake(self):
    return _empty_dense_like(self)


@_fake("dlext::relu_")
def _relu_inplace_fake(self):
    return None


@_fake("dlext::relu_backward")
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


@_fake("dlext::max_pool2d")
def _max_pool2d_fake(self, kernel_size, stride, padding, dilation, ceil_mode):
    two = lambda v: (v[0], v[-1])  # noqa: E731  (one value or two)
    (kh, kw), (ph, pw), (dh, dw) = two(kernel_size), two(padding), two(dilation)
    sh, sw = two(stride) if len(stride) else (kh, kw)
    sizes = [*self.shape[:-2], _pool_out(self.shape[-2], kh, ph, sh, dh, ceil_mode),
             _pool_out(self.shape[-1], kw, pw, sw, dw, ceil_mode)]
    cl = _is_channels_last(self)
    return _empty(sizes, self, cl), _empty(sizes, self, cl, torch.long)


@_fake("dlext::max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, indices, input_size, kernel_size, stride, padding,
                              dilation, ceil_mode):
    return _empty(list(input_size), grad_output, _is_channels_last(indices))


def _max_pool2d_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd fills an int64 zero "gradient" of the indices
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
        if grad_output is None:
            return None, None, None, None, None, None
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

# ---------------------------------------------------------------------------------- batch_norm
#
# Generic helpers first (any op may use them): gradients of an op restated in elementary torch ops.

def _save_inputs(ctx, inputs) -> None:
    """Keeps an op's inputs for backward: tensors (and None) saved, other arguments on ctx."""
    ctx.input_is_tensor = [a is None or isinstance(a, torch.Tensor) for a in inputs]
    ctx.save_for_backward(*[a for a, t in zip(inputs, ctx.input_is_tensor) if t])
    ctx.other_inputs = [a for a, t in zip(inputs, ctx.input_is_tensor) if not t]


def _saved_inputs(ctx) -> list:
    tensors, others = iter(ctx.saved_tensors), iter(ctx.other_inputs)
    return [next(tensors) if t else next(others) for t in ctx.input_is_tensor]


def _double_backward_by_recompute(formula, inputs, needs_input_grad, grad_outputs) -> tuple:
    """Gradients of formula(*inputs) with respect to inputs, for grad_outputs.

    `formula` restates an op, typically a backward op, in elementary differentiable torch ops; a
    Function's backward returns this for its inputs (None where needs_input_grad is False), so the
    op is differentiable without a kernel for its own derivative. When the backward is itself
    being recorded (create_graph), inputs that require grad enter the formula through an alias,
    so the result stays differentiable with respect to them (third order and beyond); otherwise
    they enter as fresh leaves.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        args, wrt = [], []
        for a, need in zip(inputs, needs_input_grad):
            if need and isinstance(a, torch.Tensor):
                if create_graph and a.requires_grad:
                    a = a.view_as(a)
                else:
                    a = a.detach().requires_grad_()
                wrt.append(a)
            args.append(a)
        outputs = formula(*args)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if o is not None and g is not None and o.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                         allow_unused=True, create_graph=create_graph)
                     if pairs and wrt else [None] * len(wrt))
    return tuple(next(grads) if need and isinstance(a, torch.Tensor) else None
                 for a, need in zip(inputs, needs_input_grad))


def _register_by_recompute(op_name: str, formula) -> None:
    """Autograd for a functional op from `formula`, its restatement in elementary torch ops.

    For ops whose derivatives are rarely taken directly (the BatchNorm primitives): correct to any
    order, at the speed of the elementary ops.
    """
    def backward(ctx, *grads):
        return _double_backward_by_recompute(formula, _saved_inputs(ctx), ctx.needs_input_grad,
                                             grads)
    register_autograd(op_name, backward, setup_context=lambda ctx, inputs, output:
                      _save_inputs(ctx, inputs))


# BatchNorm: shapes and dtypes of the kernels' results.

def _bn_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """mean, var, invstd and the backward sums: float32 for 16-bit inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _bn_empty_like_input(input: torch.Tensor) -> torch.Tensor:
    """An input-shaped result: the input's suggested memory format, as the kernels allocate it."""
    return torch.empty(input.shape, dtype=input.dtype, device=input.device,
                       memory_format=torch._prims_common.suggest_memory_format(input))


def _bn_per_channel(input: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return input.new_empty((input.shape[1],), dtype=dtype)


def _bn_param_grad_dtype(input, weight) -> torch.dtype:
    return weight.dtype if weight is not None else _bn_acc_dtype(input.dtype)


@_fake("dlext::batch_norm_stats")
def _bn_stats_fake(input):
    acc = _bn_acc_dtype(input.dtype)
    return _bn_per_channel(input, acc), _bn_per_channel(input, acc)


@_fake("dlext::batch_norm_elemt")
def _bn_elemt_fake(input, weight, bias, mean, invstd):
    return _bn_empty_like_input(input)


@_fake("dlext::batch_norm_backward_reduce")
def _bn_backward_reduce_fake(grad_output, input, mean, invstd, weight, output_mask):
    acc, pgrad = _bn_acc_dtype(input.dtype), _bn_param_grad_dtype(input, weight)
    return (_bn_per_channel(input, acc) if output_mask[0] else None,
            _bn_per_channel(input, acc) if output_mask[0] else None,
            _bn_per_channel(input, pgrad) if output_mask[1] else None,
            _bn_per_channel(input, pgrad) if output_mask[2] else None)


@_fake("dlext::batch_norm_backward_elemt")
def _bn_backward_elemt_fake(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    return _bn_empty_like_input(input)


@_fake("dlext::batch_norm")
def _bn_fake(input, weight, bias, running_mean, running_var, training, momentum, eps):
    acc = _bn_acc_dtype(input.dtype)
    return _bn_empty_like_input(input), _bn_per_channel(input, acc), _bn_per_channel(input, acc)


@_fake("dlext::batch_norm_backward")
def _bn_backward_fake(grad_output, input, weight, save_mean, save_invstd, training, output_mask):
    pgrad = _bn_param_grad_dtype(input, weight)
    return (_bn_empty_like_input(input) if output_mask[0] else None,
            _bn_per_channel(input, pgrad) if output_mask[1] else None,
            _bn_per_channel(input, pgrad) if output_mask[2] else None)


# BatchNorm restated in elementary torch ops (computed in the dtype of the statistics), for the
# derivatives of the backward ops and of the primitives.

def _bn_channels(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel tensor shaped to broadcast over x: (1, C, 1, ...)."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _bn_reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _bn_count(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1] if x.shape[1] else 0


def _bn_scale(invstd, weight):
    return invstd if weight is None else invstd * weight.to(invstd.dtype)


def _bn_elemt_formula(input, weight, bias, mean, invstd):
    y = (input.to(mean.dtype) - _bn_channels(mean, input)) * _bn_channels(_bn_scale(invstd, weight),
                                                                          input)
    if bias is not None:
        y = y + _bn_channels(bias.to(mean.dtype), input)
    return y.to(input.dtype)


def _bn_grad_sums(grad_output, input, mean):
    dims = _bn_reduce_dims(input)
    dy = grad_output.to(mean.dtype)
    xmu = input.to(mean.dtype) - _bn_channels(mean, input)
    return dy, xmu, dy.sum(dims), (dy * xmu).sum(dims)


def _bn_train_grad_input(dy, xmu, input, invstd, weight, sum_dy, sum_dy_xmu, count):
    count = max(count, 1)
    dx = (dy - _bn_channels(sum_dy / count, input)
          - xmu * _bn_channels(invstd * invstd * sum_dy_xmu / count, input))
    return (dx * _bn_channels(_bn_scale(invstd, weight), input)).to(input.dtype)


def _bn_backward_reduce_formula(grad_output, input, mean, invstd, weight, output_mask):
    _, _, sum_dy, sum_dy_xmu = _bn_grad_sums(grad_output, input, mean)
    pgrad = _bn_param_grad_dtype(input, weight)
    return (sum_dy if output_mask[0] else None, sum_dy_xmu if output_mask[0] else None,
            (sum_dy_xmu * invstd).to(pgrad) if output_mask[1] else None,
            sum_dy.to(pgrad) if output_mask[2] else None)


def _bn_backward_elemt_formula(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu,
                               count):
    dy = grad_output.to(mean.dtype)
    xmu = input.to(mean.dtype) - _bn_channels(mean, input)
    return _bn_train_grad_input(dy, xmu, input, invstd, weight, sum_dy, sum_dy_xmu, count)


def _bn_backward_formula(grad_output, input, weight, save_mean, save_invstd, training,
                         output_mask):
    dy, xmu, sum_dy, sum_dy_xmu = _bn_grad_sums(grad_output, input, save_mean)
    if training:
        dx = _bn_train_grad_input(dy, xmu, input, save_invstd, weight, sum_dy, sum_dy_xmu,
                                  _bn_count(input))
    else:
        dx = (dy * _bn_channels(_bn_scale(save_invstd, weight), input)).to(input.dtype)
    pgrad = _bn_param_grad_dtype(input, weight)
    return (dx if output_mask[0] else None,
            (sum_dy_xmu * save_invstd).to(pgrad) if output_mask[1] else None,
            sum_dy.to(pgrad) if output_mask[2] else None)


def _bn_stats_grad_input(input, mean, grad_mean, grad_var):
    """d/dinput of <grad_mean, mean(input)> + <grad_var, var(input)> (biased variance)."""
    count = max(_bn_count(input), 1)
    xf = input.to(mean.dtype)
    dx = torch.zeros_like(xf) if grad_var is None else (
        (xf - _bn_channels(mean, input)) * _bn_channels(grad_var * (2.0 / count), input))
    if grad_mean is not None:
        dx = dx + _bn_channels(grad_mean / count, input)
    return dx.to(input.dtype)


def _bn_stats_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _bn_stats_backward(ctx, grad_mean, grad_var):
    input, mean = ctx.saved_tensors
    return (_bn_stats_grad_input(input, mean, grad_mean, grad_var),)


register_autograd("dlext::batch_norm_stats", _bn_stats_backward, setup_context=_bn_stats_setup)
_register_by_recompute("dlext::batch_norm_elemt", _bn_elemt_formula)
_register_by_recompute("dlext::batch_norm_backward_reduce", _bn_backward_reduce_formula)
_register_by_recompute("dlext::batch_norm_backward_elemt", _bn_backward_elemt_formula)


class BatchNormFunction(torch.autograd.Function):
    """(out, save_mean, save_invstd) = batch_norm(input, weight, bias, running stats, ...).

    Updates the running statistics in place in training. save_mean and save_invstd are outputs:
    in training they are functions of the input, and their gradients (non-zero only in double
    backward) flow back to it, so the backward op can treat them as plain inputs. In evaluation
    they come from the running statistics and are not differentiable (as in torch).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps):
        # Called through the dispatcher's Autograd key (common/mutable_autograd.h), which bumps
        # the version counters of the running statistics the op writes; without grad mode, as in
        # eager, also when torch.export traces this forward with grad mode on.
        with torch.no_grad():
            out, mean, invstd = ops.batch_norm.default(input, weight, bias, running_mean,
                                                       running_var, training, momentum, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training = training
        ctx.set_materialize_grads(False)
        if not training:
            ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_invstd):
        input, weight, mean, invstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        grad_input = grad_weight = grad_bias = None
        if grad_out is not None and any(mask):
            grad_input, grad_weight, grad_bias = _differentiable(
                BatchNormBackwardFunction, ops.batch_norm_backward.default, grad_out, input, weight,
                mean, invstd, ctx.training, mask)
        if ctx.training and mask[0] and (grad_mean is not None or grad_invstd is not None):
            # invstd = (var + eps)^(-1/2): d invstd / d var = -invstd^3 / 2.
            grad_var = None if grad_invstd is None else grad_invstd * (-0.5 * invstd ** 3)
            from_stats = _bn_stats_grad_input(input, mean, grad_mean, grad_var)
            grad_input = from_stats if grad_input is None else grad_input + from_stats
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class BatchNormBackwardFunction(torch.autograd.Function):
    """(grad_input, grad_weight, grad_bias) = batch_norm_backward(...); differentiable by
    recomputing its formula in elementary ops (_double_backward_by_recompute)."""

    @staticmethod
    def forward(ctx, grad_output, input, weight, save_mean, save_invstd, training, output_mask):
        inputs = (grad_output, input, weight, save_mean, save_invstd, training, output_mask)
        grads = _run(ops.batch_norm_backward.default, *inputs)
        _save_inputs(ctx, inputs)
        return grads

    @staticmethod
    def backward(ctx, *grad_grads):
        return _double_backward_by_recompute(_bn_backward_formula, _saved_inputs(ctx),
                                             ctx.needs_input_grad, grad_grads)


register_autograd("dlext::batch_norm_backward", BatchNormBackwardFunction.backward,
                  setup_context=lambda ctx, inputs, output: _save_inputs(ctx, inputs))

# -------------------------------------------------------------------------------------- conv2d

def _conv2d_channels_last(input, weight) -> bool:
    """The kernels' output layout (csrc/conv2d/conv2d_common.h): channels_last when the input or
    the weight is laid out so (torch's suggest_memory_format), contiguous for an empty input and
    for float64 on CUDA (as torch's cuDNN convolution)."""
    if input.shape[0] == 0 or input.shape[1] == 0:
        return False
    if input.device.type == "cuda" and input.dtype == torch.float64:
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


@_fake("dlext::conv2d")
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups):
    shape = _conv2d_output_shape(input, weight, stride, padding, dilation)
    return torch.empty(shape, dtype=input.dtype, device=input.device,
                       memory_format=_conv2d_format(input, weight))


@_fake("dlext::conv2d_backward")
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

# ------------------------------------------------------------------------------- cross_entropy
# The operators take torch's shapes (input (C,), (N, C) or (N, C, d1, ..., dK)) and work on the
# (N, C, D) view of the input; the forward keeps only the log-sum-exp of each row (as max and
# log-sum, (2, N, D)) for the backward. The backward's own derivative (double backward)
# recomputes the first derivatives from elementary differentiable ops and differentiates those.

_INT32_MAX = 2**31 - 1


def _ce_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _ce_view_shape(input: torch.Tensor):
    """(N, C, D) of the kernels' view of input, and the loss's shape for reduction 'none'."""
    if input.dim() == 1:
        return 1, input.shape[0], 1, ()
    n, c = input.shape[0], input.shape[1]
    d = 1
    for size in input.shape[2:]:
        d *= size
    return n, c, d, (n, *input.shape[2:])


def _ce_grad_like(input: torch.Tensor) -> torch.Tensor:
    """The layout the kernels give grad_input and grad_target (csrc/cross_entropy/*_common.h).

    On the (N, C, D) view: its own strides when it is dense and a kernel walks it as it is
    (positions or classes innermost), else class-contiguous rows; contiguous when empty. Then
    viewed back to the input's shape.
    """
    n, c, d, _ = _ce_view_shape(input)
    x = input.reshape(n, c, d)
    if x.numel() == 0:
        g = x.new_empty((n, c, d))
    elif ((d > 1 and x.stride(2) == 1 and c <= _INT32_MAX) or c <= 1 or x.stride(1) == 1) \
            and _is_dense(x):
        g = torch.empty_like(x)
    else:
        g = x.new_empty((n, d, c)).transpose(1, 2)
    return g.reshape(input.shape)


@_fake("dlext::cross_entropy")
def _cross_entropy_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    torch._check(input.dim() >= 1, lambda: "dlext::cross_entropy: expected 'input' with classes")
    n, _, d, loss_shape = _ce_view_shape(input)
    acc = _ce_acc_dtype(input.dtype)
    loss = input.new_empty(loss_shape if reduction == 0 else ())
    return loss, input.new_empty((2, n, d), dtype=acc), input.new_empty((), dtype=acc)


@_fake("dlext::cross_entropy_backward")
def _cross_entropy_backward_fake(grad_output, input, target, weight, lse, total_weight, reduction,
                                 ignore_index, label_smoothing, output_mask):
    torch._check(input.dim() >= 1,
                 lambda: "dlext::cross_entropy_backward: expected 'input' with classes")
    return (_ce_grad_like(input) if output_mask[0] else None,
            _ce_grad_like(input) if output_mask[1] else None,
            input.new_empty((_ce_view_shape(input)[1],)) if output_mask[2] else None)


def _ce_first_derivatives(grad_output, input, target, weight, total_weight, reduction,
                          ignore_index, label_smoothing):
    """What cross_entropy_backward computes, from elementary differentiable ops.

    Returns the gradients of the loss with respect to input, target and weight (None where the
    target holds class indices). No softmax/log_softmax/logsumexp: those are what dlext replaces.
    """
    n, c, d, _ = _ce_view_shape(input)
    x = input.reshape(n, c, d)
    eps = label_smoothing if label_smoothing > 0 else 0.0
    a, b = 1.0 - eps, (eps / c if eps > 0 else 0.0)
    m = x.detach().amax(1, keepdim=True)
    e = (x - m).exp()
    s = e.sum(1, keepdim=True)
    p = e / s
    lse = m + s.log()
    if reduction == 0:
        scale = grad_output.reshape(n, 1, d)
    elif reduction == 1:
        scale = grad_output.reshape(()) / total_weight.to(x.dtype)
    else:
        scale = grad_output.reshape(())
    w = weight.view(1, c, 1) if weight is not None else None
    if target.is_floating_point():
        yp = target.reshape(n, c, d) * a + b
        wy = yp * w if w is not None else yp
        g_input = scale * (p * wy.sum(1, keepdim=True) - wy)
        g_target = scale * a * (w if w is not None else 1.0) * (lse - x)
        g_weight = (scale * yp * (lse - x)).sum((0, 2)) if weight is not None else None
        return g_input.reshape(input.shape), g_target.reshape(target.shape), g_weight
    t = target.reshape(n, d)
    valid = t != ignore_index
    t = torch.where(valid, t, 0).long()
    onehot = torch.arange(c, device=x.device).view(1, c, 1) == t.unsqueeze(1)
    if weight is not None:
        w_t = weight[t] * valid
        w_sum = weight.sum()
    else:
        w_t = valid.to(x.dtype)
        w_sum = float(c)
    big_a = (a * w_t + b * w_sum * valid).unsqueeze(1)
    big_b = a * w_t.unsqueeze(1) * onehot + b * (w if w is not None else 1.0) * valid.unsqueeze(1)
    return (scale * (p * big_a - big_b)).reshape(input.shape), None, None


def _ce_backward(ctx, grad_loss):
    """Gradients of (input, target, weight) from cross_entropy_backward."""
    input, target, weight, lse, total_weight = ctx.saved_tensors
    return _differentiable(CrossEntropyBackwardFunction, ops.cross_entropy_backward.default,
                           grad_loss, input, target, weight, lse, total_weight, *ctx.ce_args,
                           list(ctx.needs_input_grad[:3]))


def _ce_setup(ctx, inputs, output):
    input, target, weight, reduction, ignore_index, label_smoothing = inputs
    _, lse, total_weight = output
    ctx.save_for_backward(input, target, weight, lse, total_weight)
    ctx.ce_args = (reduction, ignore_index, label_smoothing)
    ctx.mark_non_differentiable(lse, total_weight)


class CrossEntropyFunction(torch.autograd.Function):
    """(loss, lse, total_weight) = cross_entropy(input, target, weight, ...).

    The autograd formula of the raw operator; dlext.functional uses CrossEntropyLossFunction.
    """

    @staticmethod
    def forward(ctx, input, target, weight, reduction, ignore_index, label_smoothing):
        output = _run(ops.cross_entropy.default, input, target, weight, reduction, ignore_index,
                      label_smoothing)
        _ce_setup(ctx, (input, target, weight, reduction, ignore_index, label_smoothing), output)
        return output

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_total_weight):
        return (*_ce_backward(ctx, grad_loss), None, None, None)


def cross_entropy_loss(input, target, weight, reduction, ignore_index, label_smoothing):
    """The loss of dlext.functional.cross_entropy: through CrossEntropyLossFunction when a
    gradient can be asked for, else straight from the kernel."""
    if torch.is_grad_enabled() and (input.requires_grad or target.requires_grad
                                    or (weight is not None and weight.requires_grad)):
        return CrossEntropyLossFunction.apply(input, target, weight, reduction, ignore_index,
                                              label_smoothing)
    return _run(ops.cross_entropy.default, input, target, weight, reduction, ignore_index,
                label_smoothing)[0]


class CrossEntropyLossFunction(torch.autograd.Function):
    """loss = cross_entropy(input, target, weight, ...): the operator's first output alone, so the
    graph holds one node with one output. It saves the input itself, the target, and lse (two
    values per row): nothing of size N x C that the user did not pass in.
    """

    @staticmethod
    def forward(ctx, input, target, weight, reduction, ignore_index, label_smoothing):
        loss, lse, total_weight = _run(ops.cross_entropy.default, input, target, weight,
                                       reduction, ignore_index, label_smoothing)
        ctx.save_for_backward(input, target, weight, lse, total_weight)
        ctx.ce_args = (reduction, ignore_index, label_smoothing)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (*_ce_backward(ctx, grad_loss), None, None, None)


def _ce_backward_setup(ctx, inputs, output):
    grad_output, input, target, weight, _, total_weight = inputs[:6]
    ctx.save_for_backward(grad_output, input, target, weight, total_weight)
    ctx.ce_args = tuple(inputs[6:9])


class CrossEntropyBackwardFunction(torch.autograd.Function):
    """(grad_input, grad_target, grad_weight) = cross_entropy_backward(...).

    Its derivative recomputes the three gradients from elementary ops (_ce_first_derivatives)
    under autograd and differentiates them: exact, and as differentiable again as those ops.
    lse and total_weight are the forward's by-products of input (and weight), not free inputs:
    the derivative is that of the gradients as functions of (grad_output, input, target,
    weight), which is what double backward needs.
    """

    @staticmethod
    def forward(ctx, grad_output, input, target, weight, lse, total_weight, reduction,
                ignore_index, label_smoothing, output_mask):
        output = _run(ops.cross_entropy_backward.default, grad_output, input, target, weight, lse,
                      total_weight, reduction, ignore_index, label_smoothing, output_mask)
        _ce_backward_setup(ctx, (grad_output, input, target, weight, lse, total_weight,
                                 reduction, ignore_index, label_smoothing, output_mask), output)
        return output

    @staticmethod
    def backward(ctx, gg_input, gg_target, gg_weight):
        grad_output, input, target, weight, total_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        wrt = [(i, t) for i, t in ((0, grad_output), (1, input), (2, target), (3, weight))
               if needs[i]]
        result = [None] * 10
        if not wrt:
            return tuple(result)
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            firsts = _ce_first_derivatives(grad_output, input, target, weight, total_weight,
                                           *ctx.ce_args)
        pairs = [(f, g) for f, g in zip(firsts, (gg_input, gg_target, gg_weight))
                 if f is not None and g is not None and f.requires_grad]
        if not pairs:
            return tuple(result)
        grads = torch.autograd.grad([f for f, _ in pairs], [t for _, t in wrt],
                                    [g for _, g in pairs], allow_unused=True,
                                    create_graph=create_graph)
        for (i, t), g in zip(wrt, grads):
            result[i] = torch.zeros_like(t) if g is None else g
        return tuple(result)


_register("dlext::cross_entropy", _ce_setup, CrossEntropyFunction)
_register("dlext::cross_entropy_backward", _ce_backward_setup, CrossEntropyBackwardFunction)
