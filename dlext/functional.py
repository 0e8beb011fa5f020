"""dlext.functional: the torch.nn.functional signatures and semantics, on dlext kernels.

Each function normalises its arguments the way torch.nn.functional does, then applies the
autograd Function of dlext.autograd. Like torch.nn.functional, each first hands a call with
__torch_function__ overrides among its tensor arguments (tensor subclasses, torch.fx proxies) to
them, so torch.fx.symbolic_trace records dlext.functional calls.
"""
from __future__ import annotations

import numbers
import operator

import torch
from torch.nn import _reduction as _Reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from dlext.autograd import (BatchNormFunction, Conv2dFunction, MaxPool2dFunction, ReLUFunction,
                            ReLUInplaceFunction, cross_entropy_loss)

__all__ = ["relu", "max_pool2d", "max_pool2d_with_indices", "batch_norm", "conv2d",
           "cross_entropy"]


def _overridden(*args) -> bool:
    """Whether a __torch_function__ override (subclass, mode, torch.fx proxy) should see this call,
    as for torch.nn.functional. Not while torch.compile / torch.export trace: they trace the
    Functions themselves (torch.export's own mode would otherwise record the raw in-place ops,
    which refuse inputs that require grad)."""
    return has_torch_function_variadic(*args) and not torch.compiler.is_compiling()


def _check_tensor(fn: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}(): argument '{name}' must be Tensor, not {type(value).__name__}")


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast(tensors, lower_precision: bool):
    """Cast as torch.autocast casts the inputs of its native twin: convolutions run in the
    autocast dtype ("lower_precision_fp" ops), losses in float32 ("fp32" ops). Like autocast, only
    floating tensors other than float64 are cast, and only inside an autocast region for their
    device. None entries pass through."""
    if not _any_autocast():  # the common case, without looking at devices (~1 us per call)
        return tensors
    first = next(t for t in tensors if t is not None)
    device = first.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device) if lower_precision else torch.float32
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
            else t for t in tensors]


def _is_int(value) -> bool:
    """torch's int arguments: anything with __index__ (ints, numpy ints, one-element integer
    tensors), but not bool."""
    return not isinstance(value, bool) and hasattr(value, "__index__")


def _int_arg(fn: str, name: str, value) -> int:
    if not _is_int(value):
        raise TypeError(f"{fn}(): argument '{name}' must be int, not {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:  # e.g. a float tensor: __index__ exists but refuses
        raise TypeError(f"{fn}(): argument '{name}' must be int, not "
                        f"{type(value).__name__}") from None


def _float_arg(fn: str, name: str, value) -> float:
    """torch's float arguments: real numbers (bool included) and 0-d tensors without grad."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not value.requires_grad and not value.is_complex():
            return float(value)
    elif isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{fn}(): argument '{name}' must be float, not {type(value).__name__}")


def _pool_ints(fn: str, name: str, position: int, value) -> list[int]:
    """An int or a sequence of ints as a list, with torch's type errors (its length is checked by
    the op, as torch does)."""
    if isinstance(value, (list, tuple, torch.Size)):
        for i, item in enumerate(value):
            if not _is_int(item):
                raise TypeError(f"{fn}(): argument '{name}' (position {position}) must be tuple "
                                f"of ints, but found element of type {type(item).__name__} at "
                                f"pos {i}")
        return [operator.index(item) for item in value]
    if not _is_int(value):
        raise TypeError(f"{fn}(): argument '{name}' (position {position}) must be tuple of ints, "
                        f"not {type(value).__name__}")
    return [operator.index(value)]


_CreationMeta = getattr(torch._C._autograd, "CreationMeta", None)
_VIEW_REFUSALS = {
    "MULTI_OUTPUT_NODE": "This view is the output of a function that returns multiple views. "
                         "Such functions do not allow the output views to be modified inplace. "
                         "You should replace the inplace operation by an out-of-place one.",
    "NO_GRAD_MODE": "A view was created in no_grad mode and is being modified inplace with grad "
                    "mode enabled. Move both the view and the inplace operation inside the "
                    "no_grad block, or both outside it.",
    "INFERENCE_MODE": "A view was created in inference mode and is being modified inplace "
                      "outside inference mode.",
    "IN_CUSTOM_FUNCTION": "This view was created inside a custom Function (or because an input "
                          "was returned as-is) and the autograd logic to handle view+inplace "
                          "would override the custom backward; it cannot be modified inplace.",
}


def _check_inplace(input: torch.Tensor) -> None:
    """torch's refusals of an in-place op on a tensor that requires grad, raised before the
    kernel writes (an autograd.Function would write first and be refused after)."""
    if input._is_view():
        if _CreationMeta is None:
            return  # this torch cannot tell; the Function still refuses after the write
        meta = torch._C._autograd._get_creation_meta(input)
        if meta != _CreationMeta.DEFAULT:
            raise RuntimeError(_VIEW_REFUSALS.get(meta.name, "This view cannot be modified "
                                                             "inplace."))
        if input._base.is_leaf:
            raise RuntimeError("a view of a leaf Variable that requires grad is being used in an "
                               "in-place operation.")
    elif input.is_leaf:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place "
                           "operation.")


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """relu(input, inplace=False) -> Tensor, as torch.nn.functional.relu."""
    if _overridden(input):
        return handle_torch_function(relu, (input,), input, inplace=inplace)
    _check_tensor("relu", "input", input)
    if not inplace:
        return ReLUFunction.apply(input)
    if torch.is_grad_enabled() and input.requires_grad:
        if not torch.compiler.is_compiling():  # dynamo traces the Function's own checks
            _check_inplace(input)
        return ReLUInplaceFunction.apply(input)
    # Nothing to differentiate: the mutating op itself, which torch.compile can trace
    # (an autograd.Function that marks its input dirty breaks the graph).
    torch.ops.dlext.relu_.default(input)
    return input


def _max_pool2d(fn: str, input: torch.Tensor, kernel_size, stride, padding, dilation,
                ceil_mode: bool):
    _check_tensor(fn, "input", input)
    kernel_size = _pool_ints(fn, "kernel_size", 2, kernel_size)
    stride = [] if stride is None else _pool_ints(fn, "stride", 3, stride)
    padding = _pool_ints(fn, "padding", 4, padding)
    dilation = _pool_ints(fn, "dilation", 5, dilation)
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"{fn}(): argument 'ceil_mode' (position 6) must be bool, not "
                        f"{type(ceil_mode).__name__}")
    return MaxPool2dFunction.apply(input, kernel_size, stride, padding, dilation, ceil_mode)


def max_pool2d_with_indices(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                            ceil_mode: bool = False, return_indices: bool = True):
    """As torch.nn.functional.max_pool2d_with_indices: (values, indices)."""
    if _overridden(input):
        return handle_torch_function(max_pool2d_with_indices, (input,), input, kernel_size,
                                     stride=stride, padding=padding, dilation=dilation,
                                     ceil_mode=ceil_mode, return_indices=return_indices)
    return _max_pool2d("max_pool2d_with_indices", input, kernel_size, stride, padding, dilation,
                       ceil_mode)


def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False, return_indices: bool = False):
    """max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
    return_indices=False), as torch.nn.functional.max_pool2d. Indices are flat per plane."""
    if _overridden(input):  # as torch's, whose max_pool2d is one of these two by return_indices
        return handle_torch_function(max_pool2d_with_indices if return_indices else max_pool2d,
                                     (input,), input, kernel_size, stride=stride, padding=padding,
                                     dilation=dilation, ceil_mode=ceil_mode,
                                     return_indices=return_indices)
    out, indices = _max_pool2d("max_pool2d_with_indices" if return_indices else "max_pool2d",
                               input, kernel_size, stride, padding, dilation, ceil_mode)
    return (out, indices) if return_indices else out


def _verify_batch_size(size: torch.Size) -> None:
    """torch.nn.functional's check: training needs more than one value per channel."""
    size_prods = size[0]
    for i in range(len(size) - 2):
        size_prods *= size[i + 2]
    if size_prods == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}")


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None,
               running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5) -> torch.Tensor:
    """batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
    momentum=0.1, eps=1e-5) -> Tensor, as torch.nn.functional.batch_norm.

    Training normalises with the batch statistics (biased variance) and, when running stats are
    given, updates them in place: running = (1 - momentum) * running + momentum * batch, with the
    unbiased variance for running_var. Evaluation normalises with the running statistics.
    """
    if _overridden(input, running_mean, running_var, weight, bias):
        return handle_torch_function(batch_norm, (input, running_mean, running_var, weight, bias),
                                     input, running_mean, running_var, weight=weight, bias=bias,
                                     training=training, momentum=momentum, eps=eps)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm(): argument 'input' must be Tensor, not "
                        f"{type(input).__name__}")
    if not isinstance(training, bool):
        raise TypeError(f"batch_norm(): argument 'training' must be bool, not "
                        f"{type(training).__name__}")
    for name, value in (("running_mean", running_mean), ("running_var", running_var),
                        ("weight", weight), ("bias", bias)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"batch_norm(): argument '{name}' must be Tensor, not "
                            f"{type(value).__name__}")
    momentum = _float_arg("batch_norm", "momentum", momentum)
    eps = _float_arg("batch_norm", "eps", eps)
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if torch.is_grad_enabled():
        for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
            if stat is not None and stat.requires_grad:
                raise RuntimeError(f"batch_norm is not differentiable with respect to argument "
                                   f"'{name}'. This input cannot have requires_grad True.")
    # torch accepts weight and bias of any shape with one element per channel.
    if weight is not None and weight.dim() != 1:
        weight = weight.reshape(-1)
    if bias is not None and bias.dim() != 1:
        bias = bias.reshape(-1)
    args = (input, weight, bias, running_mean, running_var, training, momentum, eps)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (input, weight, bias)):
        return BatchNormFunction.apply(*args)[0]
    return torch.ops.dlext.batch_norm.default(*args)[0]

def _conv2d_pair(value, name: str) -> list[int]:
    """An int or a sequence of 1 or 2 ints, as [h, w] (torch's rules and messages)."""
    if isinstance(value, (list, tuple, torch.Size)):
        items = list(value)
    else:
        items = [value]
    for item in items:
        if not _is_int(item):
            raise TypeError(f"conv2d(): argument '{name}' must be an int or a tuple of ints, "
                            f"but got {type(item).__name__}")
    items = [operator.index(item) for item in items]
    if len(items) == 1:
        items = items * 2
    if len(items) != 2:
        raise RuntimeError(f"expected {name} to be a single integer value or a list of 2 values to "
                           f"match the convolution dimensions, but got {name}={items}")
    return items


def _conv2d_padding(padding, weight: torch.Tensor, stride: list[int], dilation: list[int]):
    """[top, bottom, left, right]. 'same' pads d*(k-1) in total, the odd one at the bottom/right
    (torch's rule), without copying the input; 'valid' is no padding."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding != "same":
            raise RuntimeError(f"Invalid padding string: '{padding}'")
        if any(s != 1 for s in stride):
            raise RuntimeError("padding='same' is not supported for strided convolutions")
        if weight.dim() != 4:
            return [0, 0, 0, 0]  # the kernel names the bad weight
        out = []
        for k, d in zip(weight.shape[2:], dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out
    ph, pw = _conv2d_pair(padding, "padding")
    return [ph, ph, pw, pw]


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> Tensor,
    as torch.nn.functional.conv2d: int or tuple stride/padding/dilation, padding 'same' or
    'valid', groups, batched (N, C, H, W) or unbatched (C, H, W) input."""
    if _overridden(input, weight, bias):
        return handle_torch_function(conv2d, (input, weight, bias), input, weight, bias=bias,
                                     stride=stride, padding=padding, dilation=dilation,
                                     groups=groups)
    for name, value in (("input", input), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"conv2d(): argument '{name}' must be Tensor, not "
                            f"{type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"conv2d(): argument 'bias' must be Tensor or None, not "
                        f"{type(bias).__name__}")
    if not _is_int(groups):
        raise TypeError(f"conv2d(): argument 'groups' must be int, not {type(groups).__name__}")
    if input.dim() not in (3, 4):
        raise RuntimeError("Expected 3D (unbatched) or 4D (batched) input to conv2d, but got "
                           f"input of size: {list(input.shape)}")
    input, weight, bias = _autocast([input, weight, bias], lower_precision=True)
    stride = _conv2d_pair(stride, "stride")
    dilation = _conv2d_pair(dilation, "dilation")
    padding = _conv2d_padding(padding, weight, stride, dilation)
    groups = operator.index(groups)
    if input.dim() == 3:
        out = Conv2dFunction.apply(input.unsqueeze(0), weight, bias, stride, padding, dilation,
                                   groups)
        return out.squeeze(0)
    return Conv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """cross_entropy(input, target, ...) -> Tensor, as torch.nn.functional.cross_entropy.

    input (C,), (N, C) or (N, C, d1, ..., dK); target class indices (int64 or uint8, the input's
    shape without C) or class probabilities (the input's shape). One fused kernel computes the
    stable log-sum-exp and the loss per row; log_softmax is never materialised. The operator
    checks shapes and dtypes as torch does, with torch's errors.
    """
    if _overridden(input, target, weight):
        return handle_torch_function(cross_entropy, (input, target, weight), input, target,
                                     weight=weight, size_average=size_average,
                                     ignore_index=ignore_index, reduce=reduce,
                                     reduction=reduction, label_smoothing=label_smoothing)
    for name, value, position in (("input", input, 1), ("target", target, 2)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cross_entropy(): argument '{name}' (position {position}) must be "
                            f"Tensor, not {type(value).__name__}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"cross_entropy(): argument 'weight' (position 3) must be Tensor, not "
                        f"{type(weight).__name__}")
    ignore_index = _int_arg("cross_entropy", "ignore_index", ignore_index)
    label_smoothing = _float_arg("cross_entropy", "label_smoothing", label_smoothing)
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    reduction_enum = _Reduction.get_enum(reduction)
    input, target, weight = _autocast([input, target, weight], lower_precision=False)

    if input.shape == target.shape:  # class probabilities, as torch decides
        if input.is_floating_point() and target.is_floating_point():
            # torch computes in the promoted dtype of input, target and weight.
            dtype = torch.promote_types(input.dtype, target.dtype)
            if weight is not None:
                dtype = torch.promote_types(dtype, weight.dtype)
            input, target = input.to(dtype), target.to(dtype)
            weight = weight.to(dtype) if weight is not None else None
    elif weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("cross_entropy(): the loss is not differentiable with respect to "
                           "argument 'weight' for class-index targets (as torch's "
                           "nll_loss_forward). This input cannot have requires_grad True.")
    return cross_entropy_loss(input, target, weight, reduction_enum, ignore_index,
                              label_smoothing)
