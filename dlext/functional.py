"""dlext.functional: the torch.nn.functional signatures and semantics, on dlext kernels.

Each function normalises its arguments the way torch.nn.functional does, then applies the
autograd Function of dlext.autograd.
"""
from __future__ import annotations

import operator

import torch
from torch.nn import _reduction as _Reduction

from dlext.autograd import ReLUFunction, ReLUInplaceFunction, cross_entropy_loss

__all__ = ["relu", "cross_entropy"]


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """relu(input, inplace=False) -> Tensor, as torch.nn.functional.relu."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"relu(): argument 'input' must be Tensor, not {type(input).__name__}")
    if inplace:
        return ReLUInplaceFunction.apply(input)
    return ReLUFunction.apply(input)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """cross_entropy(input, target, ...) -> Tensor, as torch.nn.functional.cross_entropy.

    input (C,), (N, C) or (N, C, d1, ..., dK); target class indices (int64 or uint8, the input's
    shape without C) or class probabilities (the input's shape). One fused kernel computes the
    stable log-sum-exp and the loss per row; log_softmax is never materialised. The operator
    checks shapes and dtypes as torch does, with torch's errors.
    """
    for name, value, position in (("input", input, 1), ("target", target, 2)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cross_entropy(): argument '{name}' (position {position}) must be "
                            f"Tensor, not {type(value).__name__}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"cross_entropy(): argument 'weight' (position 3) must be Tensor, not "
                        f"{type(weight).__name__}")
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"cross_entropy(): argument 'ignore_index' must be int, not "
                        f"{type(ignore_index).__name__}") from None
    try:
        label_smoothing = float(label_smoothing)
    except (TypeError, ValueError):
        raise TypeError(f"cross_entropy(): argument 'label_smoothing' must be float, not "
                        f"{type(label_smoothing).__name__}") from None
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    reduction_enum = _Reduction.get_enum(reduction)

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
