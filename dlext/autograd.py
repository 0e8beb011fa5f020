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


def _ce_check_devices(op, input, **others):
    """The kernels' device check, also for the fake kernel: a CPU tensor mixed with a meta tensor
    dispatches here, where it must fail as it does on a real device."""
    for name, t in others.items():
        torch._check(t is None or t.device == input.device, lambda: (
            f"{op}: expected all tensors to be on the same device, but 'input' is on "
            f"{input.device} and '{name}' is on {t.device}"))


@register_fake("dlext::cross_entropy")
def _cross_entropy_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    torch._check(input.dim() >= 1, lambda: "dlext::cross_entropy: expected 'input' with classes")
    _ce_check_devices("dlext::cross_entropy", input, target=target, weight=weight)
    n, _, d, loss_shape = _ce_view_shape(input)
    acc = _ce_acc_dtype(input.dtype)
    loss = input.new_empty(loss_shape if reduction == 0 else ())
    return loss, input.new_empty((2, n, d), dtype=acc), input.new_empty((), dtype=acc)


@register_fake("dlext::cross_entropy_backward")
def _cross_entropy_backward_fake(grad_output, input, target, weight, lse, total_weight, reduction,
                                 ignore_index, label_smoothing, output_mask):
    torch._check(input.dim() >= 1,
                 lambda: "dlext::cross_entropy_backward: expected 'input' with classes")
    _ce_check_devices("dlext::cross_entropy_backward", input, grad_output=grad_output,
                      target=target, weight=weight, lse=lse, total_weight=total_weight)
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
