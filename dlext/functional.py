"""dlext.functional: the torch.nn.functional signatures and semantics, on dlext kernels.

Each function normalises its arguments the way torch.nn.functional does, then applies the
autograd Function of dlext.autograd.
"""
from __future__ import annotations

import operator

import torch

from dlext.autograd import Conv2dFunction, ReLUFunction, ReLUInplaceFunction

__all__ = ["relu", "conv2d"]


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """relu(input, inplace=False) -> Tensor, as torch.nn.functional.relu."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"relu(): argument 'input' must be Tensor, not {type(input).__name__}")
    if inplace:
        return ReLUInplaceFunction.apply(input)
    return ReLUFunction.apply(input)


def _conv2d_pair(value, name: str) -> list[int]:
    """An int or a sequence of 1 or 2 ints, as [h, w] (torch's rules and messages)."""
    if isinstance(value, (list, tuple, torch.Size)):
        items = list(value)
    else:
        items = [value]
    for item in items:
        if isinstance(item, bool) or not hasattr(item, "__index__"):
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
    for name, value in (("input", input), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"conv2d(): argument '{name}' must be Tensor, not "
                            f"{type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"conv2d(): argument 'bias' must be Tensor or None, not "
                        f"{type(bias).__name__}")
    if isinstance(groups, bool) or not hasattr(groups, "__index__"):
        raise TypeError(f"conv2d(): argument 'groups' must be int, not {type(groups).__name__}")
    if input.dim() not in (3, 4):
        raise RuntimeError("Expected 3D (unbatched) or 4D (batched) input to conv2d, but got "
                           f"input of size: {list(input.shape)}")
    stride = _conv2d_pair(stride, "stride")
    dilation = _conv2d_pair(dilation, "dilation")
    padding = _conv2d_padding(padding, weight, stride, dilation)
    groups = operator.index(groups)
    if input.dim() == 3:
        out = Conv2dFunction.apply(input.unsqueeze(0), weight, bias, stride, padding, dilation,
                                   groups)
        return out.squeeze(0)
    return Conv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups)
