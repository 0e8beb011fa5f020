"""dlext.functional: the torch.nn.functional signatures and semantics, on dlext kernels.

Each function normalises its arguments the way torch.nn.functional does, then applies the
autograd Function of dlext.autograd.
"""
from __future__ import annotations

import torch

from dlext.autograd import ReLUFunction, ReLUInplaceFunction

__all__ = ["relu"]


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """relu(input, inplace=False) -> Tensor, as torch.nn.functional.relu."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"relu(): argument 'input' must be Tensor, not {type(input).__name__}")
    if inplace:
        return ReLUInplaceFunction.apply(input)
    return ReLUFunction.apply(input)
