"""dlext.functional: the torch.nn.functional signatures and semantics, on dlext kernels.

Each function normalises its arguments the way torch.nn.functional does, then applies the
autograd Function of dlext.autograd.
"""
from __future__ import annotations

import torch

from dlext.autograd import MaxPool2dFunction, ReLUFunction, ReLUInplaceFunction

__all__ = ["relu", "max_pool2d", "max_pool2d_with_indices"]


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
