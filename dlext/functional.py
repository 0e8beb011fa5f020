"""dlext.functional: the torch.nn.functional signatures and semantics, on dlext kernels.

Each function normalises its arguments the way torch.nn.functional does, then applies the
autograd Function of dlext.autograd.
"""
from __future__ import annotations

import numbers

import torch

from dlext.autograd import (BatchNormFunction, MaxPool2dFunction, ReLUFunction,
                            ReLUInplaceFunction)

__all__ = ["relu", "max_pool2d", "max_pool2d_with_indices", "batch_norm"]


def _check_tensor(fn: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}(): argument '{name}' must be Tensor, not {type(value).__name__}")


def _int_list(value) -> list[int]:
    """An int or a sequence of ints as a list (its length is checked by the op, as torch does)."""
    if isinstance(value, (list, tuple, torch.Size)):
        return [int(v) for v in value]
    return [int(value)]


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """relu(input, inplace=False) -> Tensor, as torch.nn.functional.relu."""
    _check_tensor("relu", "input", input)
    if inplace:
        return ReLUInplaceFunction.apply(input)
    return ReLUFunction.apply(input)


def max_pool2d_with_indices(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                            ceil_mode: bool = False, return_indices: bool = True):
    """As torch.nn.functional.max_pool2d_with_indices: (values, indices)."""
    _check_tensor("max_pool2d", "input", input)
    stride = [] if stride is None else _int_list(stride)
    out, indices = MaxPool2dFunction.apply(input, _int_list(kernel_size), stride,
                                           _int_list(padding), _int_list(dilation),
                                           bool(ceil_mode))
    return out, indices


def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False, return_indices: bool = False):
    """max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
    return_indices=False), as torch.nn.functional.max_pool2d. Indices are flat per plane."""
    out, indices = max_pool2d_with_indices(input, kernel_size, stride, padding, dilation,
                                           ceil_mode)
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
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm(): argument 'input' must be Tensor, not "
                        f"{type(input).__name__}")
    if not isinstance(training, bool):
        raise TypeError(f"batch_norm(): argument 'training' must be bool, not "
                        f"{type(training).__name__}")
    for name, value in (("momentum", momentum), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"batch_norm(): argument '{name}' must be float, not "
                            f"{type(value).__name__}")
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
    args = (input, weight, bias, running_mean, running_var, training, float(momentum), float(eps))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (input, weight, bias)):
        return BatchNormFunction.apply(*args)[0]
    return torch.ops.dlext.batch_norm.default(*args)[0]
